"""The policy with its value head, the frozen reference, and how they are loaded."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import GELUTanh, NewGELUActivation

from lightning_ppo.loading import load_from_source


def load_tokenizer(source: str, key: str = "model.policy") -> PreTrainedTokenizerBase:
    """Load a tokenizer for left-padded batched generation; pad falls back to EOS as in the notebook."""
    tokenizer = load_from_source(AutoTokenizer.from_pretrained, source, key, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(source: str, key: str = "model.policy") -> PreTrainedModel:
    """Load any `AutoModelForCausalLM` by hub id or local folder (or a `tiny:` asset)."""
    lm = load_from_source(AutoModelForCausalLM.from_pretrained, source, key, "model")
    use_fused_gelu(lm)
    return lm


def use_fused_gelu(model: nn.Module) -> None:
    """Compute GPT-2's tanh-approximated GELU ("gelu_new") with torch's fused kernel.

    transformers spells it out in eight elementwise ops; `F.gelu(approximate="tanh")` is the same function
    (outputs differ by float rounding, ~2e-7) and was half of a tiny-model PPO step on CPU (profiler).
    """
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())


def disable_dropout_in_model(model: nn.Module) -> None:
    """Set every dropout probability to 0 so rollout and training passes agree exactly.

    "N+ implementation details of RLHF with PPO" (Huang et al. 2024), detail "disable dropout".
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def freeze(model: nn.Module) -> nn.Module:
    """Make `model` a frozen, eval-mode copy holder: no grads, no dropout."""
    model.requires_grad_(False)
    return model.eval()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the no-grad passes, then back to the model's mode.

    Besides dropout, this keeps generation's KV cache on under gradient checkpointing.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def make_reference(policy: PreTrainedModel) -> PreTrainedModel:
    """The frozen reference: an exact copy of the starting policy (the KL anchor)."""
    return freeze(copy.deepcopy(policy))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: `cumsum(mask) - 1`, 0 on pads. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def float32_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """`layer(x)` in float32 whatever the autocast or weight dtype (the gradient still reaches the weights).

    MiniMax-M1 (2025) traced sampling/training probability mismatch to a reduced-precision LM head.
    """
    bias = None if layer.bias is None else layer.bias.float()
    with torch.autocast(x.device.type, enabled=False):
        return nn.functional.linear(x.float(), layer.weight.float(), bias)


def response_logits(
    lm: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    float32_head: bool = False,
) -> tuple[Tensor, Tensor]:
    """Logits that predict the response tokens, and the hidden states they came from.

    Only the R response positions go through the LM head, never the prompt's (B, P, V) logits.
    `input_ids` is (B, P + R) with the response starting at column `response_start` = P.
    Returns logits (B, R, V) and hidden states (B, R, H). A LoRA `PeftModel` runs its own (adapted)
    layers: its wrapped LM's backbone holds the injected adapters. `float32_head` computes the LM head
    in float32 (float32 logits).
    """
    backbone = (lm.get_base_model() if isinstance(lm, PeftModel) else lm).base_model
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, P + R, H)
    hidden = hidden[:, response_start - 1 : -1]  # (B, R, H) the state before each response token
    head = lm.get_output_embeddings()
    return (float32_linear(head, hidden) if float32_head else head(hidden)), hidden


class PolicyWithValueHead(nn.Module):
    """A causal LM with a scalar value head on its last hidden state (TRL's ValueHead, no dropout).

    The value head reads the same hidden states as the LM head, so one forward pass gives the
    log-probs and the values (the "shared trunk" critic of the notebook). Without `value_head` (a
    separate critic gives the values) it returns no values.
    """

    def __init__(self, lm: PreTrainedModel, value_head: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.get_text_config().hidden_size, 1) if value_head else None
        self.float32_head = False  # compute the LM head and the value head in float32 (model.fp32_lm_head)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_start: int
    ) -> tuple[Tensor, Tensor | None]:
        """Response logits (B, R, V) and values (B, R) float32, or None without a value head."""
        logits, hidden = response_logits(
            self.lm, input_ids, attention_mask, response_start, self.float32_head
        )
        if self.v_head is None:
            return logits, None
        if self.float32_head:
            return logits, float32_linear(self.v_head, hidden).squeeze(-1)
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()
        return logits, values

    @torch.no_grad()
    def generate(self, **kwargs) -> Tensor:
        return self.lm.generate(**kwargs)
