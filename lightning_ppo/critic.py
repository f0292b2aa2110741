"""A separate critic: its own backbone and a fresh scalar head, instead of a value head on the policy trunk.

Newer TRL PPO (and "The N+ implementation details of RLHF with PPO", Huang et al. 2024) train the value
function as a separate model, initialised from the reward model. Values are per policy token, so the
critic reads the policy's token ids and must share the policy's tokenizer.
"""

from __future__ import annotations

import inspect

from torch import Tensor, nn
from transformers import AutoModel, PreTrainedTokenizerBase

from lightning_ppo.loading import ConfigError, load_from_source
from lightning_ppo.models import float32_linear, load_tokenizer, position_ids_from_mask

REWARD_MODEL = "reward_model"  # `model.critic` value meaning "start from model.reward_model"


class ValueModel(nn.Module):
    """Backbone (`AutoModel`, any LM head dropped) + linear head: a value for each response token."""

    def __init__(self, source: str, key: str = "model.critic") -> None:
        super().__init__()
        self.backbone = load_from_source(AutoModel.from_pretrained, source, key, "model")
        self.v_head = nn.Linear(self.backbone.config.get_text_config().hidden_size, 1)
        self._takes_positions = "position_ids" in inspect.signature(self.backbone.forward).parameters
        self.float32_head = False  # the head in float32 (model.fp32_lm_head)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_start: int) -> Tensor:
        """Values (B, R) float32 of the states before each response token, as the policy's value head."""
        extra = {"position_ids": position_ids_from_mask(attention_mask)} if self._takes_positions else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        hidden = hidden[:, response_start - 1 : -1]  # (B, R, H)
        if self.float32_head:
            return float32_linear(self.v_head, hidden).squeeze(-1)
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()


def build_critic(source: str, reward_source: str, policy_tokenizer: PreTrainedTokenizerBase) -> ValueModel:
    """The critic `model.critic` names ("reward_model": `model.reward_model`); refuses another vocabulary."""
    from_reward = source == REWARD_MODEL
    resolved, key = (reward_source, "model.reward_model") if from_reward else (source, "model.critic")
    if load_tokenizer(resolved, key).get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(
            f"model.critic={source!r} ({resolved}) has a different tokenizer from model.policy: a critic "
            "gives one value per policy token, so it must read the policy's token ids. Use a critic "
            "built on the policy's tokenizer (e.g. model.critic set to model.policy), or leave "
            "model.critic null for the value head on the policy."
        )
    return ValueModel(resolved, key)
