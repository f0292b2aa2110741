"""PPO fine-tuning of language models from a reward model, as a PyTorch Lightning app."""

from __future__ import annotations

from typing import Any

__all__ = ["PPOConfig", "PPOModule", "SamplingConfig"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: `python -m lightning_ppo --help` must not pay for torch and Lightning.
    if name in ("PPOConfig", "PPOModule"):
        from lightning_ppo import module

        return getattr(module, name)
    if name == "SamplingConfig":
        from lightning_ppo.rollout import SamplingConfig

        return SamplingConfig
    raise AttributeError(f"module 'lightning_ppo' has no attribute {name!r}")
