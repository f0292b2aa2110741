"""What a PPO step logs, assembled in one place: its scalars (each reduced across ranks at most once), phase
timings, and a table of samples."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_ppo.compat import logging_step
from lightning_ppo.core import masked_mean
from lightning_ppo.experience import ForwardPasses, Rewards
from lightning_ppo.parallel import gather_flat
from lightning_ppo.report import log_training_histograms
from lightning_ppo.rewards import SampleBatch
from lightning_ppo.rollout import Rollout
from lightning_ppo.shaping import Scores

PROGRESS_BAR = ("env/reward_mean", "objective/kl")


@dataclass
class StepMetrics:
    """The scalars of one PPO step: `local` ones are this rank's (averaged over ranks when logged),
    `shared` ones are already the same on every rank (computed from gathered or reduced values)."""

    local: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, Tensor] = field(default_factory=dict)

    def add_local(self, *parts: dict[str, Tensor]) -> None:
        for part in parts:
            self.local.update(part)

    def log(self, module: Any) -> None:
        """`module.log` every scalar, on this step, reducing only the local ones."""
        datamodule = module.trainer.datamodule
        batch_size = datamodule.batch_size if datamodule else None
        for names, sync in ((self.shared, False), (self.local, True)):
            for name, value in names.items():
                module.log(
                    name,
                    value.detach().float(),
                    on_step=True,
                    on_epoch=False,
                    prog_bar=name in PROGRESS_BAR,
                    sync_dist=sync,
                    batch_size=batch_size,
                )

    def reduced(self, strategy: Any) -> dict[str, float]:
        """Each scalar as a float: local ones averaged over ranks (one all-reduce), shared ones as is."""
        local = list(self.local)
        device = strategy.root_device
        means = strategy.reduce(
            torch.stack([self.local[n].float().to(device) for n in local]), reduce_op="mean"
        )
        return {
            **{n: float(v) for n, v in self.shared.items()},
            **dict(zip(local, means.tolist(), strict=True)),
        }


@dataclass
class IterationResult:
    """What a PPO iteration hands to logging: its scalars, and for the histograms its scores and the
    per-sequence KL (None for a batch skipped for bad numbers)."""

    metrics: StepMetrics
    scores: Scores | None = None
    sequence_kls: Tensor | None = None  # (B,)


def iteration_result(
    rollout: Rollout,
    passes: ForwardPasses,
    rewards: Rewards,
    scores: Scores,
    shaped: Tensor,
    kl_coef: float,
    local: dict[str, Tensor],
    strategy: Any,
) -> IterationResult:
    """An iteration that trained: TRL's statistics of this rank's rows, then `local` ones; shared ones from
    every rank's scores, and TRL's objective/kl (per-sequence KL sums averaged over ranks: one all-reduce)."""
    sequence_kls = rewards.kls.sum(-1)  # (B,)
    mean_kl = strategy.reduce(sequence_kls.mean(), reduce_op="mean")
    mismatch, mismatch_max = sampling_mismatch(rollout, passes, partial(strategy.reduce, reduce_op="max"))
    metrics = StepMetrics(
        local={**rollout_statistics(rollout, passes, rewards, shaped), **mismatch, **local},
        shared={
            "env/reward_mean": scores.all.mean(),
            "env/reward_std": scores.all.std(),
            "objective/kl": mean_kl,
            "objective/kl_coef": torch.tensor(kl_coef),
            **mismatch_max,
        },
    )
    return IterationResult(metrics, scores, sequence_kls)


def rollout_statistics(
    rollout: Rollout, passes: ForwardPasses, rewards: Rewards, scores: Tensor
) -> dict[str, Tensor]:
    """TRL's statistics of this rank's rows (the reward's, over every rank, are logged from `Scores`)."""
    mask = rollout.response_mask
    prompt_mask = rollout.attention_mask[:, : rollout.response_start]
    return {
        "objective/entropy": (-passes.logprobs * mask).sum(-1).mean(),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": scores.std(),
        "ppo/mean_non_score_reward": masked_mean(rewards.non_score_rewards, mask),  # per token, as TRL
        "tokens/queries_len_mean": prompt_mask.sum(-1).float().mean(),
        "tokens/responses_len_mean": mask.sum(-1).mean(),
    }


def sampling_mismatch(
    rollout: Rollout, passes: ForwardPasses, global_max: Callable[[Tensor], Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """How far the engine's log-probs of the sampled tokens are from the trainer's old ones (TRL #4772):
    mean |engine - trainer| over this rank's response tokens (to average over ranks), and the largest over
    every rank's (the same on every rank). Both empty when the engine reports no log-probs (the HF engines
    sample with the trainer's own model)."""
    if rollout.sampling_logprobs is None:
        return {}, {}
    mask = rollout.response_mask
    diff = (rollout.sampling_logprobs - passes.logprobs).abs() * mask  # (B, R)
    return {"rollout/logprob_diff": masked_mean(diff, mask)}, {
        "rollout/logprob_diff_max": global_max(diff.max())
    }


def rollout_counts(rollout: Rollout, eos_token_id: int | None) -> dict[str, Tensor]:
    """What the sampling did: the share of decoded positions thrown away, and of responses cut at their
    length limit before an EOS."""
    metrics = {}
    if rollout.decoded_positions:
        metrics["tokens/decode_waste"] = torch.tensor(
            1 - rollout.useful_positions / rollout.decoded_positions
        )
    if rollout.length_limits is not None:
        cut = ~rollout.has_eos(eos_token_id) & (rollout.response_mask.sum(-1) >= rollout.length_limits)
        metrics["tokens/cut_at_limit"] = cut.float().mean()
    return metrics


class PhaseTimer:
    """Wall time of each phase of a step, under `time/<phase>`; CUDA is synchronised at each edge so GPU
    work is charged to the phase that launched it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[f"time/{phase}"] = time.perf_counter() - start

    def metrics(self) -> dict[str, Tensor]:
        return {name: torch.tensor(seconds) for name, seconds in self.seconds.items()}

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class StepClock:
    """Wall time from one logged PPO step to the next, so that the `time/*` scalars add up to `time/step`.

    `time/other` is what no phase timed (hooks, callbacks, data, logging); validation is not counted."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def restart(self) -> None:
        self.last = time.perf_counter()

    def lap(self, phases: PhaseTimer) -> dict[str, Tensor]:
        now = time.perf_counter()
        step, self.last = now - self.last, now
        return {
            "time/step": torch.tensor(step),
            "time/other": torch.tensor(step - sum(phases.seconds.values())),
        }


def samples_table(queries: list[str], responses: list[str], scores: Tensor, rows: int) -> str:
    """A markdown table of the first `rows` samples (TensorBoard's text plugin renders it)."""
    lines = [
        f"| {q!r} | {r!r} | {s:.3f} |" for q, r, s in zip(queries, responses, scores.tolist(), strict=True)
    ][:rows]
    return "\n".join(["| query | response | reward |", "|---|---|---|", *lines])


def log_samples(
    trainer: Trainer,
    samples: SampleBatch,
    result: IterationResult,
    every: int,
    rows: int,
) -> None:
    """Every `every` steps: a table of `rows` samples, and histograms of every rank's per-sequence rewards
    and KL (the KL gathered on every rank: a collective)."""
    step = logging_step(trainer)
    if not every or step % every or result.scores is None:  # a skipped (NaN) batch has no KL
        return
    all_kls = gather_flat(trainer.strategy, result.sequence_kls)
    if not trainer.is_global_zero:
        return
    table = samples_table(samples.prompts, samples.responses, result.scores.local, rows)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("samples", table, global_step=step)
            log_training_histograms(logger.experiment, step, result.scores.all, all_kls)
