"""What a PPO step shows in TensorBoard beyond its statistics: phase timings and a table of samples."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


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
