"""Tier 1: length-bucketed micro-batches (exact loss weights) and the length-grouped generate plan."""

import itertools

import pytest
import torch
from torch.testing import assert_close

from lightning_ppo import core


def naive_micro_batches(lengths: list[int], max_tokens: int | None, max_rows: int | None) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # python's sort is stable
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            fits_tokens = max_tokens is None or (len(current) + 1) * lengths[current[0]] <= max_tokens
            fits_rows = max_rows is None or len(current) + 1 <= max_rows
            if fits_tokens and fits_rows:
                current.append(i)
                continue
        batches.append([i])
    return batches


@pytest.mark.parametrize(("max_tokens", "max_rows"), [(64, None), (None, 5), (80, 6), (10, None)])
def test_micro_batches_match_the_greedy_loop(max_tokens: int | None, max_rows: int | None) -> None:
    torch.manual_seed(0)
    lengths = torch.randint(6, 23, (37,))  # (N,) prompt + response tokens, ties included
    out = core.length_micro_batches(lengths, max_tokens, max_rows)
    assert [rows.tolist() for rows in out] == naive_micro_batches(lengths.tolist(), max_tokens, max_rows)
    assert sorted(torch.cat(out).tolist()) == list(range(37))  # each row exactly once
    for rows in out:
        if len(rows) > 1:
            assert max_tokens is None or len(rows) * int(lengths[rows].max()) <= max_tokens
            assert max_rows is None or len(rows) <= max_rows


def test_micro_batches_need_a_budget() -> None:
    with pytest.raises(ValueError, match="needs a budget"):
        core.length_micro_batches(torch.tensor([3, 4]))


def test_padded_tokens_counts_useful_and_computed_and_bucketing_cuts_waste() -> None:
    lengths = torch.tensor([5, 9, 9, 2, 7])
    useful, computed = core.padded_tokens(lengths, [torch.tensor([1, 2]), torch.tensor([0, 3, 4])])
    assert (useful, computed) == (32, 2 * 9 + 3 * 7)
    torch.manual_seed(1)
    lengths = torch.randint(6, 23, (128,))
    unsplit = core.padded_tokens(lengths, list(torch.arange(128).split(32)))
    bucketed = core.padded_tokens(lengths, core.length_micro_batches(lengths, max_rows=32))
    assert bucketed[0] == unsplit[0] and bucketed[1] < unsplit[1]


def test_weighted_micro_batch_means_equal_the_minibatch_masked_mean_and_its_gradient() -> None:
    torch.manual_seed(2)
    N, R = 23, 9
    response_lengths = torch.randint(1, R + 1, (N,))
    mask = (torch.arange(R) < response_lengths.unsqueeze(1)).float()  # (N, R)
    lengths = response_lengths + torch.randint(2, 8, (N,))  # (N,) prompt + response
    features = torch.randn(N, R, 4)
    weight_full = torch.randn(4, requires_grad=True)
    weight_split = weight_full.detach().clone().requires_grad_()

    full = core.masked_mean((features @ weight_full) ** 2, mask)
    full.backward()
    micro_batches = core.length_micro_batches(lengths, max_tokens=40)
    assert len(micro_batches) > 3
    weights = core.micro_batch_weights(mask, micro_batches)
    assert weights.dtype == torch.float32
    assert_close(weights.sum(), torch.tensor(1.0))
    total = torch.zeros(())
    for rows, w in zip(micro_batches, weights, strict=True):
        loss = w * core.masked_mean((features[rows] @ weight_split) ** 2, mask[rows])
        loss.backward()  # accumulated, as micro-batches would be
        total = total + loss.detach()
    assert_close(total, full.detach())
    assert_close(weight_split.grad, weight_full.grad)


def brute_force_decoded(lengths: list[int], max_calls: int) -> int:
    best = None
    for assignment in itertools.product(range(max_calls), repeat=len(lengths)):
        cost = 0
        for call in range(max_calls):
            members = [n for n, a in zip(lengths, assignment, strict=True) if a == call]
            cost += len(members) * max(members, default=0)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("max_calls", [1, 2, 3])
def test_generation_groups_are_optimal_against_brute_force(max_calls: int) -> None:
    generator = torch.Generator().manual_seed(max_calls)
    for _ in range(12):
        lengths = torch.randint(4, 16, (7,), generator=generator)  # (B,)
        groups, decoded, useful = core.generation_groups(lengths, max_calls)
        assert decoded == brute_force_decoded(lengths.tolist(), max_calls)
        assert useful == int(lengths.sum())
        assert len(groups) <= max_calls
        assert sorted(torch.cat(groups).tolist()) == list(range(7))
        assert decoded == core.padded_tokens(lengths, groups)[1]


def test_generation_groups_use_no_more_calls_than_distinct_lengths() -> None:
    lengths = torch.tensor([4, 9, 4, 15, 9, 9])
    groups, decoded, useful = core.generation_groups(lengths, max_calls=5)
    assert [g.tolist() for g in groups] == [[0, 2], [1, 4, 5], [3]]
    assert decoded == useful == 50
    one, decoded_one, _ = core.generation_groups(lengths, max_calls=1)
    assert [g.tolist() for g in one] == [list(range(6))] and decoded_one == 6 * 15
    with pytest.raises(ValueError, match="max_calls >= 1"):
        core.generation_groups(lengths, 0)
