"""What a PPO step logs, assembled in one place: its scalars (each reduced across ranks at most once), phase
timings, and a table of samples."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

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

    def log(self, module: Any, batch_size: int | None) -> None:
        """`module.log` every scalar, on this step, reducing only the local ones."""
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
    """Wall time from one logged PPO step to the next, so that the `time/*` scalars add up.

    `time/step` is the interval between two steps' logging points, which tile the training time;
    `time/other` is what no phase timed: Lightning's hooks and callbacks (checkpoints, progress bar),
    data loading, logging, and the unphased arithmetic of the step. Validation is not charged to a step.
    """

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
