"""Tier 1: length buckets (for packed forwards and grouped `generate` calls) against brute force."""

import itertools

import pytest
import torch

from lightning_ppo.packing import length_buckets
from tests.helpers import padded_tokens, seeded


def test_padded_tokens_counts_useful_and_computed_and_bucketing_cuts_waste() -> None:
    lengths = torch.tensor([5, 9, 9, 2, 7])
    useful, computed = padded_tokens(lengths, [torch.tensor([1, 2]), torch.tensor([0, 3, 4])])
    assert (useful, computed) == (32, 2 * 9 + 3 * 7)
    torch.manual_seed(seeded(1))
    lengths = torch.randint(6, 23, (128,))
    unsplit = padded_tokens(lengths, list(torch.arange(128).split(32)))
    bucketed = padded_tokens(lengths, length_buckets(lengths, 4)[0])
    assert bucketed[0] == unsplit[0] and bucketed[1] < unsplit[1]


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
def test_length_buckets_are_optimal_against_brute_force(max_calls: int) -> None:
    generator = torch.Generator().manual_seed(seeded(max_calls))
    for _ in range(12):
        lengths = torch.randint(4, 16, (7,), generator=generator)  # (B,)
        groups, decoded, useful = length_buckets(lengths, max_calls)
        assert decoded == brute_force_decoded(lengths.tolist(), max_calls)
        assert useful == int(lengths.sum())
        assert len(groups) <= max_calls
        assert sorted(torch.cat(groups).tolist()) == list(range(7))
        assert decoded == padded_tokens(lengths, groups)[1]


def test_length_buckets_use_no_more_calls_than_distinct_lengths() -> None:
    lengths = torch.tensor([4, 9, 4, 15, 9, 9])
    groups, decoded, useful = length_buckets(lengths, max_buckets=5)
    assert [g.tolist() for g in groups] == [[0, 2], [1, 4, 5], [3]]
    assert decoded == useful == 50
    one, decoded_one, _ = length_buckets(lengths, max_buckets=1)
    assert [g.tolist() for g in one] == [list(range(6))] and decoded_one == 6 * 15
    with pytest.raises(ValueError, match="max_buckets >= 1"):
        length_buckets(lengths, 0)
