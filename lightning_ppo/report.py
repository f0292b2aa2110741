"""The `test` report: the paired reward difference with its confidence interval, and the pictures.

Pure of Lightning: takes tensors, returns numbers, text and matplotlib figures, writes files. matplotlib
is imported only when a figure is drawn, so `import lightning_ppo` stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from lightning_ppo.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Reference and tuned colours of the picture (matplotlib's default C0 and C1), and its size in pixels.
_COLORS = {"reference": "#1f77b4", "tuned": "#ff7f0e"}
FIGURE_DPI = 100
FIGURE_SIZE = (800, 480)
_MAX_BINS = 60


# Bootstrap indices are drawn in chunks of about this many (32 MiB of int64) to bound memory.
_BOOTSTRAP_CHUNK_DRAWS = 2**22


class PairedDifference(NamedTuple):
    """Mean of paired differences (tuned - reference) and its percentile-bootstrap interval."""

    mean: float
    low: float
    high: float


def paired_bootstrap_ci(
    tuned: Tensor, reference: Tensor, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> PairedDifference:
    """Mean of `tuned - reference` over the same prompts, (n,) each, with a percentile-bootstrap interval.

    Naive equivalent (Efron & Tibshirani 1993, ch. 13): average the differences at each of n_resamples seeded
    draws of n indices; take the linear-interpolated (1 -+ confidence) / 2 quantiles of those means."""
    differences = (tuned.double() - reference.double()).flatten()  # (n,)
    n = differences.numel()
    if n < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 paired samples, got {n}")
    differences = differences.cpu()
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, _BOOTSTRAP_CHUNK_DRAWS // n)  # chunks draw the same stream as one (n_resamples, n) call
    means = torch.cat(
        [
            differences[torch.randint(n, (min(rows, n_resamples - start), n), generator=generator)].mean(1)
            for start in range(0, n_resamples, rows)
        ]
    )  # (n_resamples,)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(float(differences.mean()), low, high)


def prompts_for_half_width(sd: float, half_width: float, z: float = 1.96) -> int:
    """Prompts n needed for a 95% interval half-width `z * sd / sqrt(n)` of at most `half_width`.

    `sd` is the standard deviation of the paired differences (tuned - reference) over prompts.
    """
    if sd < 0 or half_width <= 0:
        raise ValueError(f"need sd >= 0 and half_width > 0, got sd={sd}, half_width={half_width}")
    return max(2, math.ceil((z * sd / half_width) ** 2))


@dataclass(frozen=True)
class RewardComparison:
    """Reward of the reference and of the tuned policy on the same held-out prompts, and their difference.

    The difference is paired, `tuned - reference` prompt by prompt, so the prompts' spread cancels out.
    """

    n: int  # held-out prompts
    reference_mean: float
    reference_median: float
    tuned_mean: float
    tuned_median: float
    difference_mean: float  # mean of tuned - reference over the prompts
    difference_low: float  # 95% percentile-bootstrap interval of difference_mean
    difference_high: float
    difference_sd: float  # sample standard deviation of tuned - reference over the prompts
    dropped: int = 0  # prompts left out because either reward was NaN/inf

    @property
    def contains_zero(self) -> bool:
        """True when the interval cannot tell the change from noise."""
        return self.difference_low <= 0 <= self.difference_high

    def scalars(self) -> dict[str, float]:
        """The numbers as `test/...` scalars; the first four keep the names `test` logged before."""
        return {
            "test/reward_ref_mean": self.reference_mean,
            "test/reward_ref_median": self.reference_median,
            "test/reward_policy_mean": self.tuned_mean,
            "test/reward_policy_median": self.tuned_median,
            "test/reward_diff_mean": self.difference_mean,
            "test/reward_diff_ci_low": self.difference_low,
            "test/reward_diff_ci_high": self.difference_high,
        }

    def interval_text(self) -> str:
        """`+0.230 [95% CI -0.100, +0.560]`: the paired difference and its interval."""
        return f"{self.difference_mean:+.3f} [95% CI {self.difference_low:+.3f}, {self.difference_high:+.3f}]"

    def summary_text(self) -> str:
        """A few plain sentences: the means and medians, the paired difference, and whether it is noise."""
        left_out = f" ({self.dropped} more left out: a non-finite reward)" if self.dropped else ""
        lines = [
            f"Reward on {self.n} held-out prompts{left_out}, reference -> tuned: "
            f"mean {self.reference_mean:.3f} -> {self.tuned_mean:.3f}, "
            f"median {self.reference_median:.3f} -> {self.tuned_median:.3f}.",
            f"Paired difference (tuned - reference, same prompts): {self.interval_text()}.",
        ]
        if not self.contains_zero:
            direction = "higher" if self.difference_mean > 0 else "lower"
            lines.append(
                f"The interval excludes 0: the tuned policy's reward is {direction} than the reference's."
            )
        elif self.difference_sd == 0:
            lines.append("The tuned policy and the reference scored the same on every prompt.")
        else:
            # The change to resolve: the observed one or, if exactly 0, half the interval's half-width.
            change = abs(self.difference_mean) or 1.96 * self.difference_sd / self.n**0.5 / 2
            needed = prompts_for_half_width(self.difference_sd, change)
            lines.append(
                f"The interval contains 0: cannot tell a change from noise with {self.n} prompts; about "
                f"{needed} prompts (data.test_size) would resolve a change of {change:.3f} "
                f"(sd of the differences {self.difference_sd:.3f})."
            )
        return "\n".join(lines)


def compare_rewards(
    reference: Tensor, tuned: Tensor, n_resamples: int = 10_000, seed: int = 0
) -> RewardComparison:
    """Summarise per-prompt rewards of the reference and the tuned policy, (n,) each, same prompts in order.

    The interval is `paired_bootstrap_ci` at 95%; medians interpolate as `Tensor.quantile(0.5)`.
    Prompts where either reward is NaN/inf are left out and counted.
    """
    reference, tuned, dropped = finite_pairs(reference, tuned)
    if reference.numel() < 2:
        raise ConfigError(
            f"data.test_size: the test report needs at least 2 held-out prompts with finite rewards, got "
            f"{reference.numel()} ({dropped} non-finite); raise data.test_size, or check model.reward if "
            "rewards were NaN/inf (see 'Reading the test report' in the README)."
        )
    interval = paired_bootstrap_ci(tuned, reference, n_resamples=n_resamples, seed=seed)
    return RewardComparison(
        n=reference.numel(),
        reference_mean=float(reference.mean()),
        reference_median=float(reference.quantile(0.5)),
        tuned_mean=float(tuned.mean()),
        tuned_median=float(tuned.quantile(0.5)),
        difference_mean=interval.mean,
        difference_low=interval.low,
        difference_high=interval.high,
        difference_sd=float((tuned - reference).std()),
        dropped=dropped,
    )


def finite_pairs(reference: Tensor, tuned: Tensor) -> tuple[Tensor, Tensor, int]:
    """The paired rewards as float64 on the CPU, (n,) each, without prompts where either is NaN/inf."""
    reference, tuned = reference.detach().double().cpu().flatten(), tuned.detach().double().cpu().flatten()
    if reference.shape != tuned.shape:
        raise ValueError(f"paired rewards need the same prompts, got {reference.numel()} and {tuned.numel()}")
    keep = reference.isfinite() & tuned.isfinite()  # (n,) bool
    return reference[keep], tuned[keep], int((~keep).sum())


def histogram_edges(values: Any) -> Any:
    """Bin edges (at most `_MAX_BINS` bins) for the finite float64 `values` (n,), n >= 1, of any size.

    A constant array's range is widened by a part of its size: numpy's +-0.5 vanishes near 1e16 and up."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scale = max(abs(low), abs(high))
    if high - low <= scale * 1e-6:  # (nearly) constant: one bin centred on the values
        pad = max(0.5, scale * 1e-6)
        return np.array([low - pad, high + pad])
    edges = np.histogram_bin_edges(values, bins="auto")
    if len(edges) > _MAX_BINS + 1:  # "auto" follows the Freedman-Diaconis width, which outliers can shrink
        edges = np.histogram_bin_edges(values, bins=_MAX_BINS)
    return edges


def reward_histogram(reference: Tensor, tuned: Tensor, comparison: RewardComparison) -> Figure:
    """Overlaid histograms of reference and tuned rewards on shared bins; means solid, medians dashed.

    Built on matplotlib's Agg canvas without pyplot, so no global figure state or display is involved.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    reference, tuned, _ = finite_pairs(reference, tuned)
    values = {"reference": reference.numpy(), "tuned": tuned.numpy()}
    bins = histogram_edges(np.concatenate(list(values.values())))
    figure = Figure(figsize=(FIGURE_SIZE[0] / FIGURE_DPI, FIGURE_SIZE[1] / FIGURE_DPI), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    centres = {
        "reference": (comparison.reference_mean, comparison.reference_median),
        "tuned": (comparison.tuned_mean, comparison.tuned_median),
    }
    for name, rewards in values.items():
        color = _COLORS[name]
        counts, _ = np.histogram(rewards, bins=bins)
        axes.stairs(
            counts,
            bins,
            fill=True,
            facecolor=to_rgba(color, 0.45),
            edgecolor=color,
            linewidth=1.2,
            label=name,
        )
        mean, median = centres[name]
        axes.axvline(mean, color=color, linestyle="-", linewidth=2, zorder=3, label=f"{name} mean {mean:.2f}")
        axes.axvline(
            median, color=color, linestyle="--", linewidth=2, zorder=3, label=f"{name} median {median:.2f}"
        )
    axes.set_xlabel("reward (reward model score)")
    axes.set_ylabel("held-out prompts")
    axes.set_title(
        f"Reward on {comparison.n} held-out prompts; tuned - reference = {comparison.interval_text()}",
        fontsize=10,
    )
    axes.legend(fontsize=8, framealpha=0.9)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG at `path` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=FIGURE_DPI)
    return path


def log_reward_figure(experiment: Any, figure: Figure, step: int, tag: str = "test/reward_histogram") -> None:
    """Send the test picture to TensorBoard (`SummaryWriter.add_figure`); a no-op for other loggers."""
    if hasattr(experiment, "add_figure"):
        experiment.add_figure(tag, figure, global_step=step, close=False)


def log_training_histograms(experiment: Any, step: int, reward: Tensor, kl: Tensor) -> None:
    """Histograms of per-sequence reward and KL, (B,) each, as `histograms/reward` and `histograms/kl`.

    Only for a TensorBoard `SummaryWriter` `experiment`. Non-finite values are left out; bins come from the
    values (`histogram_edges`), as TensorBoard's default bins end at +-1e20."""
    if not hasattr(experiment, "add_histogram"):
        return
    for tag, values in (("histograms/reward", reward), ("histograms/kl", kl)):
        values = values.detach().double().cpu().flatten()  # (B,) float64
        values = values[torch.isfinite(values)]
        if values.numel():
            experiment.add_histogram(tag, values, global_step=step, bins=histogram_edges(values.numpy()))
