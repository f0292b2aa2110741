"""Tier 1: length-bucketed micro-batches (exact loss weights)."""

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
