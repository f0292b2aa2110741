"""Reward shaping of the sequence scores before the KL penalty: EOS penalty, running scaling, clipping.

Pure math: imports only torch (and the dependency-free `ConfigError`). Options follow TRL (legacy
`use_score_scaling`, `use_score_norm`, `score_clip`; newer `missing_eos_penalty`); every one is off by
default, as in the notebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ppo.errors import ConfigError, check_number


@dataclass
class ShapingConfig:
    """How raw scores become the scores PPO optimises; applied in the order of the fields below.

    Args:
        missing_eos_penalty: Subtracted (>= 0) from the score of every response without an EOS token (newer
            TRL); null disables it.
        score_scaling: Divide scores by the running standard deviation of all scores seen so far.
        score_norm: Also subtract the running mean (needs score_scaling).
        score_clip: Clip (shaped) scores to [-score_clip, score_clip]; null disables it.
    """

    missing_eos_penalty: float | None = None
    score_scaling: bool = False
    score_norm: bool = False
    score_clip: float | None = None

    def __post_init__(self) -> None:
        if self.score_norm and not self.score_scaling:
            raise ConfigError("model.shaping.score_norm needs model.shaping.score_scaling: true")
        check_number("model.shaping.missing_eos_penalty", self.missing_eos_penalty, 0, optional=True)
        check_number("model.shaping.score_clip", self.score_clip, 0, open_low=True, optional=True)


class RunningMoments:
    """Running mean and unbiased std over every value seen, merged batch by batch (Chan et al. 1979).

    Naive equivalent: `torch.cat(batches).mean()` and `.std()`. Starts at mean 0, variance 1 with a
    negligible count, as TRL's `RunningMoments`.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0  # biased (population) variance of everything seen
        self.count = 1e-24

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen."""
        return (self.var * self.count / max(self.count - 1, 1e-24)) ** 0.5

    def update(self, values: Tensor) -> None:
        """Merge a batch of values (any shape) into the moments."""
        values = values.detach().double().flatten()
        n = values.numel()
        batch_var, batch_mean = torch.var_mean(values, unbiased=False)
        batch_mean, batch_var = float(batch_mean), float(batch_var)
        delta = batch_mean - self.mean
        total = self.count + n
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        """The moments, for checkpoints."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore the moments saved by state_dict."""
        self.mean, self.var, self.count = state_dict["mean"], state_dict["var"], state_dict["count"]


@dataclass
class Scores:
    """A step's raw scores (B,) and whether each response holds an EOS, with every rank's (world * B,),
    gathered once for the shaping, the logged reward and the histograms."""

    local: Tensor  # (B,)
    has_eos: Tensor  # (B,) bool
    all: Tensor  # (world * B,)
    all_has_eos: Tensor  # (world * B,) bool

    @classmethod
    def gather(cls, scores: Tensor, has_eos: Tensor, gather_rows: Callable[[Tensor], Tensor]) -> Scores:
        both = gather_rows(torch.stack([scores.float(), has_eos.to(scores.device).float()], dim=-1))
        return cls(scores, has_eos, both[:, 0], both[:, 1].bool())

    def everyone(self) -> tuple[Tensor, Tensor]:
        return self.all, self.all_has_eos


def _penalised(scores: Tensor, has_eos: Tensor, config: ShapingConfig) -> Tensor:
    if config.missing_eos_penalty is None:
        return scores
    return scores - torch.where(has_eos.to(scores.device), 0.0, config.missing_eos_penalty).to(scores)


def shape_scores(
    scores: Tensor,
    has_eos: Tensor,
    config: ShapingConfig,
    moments: RunningMoments,
    everyone: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Shaped scores (B,) from raw scores (B,) and whether each response holds an EOS (B,) bool.

    With score_scaling the moments are first updated with the penalised scores of every rank (`everyone`:
    all ranks' scores and EOS flags, so all ranks agree), then scores are divided by the running std (and
    centred on the running mean with score_norm), as TRL's `PPOTrainer.step`; clipping comes last.
    """
    scores = _penalised(scores, has_eos, config)
    if config.score_scaling:
        moments.update(_penalised(*everyone, config) if everyone is not None else scores)
        scale = moments.std + torch.finfo(scores.dtype).eps
        scores = (scores - moments.mean) / scale if config.score_norm else scores / scale
    if config.score_clip is not None:
        scores = scores.clamp(-config.score_clip, config.score_clip)
    return scores
