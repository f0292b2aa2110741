"""PPO fine-tuning of language models from a reward model, as a PyTorch Lightning app."""

from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.rollout import SamplingConfig

__all__ = ["PPOConfig", "PPOModule", "SamplingConfig"]
__version__ = "0.1.0"
