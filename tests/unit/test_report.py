"""The test report: paired reward summary against a direct computation, its verdict, the PNG, TensorBoard."""

from __future__ import annotations

import dataclasses
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_ppo import report
from lightning_ppo.errors import ConfigError
from tests.helpers import seeded


def paired_rewards(n: int, shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rewards with spread 2 and tuned rewards correlated with them, moved by `shift`."""
    generator = torch.Generator().manual_seed(seeded(seed))
    reference = 2 * torch.randn(n, generator=generator)
    return reference, 0.7 * reference + torch.randn(n, generator=generator) + shift


def comparison(n: int, mean: float, low: float, high: float, sd: float) -> report.RewardComparison:
    return report.RewardComparison(n, 0.0, 0.0, mean, mean, mean, low, high, sd)


@pytest.mark.parametrize("n", [9, 40])  # an odd and an even count: the median picks or averages
def test_comparison_matches_a_direct_computation(n: int) -> None:
    reference, tuned = paired_rewards(n, 0.3)
    out = report.compare_rewards(reference, tuned, n_resamples=2000, seed=5)
    ref, tun = reference.double().tolist(), tuned.double().tolist()
    differences = [t - r for t, r in zip(tun, ref, strict=True)]
    assert out.n == n
    assert out.reference_mean == pytest.approx(sum(ref) / n, abs=1e-12)
    assert out.tuned_mean == pytest.approx(sum(tun) / n, abs=1e-12)
    assert out.reference_median == pytest.approx(statistics.median(ref), abs=1e-12)
    assert out.tuned_median == pytest.approx(statistics.median(tun), abs=1e-12)
    assert out.difference_mean == pytest.approx(sum(differences) / n, abs=1e-12)
    assert out.difference_sd == pytest.approx(statistics.stdev(differences), abs=1e-12)
    interval = report.paired_bootstrap_ci(tuned, reference, n_resamples=2000, seed=5)
    assert (out.difference_low, out.difference_high) == (interval.low, interval.high)
    assert out.scalars() == {
        "test/reward_ref_mean": out.reference_mean,
        "test/reward_ref_median": out.reference_median,
        "test/reward_policy_mean": out.tuned_mean,
        "test/reward_policy_median": out.tuned_median,
        "test/reward_diff_mean": out.difference_mean,
        "test/reward_diff_ci_low": interval.low,
        "test/reward_diff_ci_high": interval.high,
    }


def test_a_clear_change_on_many_prompts_excludes_zero_and_says_which_way() -> None:
    for shift, direction in ((1.0, "higher"), (-1.0, "lower")):
        out = report.compare_rewards(*paired_rewards(400, shift))
        assert not out.contains_zero
        text = out.summary_text()
        assert f"reward is {direction} than the reference's" in text
        assert "cannot tell" not in text
        assert out.interval_text() in text and "400 held-out prompts" in text


def test_a_small_change_on_few_prompts_contains_zero_and_advises_a_test_size() -> None:
    out = report.compare_rewards(*paired_rewards(16, 0.1))
    assert out.contains_zero
    needed = report.prompts_for_half_width(out.difference_sd, abs(out.difference_mean))
    assert needed > 16
    assert (
        f"cannot tell a change from noise with 16 prompts; about {needed} prompts (data.test_size) "
        f"would resolve a change of {abs(out.difference_mean):.3f}"
    ) in out.summary_text()


def test_the_issue_example_asks_for_291_prompts() -> None:
    # Issue 14: reward spread about 2, a change of 0.23 on 16 prompts
    text = comparison(16, 0.23, -0.75, 1.21, 2.0).summary_text()
    assert "about 291 prompts (data.test_size) would resolve a change of 0.230" in text


def test_a_zero_mean_difference_asks_to_halve_the_interval_and_identical_rewards_say_so() -> None:
    text = comparison(16, 0.0, -0.98, 0.98, 2.0).summary_text()
    assert "about 64 prompts (data.test_size) would resolve a change of 0.490" in text  # 4x the prompts
    same = torch.tensor([0.5, -1.0, 2.0])
    assert "scored the same on every prompt" in report.compare_rewards(same, same).summary_text()


def test_prompts_with_a_non_finite_reward_are_left_out_and_counted() -> None:
    reference, tuned = paired_rewards(12, 0.2)
    reference[3], tuned[7] = float("nan"), float("inf")
    out = report.compare_rewards(reference, tuned)
    keep = [i for i in range(12) if i not in (3, 7)]
    assert out == dataclasses.replace(report.compare_rewards(reference[keep], tuned[keep]), dropped=2)
    assert "Reward on 10 held-out prompts (2 more left out: a non-finite reward)" in out.summary_text()
    figure = report.reward_histogram(reference, tuned, out)
    assert [int(patch.get_data().values.sum()) for patch in figure.axes[0].patches] == [10, 10]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="data.test_size"):
        report.compare_rewards(torch.tensor([1.0]), torch.tensor([2.0]))
    with pytest.raises(ConfigError, match="model.reward"):
        report.compare_rewards(torch.tensor([1.0, float("nan")]), torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="same prompts"):
        report.compare_rewards(torch.zeros(3), torch.zeros(4))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk (PNG spec, sections 5.2 and 11.2.2)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_picture_marks_means_and_medians_and_is_written_as_a_png(tmp_path: Path) -> None:
    reference, tuned = paired_rewards(64, 0.5)
    out = report.compare_rewards(reference, tuned)
    figure = report.reward_histogram(reference, tuned, out)
    (axes,) = figure.axes
    lines = {line.get_label(): (line.get_xdata()[0], line.get_linestyle()) for line in axes.get_lines()}
    assert lines == {
        f"reference mean {out.reference_mean:.2f}": (out.reference_mean, "-"),
        f"reference median {out.reference_median:.2f}": (out.reference_median, "--"),
        f"tuned mean {out.tuned_mean:.2f}": (out.tuned_mean, "-"),
        f"tuned median {out.tuned_median:.2f}": (out.tuned_median, "--"),
    }
    counts = {patch.get_label(): patch.get_data() for patch in axes.patches}  # one StepPatch per policy
    assert list(counts) == ["reference", "tuned"]
    assert (counts["reference"].edges == counts["tuned"].edges).all()  # shared bins
    assert [int(c.values.sum()) for c in counts.values()] == [64, 64]  # every prompt counted once
    assert "64 held-out prompts" in axes.get_title() and out.interval_text() in axes.get_title()
    assert axes.get_xlabel() and axes.get_ylabel() and axes.get_legend() is not None
    path = report.save_figure(figure, tmp_path / "nested" / "test_rewards.png")
    assert path.stat().st_size > 10_000
    assert png_size(path) == report.FIGURE_SIZE


def test_importing_the_report_does_not_import_matplotlib() -> None:
    code = "import sys, lightning_ppo.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tensorboard_receives_the_histograms_and_the_picture(tmp_path: Path) -> None:
    reward = torch.tensor([0.5, -1.0, float("nan"), 2.0])  # (B,) a NaN score is left out
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.bfloat16)
    writer = SummaryWriter(tmp_path)
    report.log_training_histograms(writer, 3, reward, kl)
    report.log_training_histograms(writer, 7, reward + 1, kl)
    reference, tuned = paired_rewards(16, 0.1)
    figure = report.reward_histogram(reference, tuned, report.compare_rewards(reference, tuned))
    report.log_reward_figure(writer, figure, 7)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "images": 0}).Reload()
    assert set(events.Tags()["histograms"]) == {"histograms/reward", "histograms/kl"}
    rewards = events.Histograms("histograms/reward")
    assert [e.step for e in rewards] == [3, 7]
    first = rewards[0].histogram_value
    assert (first.num, first.min, first.max, first.sum) == (3, -1.0, 2.0, 1.5)
    assert rewards[1].histogram_value.sum == pytest.approx(4.5)
    kls = events.Histograms("histograms/kl")
    assert kls[0].histogram_value.num == 4 and kls[0].histogram_value.sum == pytest.approx(1.0, abs=1e-2)
    (image,) = events.Images("test/reward_histogram")
    assert (image.step, image.width, image.height) == (7, *report.FIGURE_SIZE)


def test_other_loggers_are_skipped() -> None:
    experiment = object()  # e.g. CSVLogger's writer: no add_histogram, no add_figure
    report.log_training_histograms(experiment, 0, torch.ones(2), torch.ones(2))
    reference, tuned = paired_rewards(4, 0.0)
    report.log_reward_figure(
        experiment, report.reward_histogram(reference, tuned, report.compare_rewards(reference, tuned)), 0
    )
