"""Tier 1: the paired bootstrap interval against a python loop, its sanity, and the sample-size advice."""

import math

import pytest
import torch

from lightning_ppo import report
from tests.helpers import seeded


def naive_bootstrap(differences: list[float], n_resamples: int, seed: int) -> tuple[float, float]:
    n = len(differences)
    draws = torch.randint(n, (n_resamples, n), generator=torch.Generator().manual_seed(seed))
    means = sorted(sum(differences[int(i)] for i in row) / n for row in draws)

    def quantile(q: float) -> float:  # linear interpolation between order statistics (numpy's default)
        position = q * (len(means) - 1)
        below = math.floor(position)
        above = min(below + 1, len(means) - 1)
        return means[below] + (position - below) * (means[above] - means[below])

    return quantile(0.025), quantile(0.975)


@pytest.mark.parametrize("chunk_draws", [2**22, 13 * 7, 1])
def test_bootstrap_matches_loop_for_small_resamples(
    chunk_draws: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "_BOOTSTRAP_CHUNK_DRAWS", chunk_draws)  # one chunk, 7 resamples, 1 each
    torch.manual_seed(seeded(0))
    tuned, reference = torch.randn(13) + 0.3, torch.randn(13)
    out = report.paired_bootstrap_ci(tuned, reference, n_resamples=200, seed=seeded(7))
    differences = (tuned.double() - reference.double()).tolist()
    low, high = naive_bootstrap(differences, 200, seeded(7))
    assert out.mean == pytest.approx(sum(differences) / 13, abs=1e-12)
    assert out.low == pytest.approx(low, abs=1e-12) and out.high == pytest.approx(high, abs=1e-12)


def test_bootstrap_is_deterministic_per_seed() -> None:
    tuned, reference = torch.randn(50), torch.randn(50)
    first = report.paired_bootstrap_ci(tuned, reference, n_resamples=1000, seed=3)
    assert report.paired_bootstrap_ci(tuned, reference, n_resamples=1000, seed=3) == first
    assert report.paired_bootstrap_ci(tuned, reference, n_resamples=1000, seed=4) != first


def test_bootstrap_excludes_zero_for_a_clear_shift_and_contains_it_for_a_symmetric_sample() -> None:
    generator = torch.Generator().manual_seed(seeded(0))
    reference = torch.randn(200, generator=generator) * 2
    shifted = report.paired_bootstrap_ci(
        reference + 1.0 + 0.5 * torch.randn(200, generator=generator), reference
    )
    assert 0 < shifted.low < shifted.mean < shifted.high
    assert shifted.low < 1.0 < shifted.high
    noise = torch.randn(100, generator=generator)
    symmetric = report.paired_bootstrap_ci(torch.cat([noise, -noise]), torch.zeros(200))
    assert symmetric.mean == pytest.approx(0.0, abs=1e-12)
    assert symmetric.low < 0 < symmetric.high


def test_bootstrap_needs_two_pairs() -> None:
    with pytest.raises(ValueError, match="at least 2 paired samples"):
        report.paired_bootstrap_ci(torch.tensor([1.0]), torch.tensor([0.0]))


@pytest.mark.parametrize(("sd", "change"), [(2.0, 0.23), (2.0, 0.5), (1.0, 0.1), (0.3, 1.0)])
def test_prompts_for_half_width_is_the_smallest_sufficient_count(sd: float, change: float) -> None:
    n = report.prompts_for_half_width(sd, change)
    assert 1.96 * sd / math.sqrt(n) <= change
    assert n == 2 or 1.96 * sd / math.sqrt(n - 1) > change
    assert report.prompts_for_half_width(2.0, 0.23) == 291  # the notebook's spread and issue 14's change


def test_prompts_for_half_width_refuses_a_zero_width() -> None:
    with pytest.raises(ValueError, match="half_width > 0"):
        report.prompts_for_half_width(2.0, 0.0)
