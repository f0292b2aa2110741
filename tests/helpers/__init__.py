"""Helpers shared by every tier: the suite's seed, which one environment variable changes for every draw.

`LIGHTNING_PPO_TEST_SEED=N python -m pytest` shifts every seed a test uses (`seeded`), the seed of the
CLI runs (`cli_seed_args`) and the seed the tiny assets are built with (conftest sets
`LIGHTNING_PPO_TINY_SEED`), so a verdict that hangs on one random stream or one set of tiny weights shows.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_ppo.core import upcast

TEST_SEED = int(os.environ.get("LIGHTNING_PPO_TEST_SEED", "0"))
ROOT = Path(__file__).resolve().parents[2]  # the checkout: subprocesses get it as PYTHONPATH
TINY = str(ROOT / "configs" / "tiny.yaml")
RANK_PROBE = "tests.helpers.probes.RankProbe"  # a CLI callback: what each rank saw, as JSON


def seeded(n: int = 0) -> int:
    """The seed a test calls `n`, moved by the suite's seed (seed 0 keeps `n`)."""
    return n + 1000 * TEST_SEED


def cli_seed_args() -> list[str]:
    """Command-line arguments that seed a CLI run with the suite's seed."""
    return ["--seed_everything", str(seeded(0))]


# ---------------------------------------------------------------------------------------------------
# References the package does not need: the separate entropy pass and the padding count of micro-batches.


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Float32 (or float64) entropy of each token's distribution: `logsumexp(l) - sum(softmax(l) * l)`."""
    logits = upcast(logits)  # (B, T, V)
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)  # (B, T)


def padded_tokens(lengths: Tensor, micro_batches: list[Tensor]) -> tuple[int, int]:
    """(useful, computed) tokens when each micro-batch is padded to its longest row: padding waste."""
    useful = sum(int(lengths[rows].sum()) for rows in micro_batches)
    computed = sum(len(rows) * int(lengths[rows].max()) for rows in micro_batches if len(rows))
    return useful, computed


# ---------------------------------------------------------------------------------------------------
# Statistical tests: each assertion states its false-alarm rate; thresholds come from the sample size.

FALSE_ALARM = 1e-4  # the probability that a correct sampler fails one statistical assertion


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof): the regularized upper incomplete gamma Q(dof/2, x/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))  # fmt: skip


def chi_square_goodness_of_fit(counts: Tensor, probs: Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic of `counts` (V,) against `probs` (V,), and its p-value.

    Cells expecting fewer than `min_expected` draws are pooled into one (Cochran's rule), so the
    chi-square approximation holds.
    """
    counts, probs = counts.double(), probs.double() / probs.double().sum()
    expected = probs * counts.sum()
    big = expected >= min_expected
    observed_cells = torch.cat([counts[big], counts[~big].sum()[None]])
    expected_cells = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected_cells > 0
    statistic = float(((observed_cells - expected_cells)[keep] ** 2 / expected_cells[keep]).sum())
    dof = int(keep.sum()) - 1
    return chi_square_sf(statistic, dof), dof


def chi_square_homogeneity(a: Tensor, b: Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Whether two histograms (V,) come from one distribution: the 2 x V chi-square test's p-value, dof.

    Rare cells (expected count below `min_expected` in either sample) are pooled into one. When each
    sample is a sum of independent draws from row-specific distributions (rows with different prompts),
    the pooled variance overestimates the true one, so the test only gets more conservative.
    """
    a, b = a.double(), b.double()
    total = a + b
    expected_a, expected_b = total * a.sum() / total.sum(), total * b.sum() / total.sum()
    big = (expected_a >= min_expected) & (expected_b >= min_expected)
    table = torch.stack([torch.cat([a[big], a[~big].sum()[None]]), torch.cat([b[big], b[~big].sum()[None]])])
    table = table[:, table.sum(0) > 0]  # (2, cells)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    return chi_square_sf(statistic, dof), dof


def paired_z(differences: Tensor) -> float:
    """The z statistic of the mean of independent paired differences (n,): mean / (sd / sqrt(n))."""
    differences = differences.double()
    sd = float(differences.std())
    if sd == 0:
        return 0.0 if float(differences.mean()) == 0 else float("inf")
    return float(differences.mean()) / (sd / len(differences) ** 0.5)


def normal_quantile(q: float) -> float:
    """The standard normal quantile: P(Z <= x) = q."""
    return float(torch.special.ndtri(torch.tensor(q, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------------
# Greedy decoding compared across kernel paths

# Logits of the same model on two kernel paths (another batch shape, the KV cache vs a full forward,
# another CPU) differ by float32 rounding: at most 7e-6 measured on the tiny models; a position whose
# top-2 logit margin is below this tolerance (over 100 times that) may be decided either way.
NEAR_TIE = 1e-3


def kept_tokens(rollout: Any) -> list[list[int]]:
    """Each row's kept response tokens (response_mask 1) of a rollout."""
    kept = rollout.response_mask.sum(-1).long().tolist()
    return [rollout.response_ids[row, :n].tolist() for row, n in enumerate(kept)]


def assert_same_greedy_tokens(
    lm: torch.nn.Module, rollout: Any, others: list[list[int]], min_compared: float = 0.75
) -> None:
    """Each row of `rollout` (greedy, rollout layout) has the kept tokens `others[row]`, up to the row's
    first near-tie: a position whose top-2 margin (a full forward along `rollout`) is below `NEAR_TIE`,
    after which the two paths may legitimately diverge. At least `min_compared` of the rollout's kept
    positions must be compared, so the check cannot pass vacuously."""
    from lightning_ppo.models import position_ids_from_mask

    with torch.no_grad():
        logits = lm(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids_from_mask(rollout.attention_mask),
        ).logits[:, rollout.response_start - 1 : -1]  # (B, R, V) the logits before each response token
    top2 = logits.float().topk(2, dim=-1).values  # (B, R, 2)
    margins = top2[..., 0] - top2[..., 1]  # (B, R)
    kept = rollout.response_mask.sum(-1).long().tolist()
    compared = 0
    for row, other in enumerate(others):
        tokens = rollout.response_ids[row, : kept[row]].tolist()
        near = (margins[row, : kept[row]] < NEAR_TIE).nonzero()
        stop = int(near[0]) if len(near) else kept[row]
        assert tokens[:stop] == other[:stop], (row, stop, tokens, other)
        if stop == kept[row]:  # no near-tie: both paths must also stop at the same place
            assert len(other) == kept[row], (row, tokens, other)
        compared += stop
    assert compared >= min_compared * sum(kept), f"only {compared} of {sum(kept)} positions compared"


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 1/2) of Student's t with `df` degrees of freedom: bisection on its upper tail,
    integrated numerically from the density (float64, relative error < 1e-6 for df >= 3)."""

    def upper_tail(t: float) -> float:
        grid = t + torch.linspace(0, 1, 400_001, dtype=torch.float64) ** 4 * 2000  # dense near t
        log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        density = torch.exp(log_norm - (df + 1) / 2 * torch.log1p(grid**2 / df))
        return float(torch.trapezoid(density, grid))

    low, high = 0.0, 100.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if upper_tail(middle) > 1 - p else (low, middle)
    return (low + high) / 2


def reward_trend(logged: dict[str, list[float]]) -> tuple[float, float]:
    """How surely the reward rose over the run: the t statistic of the least-squares slope of the steps'
    mean rewards (`env/reward_mean`) against the step, and its one-sided FALSE_ALARM (1e-4) threshold.

    The noise is estimated from the steps' scatter around the line, not from the rows' spread within a
    step: the rows of one batch share its prompts' draw and are not independent. For a policy that did not
    change, the steps' means are exchangeable draws and the statistic is Student's t with T - 2 degrees
    of freedom.
    """
    means = torch.tensor(logged["env/reward_mean"], dtype=torch.float64)  # (T,)
    steps = torch.arange(len(means), dtype=torch.float64)
    centred = steps - steps.mean()
    slope = (centred * means).sum() / (centred**2).sum()
    residuals = means - means.mean() - slope * centred  # (T,)
    variance = (residuals**2).sum() / (len(means) - 2) / (centred**2).sum()
    return float(slope / variance.sqrt()), student_t_quantile(1 - FALSE_ALARM, len(means) - 2)


def assert_reward_rose(logged: dict[str, list[float]]) -> None:
    """The reward rose beyond noise (`reward_trend`): a policy that did not change passes with P = 1e-4."""
    t, threshold = reward_trend(logged)
    assert t > threshold, (t, threshold, logged["env/reward_mean"])


class MarkTrainBatchEnd(Callback):
    """Touches `path` after each training batch: a run in a subprocess has then installed its signal
    handlers and finished a step, which a test waits for instead of a sleep that suits one machine."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.path.touch()


class PauseAtTrainBatchEnd(Callback):
    """At the end of training batch `batch_idx`, touches `path` and waits until `release` exists: a test can
    then signal a run in a subprocess that is certainly inside a PPO step (this callback runs before the
    model's own, which act on held signals)."""

    def __init__(self, path: str, release: str, batch_idx: int = 0) -> None:
        self.path, self.release, self.batch_idx = Path(path), Path(release), batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            self.path.touch()
            while not self.release.exists():
                time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------
# What a run logged


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar a TensorBoard run folder holds: tag -> values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class RecordingLogger(Logger):
    """Keeps every logged scalar in memory: name -> values in step order."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[float]] = defaultdict(list)

    name = "recording"
    version = 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            self.metrics[name].append(float(value))


REVIEW_OPENINGS = [
    "the movie",
    "a",
    "this film was really",
    "the plot and the actor were",
    "an",
    "i liked the",
    "what a",
    "the best and the worst film of the year",
]


def short_response_module():
    """The tiny policy and reward, responses of 1 to 12 tokens (seeded: the same value head each time)."""
    from lightning_ppo.module import PPOModule

    torch.manual_seed(seeded(0))
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward")
    module.sampling.response_min_length, module.sampling.response_max_length = 1, 12
    return module


def experience_of_a_rollout(module, seed: int):
    """An experience of the module's own rollout of `REVIEW_OPENINGS`, with random per-token rewards."""
    from lightning_ppo.data import collate_prompts
    from lightning_ppo.experience import forward_passes, make_experience
    from lightning_ppo.rollout import draw_response_lengths

    torch.manual_seed(seeded(seed))
    examples = [{"input_ids": module.tokenizer(p).input_ids, "query": p} for p in REVIEW_OPENINGS]
    batch = collate_prompts(examples, module.tokenizer.pad_token_id)
    lengths = draw_response_lengths(len(REVIEW_OPENINGS), module.sampling, module.device)
    rollout = module.generate_rollout(module.policy.lm, batch, lengths)
    passes = forward_passes(module.models, rollout)
    return make_experience(rollout, passes, torch.randn_like(passes.logprobs), module.ppo)
