"""Surviving bad numbers: skip a PPO batch or an optimizer step that holds NaN/inf, count it, and stop a run
that keeps failing, saving `bad-steps.ckpt` and exiting 3 (`BAD_STEPS_EXIT_CODE`) so that schedulers see it.
Each fault and the metric that counts it: docs/reliability.md."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy
from torch import Tensor

logger = logging.getLogger(__name__)

STOP_CHECKPOINT = "bad-steps.ckpt"
BAD_STEPS_EXIT_CODE = 3  # the command line's exit code after such a stop (2 is a configuration mistake)


class BadNumberGuard:
    """Decides whether a rollout or an optimizer step is usable, counts the faults, and stops the run."""

    def __init__(self, max_consecutive_bad_steps: int) -> None:
        self.max_consecutive_bad_steps = max_consecutive_bad_steps  # >= 1, checked by PPOModule
        self.consecutive_bad_steps = 0
        self.skipped_optimizer_steps = 0  # in the current PPO step
        self.stop_checkpoint: Path | None = None  # set once the run was stopped

    def check_rollout(
        self, strategy: Strategy, scores: Tensor, *per_token: Tensor
    ) -> tuple[bool, dict[str, Tensor]]:
        """Whether scores (B,) and the (B, R) log-probs/values are all finite, on every rank; and the counts.

        One host sync per PPO step. The decision is reduced over ranks so that every rank skips together
        (a rank that skipped alone would leave the others waiting in a collective).
        """
        nan_rewards = (~torch.isfinite(scores)).sum()
        invalid = sum((~torch.isfinite(x)).sum() for x in per_token)
        bad = strategy.reduce((nan_rewards + invalid).float(), reduce_op="sum")
        usable = bool(bad == 0)
        self._count(usable)
        metrics = {
            "env/nan_rewards": nan_rewards.float(),
            "ppo/skipped_batches": torch.tensor(float(not usable), device=scores.device),
        }
        return usable, metrics

    def step_is_finite(self, strategy: Strategy, loss: Tensor) -> bool:
        """Whether the minibatch's summed loss is finite on every rank, so its optimizer step may be taken.

        One host sync per minibatch: one NaN step would write NaN into Adam's moments and every weight."""
        bad = strategy.reduce((~torch.isfinite(loss)).float(), reduce_op="sum")
        finite = bool(bad == 0)
        self._count(finite)
        self.skipped_optimizer_steps += not finite
        return finite

    def pop_skipped_optimizer_steps(self) -> Tensor:
        """Optimizer steps skipped since the last call (one PPO step), as a metric."""
        skipped, self.skipped_optimizer_steps = self.skipped_optimizer_steps, 0
        return torch.tensor(float(skipped))

    @property
    def should_stop(self) -> bool:
        return self.consecutive_bad_steps >= self.max_consecutive_bad_steps

    def stop_if_failing(self, trainer: Trainer) -> None:
        """After too many bad steps in a row: save a checkpoint, ask Lightning to stop, and say why."""
        if not self.should_stop:
            return
        path = checkpoint_dir(trainer) / STOP_CHECKPOINT
        # every rank calls it: strategies that shard state need them all
        trainer.save_checkpoint(path, weights_only=False)
        self.stop_checkpoint = path
        trainer.should_stop = True  # the fit loop ends after this batch
        if trainer.is_global_zero:
            logger.error(
                "Stopping the run: %d PPO batches or optimizer steps in a row had NaN/inf values "
                "(model.max_consecutive_bad_steps=%d). The bad steps were skipped, so the weights are the "
                "last good ones; they are saved in %s. Lower model.learning_rate, set "
                "model.ppo.max_grad_norm, use trainer.precision=32-true or bf16-mixed instead of 16-mixed, "
                "or check the reward model, then resume with --ckpt_path.",
                self.consecutive_bad_steps,
                self.max_consecutive_bad_steps,
                path,
            )

    def _count(self, good: bool) -> None:
        self.consecutive_bad_steps = 0 if good else self.consecutive_bad_steps + 1


def checkpoint_dir(trainer: Trainer) -> Path:
    """Where ModelCheckpoint writes, or `<log_dir>/checkpoints` without one."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
