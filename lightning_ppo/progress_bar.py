"""The progress bar of the command line: the PPO step's reward, KL and seconds per step."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class PPOProgressBar(TQDMProgressBar):
    """Lightning's progress bar showing the PPO step's reward, KL and seconds per step, without `v_num`."""

    SHOWN = {"env/reward_mean": "reward", "objective/kl": "kl"}

    def __init__(self) -> None:
        super().__init__()
        self._step_started: float | None = None
        self._seconds_per_step: float | None = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        self._step_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._step_started is not None:
            self._seconds_per_step = time.perf_counter() - self._step_started
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        logged = trainer.progress_bar_metrics
        shown: dict[str, Any] = {short: logged[name] for name, short in self.SHOWN.items() if name in logged}
        shown.update({name: value for name, value in logged.items() if name not in self.SHOWN})
        if trainer.training and self._seconds_per_step is not None:
            shown["s/step"] = f"{self._seconds_per_step:.2f}"
        return shown
