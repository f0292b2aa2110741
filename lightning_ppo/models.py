"""The models PPO reads: the policy with its value head, an optional separate critic, the frozen reference."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import GELUTanh, NewGELUActivation

from lightning_ppo.errors import ConfigError
from lightning_ppo.loading import load_from_source
from lightning_ppo.lora import LoraOptions, adapter_disabled, apply_lora

REWARD_MODEL = "reward_model"  # `model.critic` value meaning "start from model.reward_model"


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
    """Compute GPT-2's tanh-approximated GELU ("gelu_new") with torch's fused kernel, not transformers' eight
    elementwise ops: the same function (outputs differ by float rounding, ~2e-7), much faster on CPU."""
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
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the no-grad passes, then each model back to its mode.

    Besides dropout, this keeps generation's KV cache on under gradient checkpointing.
    """
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, was_training, strict=True):
            model.train(mode)


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


def response_states(
    hidden: Tensor, response_start: int | Tensor, response_width: int | None = None
) -> Tensor:
    """The hidden state before each response token: (B, L, H) -> (B, R, H).

    `response_start` is one column (the rollout layout, `response_width` then optional) or a (B,) tensor of
    them (packed rows, `lightning_ppo.packing`), which must give `response_width`."""
    if isinstance(response_start, int):
        end = hidden.shape[1] - 1 if response_width is None else response_start - 1 + response_width
        return hidden[:, response_start - 1 : end]
    if response_width is None:
        raise ValueError("response_states needs response_width with per-row response starts")
    offsets = torch.arange(response_width, device=hidden.device)  # (R,)
    columns = (response_start[:, None] - 1 + offsets).clamp(max=hidden.shape[1] - 1)  # (B, R)
    return hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, R, H)


def response_logits(
    lm: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int | Tensor,
    float32_head: bool = False,
    response_width: int | None = None,
    token_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits (B, R, V) of the response tokens and their hidden states (B, R, H); the prompt never goes
    through the LM head. `token_mask` (B, R) narrows it to its True positions, logits (n, V); `float32_head`
    computes it in float32. `input_ids` and `response_start` as in `response_states`."""
    backbone = (lm.get_base_model() if isinstance(lm, PeftModel) else lm).base_model
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (B, L, H)
    hidden = response_states(hidden, response_start, response_width)  # (B, R, H)
    head, head_input = lm.get_output_embeddings(), hidden if token_mask is None else hidden[token_mask]
    return (float32_linear(head, head_input) if float32_head else head(head_input)), hidden


class ValueHead(nn.Linear):
    """A scalar value for each hidden state (TRL's ValueHead without dropout): (B, R, H) -> (B, R) float32."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, 1)

    def forward(self, hidden: Tensor, float32: bool = False) -> Tensor:
        if float32:
            return float32_linear(self, hidden).squeeze(-1)
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1).float()


class PolicyWithValueHead(nn.Module):
    """A causal LM with a value head on its last hidden state (the notebook's shared-trunk critic).

    One forward pass gives the response logits and the values. Without `value_head` (a separate critic
    gives the values, or a critic-free estimator needs none) it returns no values.
    """

    def __init__(self, lm: PreTrainedModel, value_head: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.v_head = ValueHead(lm.config.get_text_config().hidden_size) if value_head else None
        self.float32_head = False  # compute the LM head and the value head in float32 (model.fp32_lm_head)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_start: int | Tensor,
        response_width: int | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Response logits (B, R, V) (or (n, V): `token_mask` as in `response_logits`) and values (B, R)
        float32, or None without a value head."""
        logits, hidden = response_logits(
            self.lm, input_ids, attention_mask, response_start, self.float32_head, response_width, token_mask
        )
        values = None if self.v_head is None else self.v_head(hidden, self.float32_head)
        return logits, values


class ValueModel(nn.Module):
    """A separate critic: a backbone (`AutoModel`, any LM head dropped) + a value head per response token.

    Newer TRL PPO and "The N+ implementation details of RLHF with PPO" (Huang et al. 2024) train the value
    function as its own model, initialised from the reward model. It reads the policy's token ids.
    """

    def __init__(self, source: str, key: str = "model.critic") -> None:
        super().__init__()
        self.backbone = load_from_source(AutoModel.from_pretrained, source, key, "model")
        self.v_head = ValueHead(self.backbone.config.get_text_config().hidden_size)
        self._takes_positions = "position_ids" in inspect.signature(self.backbone.forward).parameters
        self.float32_head = False  # the head in float32 (model.fp32_lm_head)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_start: int | Tensor,
        response_width: int | None = None,
    ) -> Tensor:
        """Values (B, R) float32 of the states before each response token, as the policy's value head."""
        extra = {"position_ids": position_ids_from_mask(attention_mask)} if self._takes_positions else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        states = response_states(hidden, response_start, response_width)  # (B, R, H)
        return self.v_head(states, self.float32_head)


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


class PPOModels:
    """What one PPO iteration reads: the trainable policy (with its value head), an optional critic, and the
    frozen reference (None with LoRA: the policy with its adapter disabled). Logits are divided by the
    sampling temperature, so that the log-probs are those of the distribution that was sampled."""

    def __init__(
        self,
        policy: PolicyWithValueHead,
        critic: ValueModel | None,
        reference: nn.Module | None,
        temperature: float,
    ) -> None:
        self.policy, self.critic, self.reference, self.temperature = policy, critic, reference, temperature

    def logits_and_values(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_start: int | Tensor,
        response_width: int | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Tempered response logits (B, R, V) and values (B, R): the policy's value head or the critic's.

        `response_start` and `response_width` as in `response_states`; with `token_mask` (B, R) the
        logits are (n, V), only at its n True positions (`response_logits`)."""
        logits, values = self.policy(input_ids, attention_mask, response_start, response_width, token_mask)
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask, response_start, response_width)
        return self.tempered(logits), values

    def reference_logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_start: int | Tensor,
        response_width: int | None = None,
        token_mask: Tensor | None = None,
    ) -> Tensor:
        """Tempered response logits (B, R, V) of the frozen starting policy ((n, V) with `token_mask`)."""
        with self.reference_lm() as reference:  # never around the policy's pass: it may disable LoRA
            logits, _ = response_logits(
                reference,
                input_ids,
                attention_mask,
                response_start,
                self.policy.float32_head,
                response_width,
                token_mask,
            )
        return self.tempered(logits)

    @contextmanager
    def reference_lm(self) -> Iterator[nn.Module]:
        """The frozen starting LM: the reference copy, or the LoRA policy with its adapter switched off."""
        if self.reference is not None:
            yield self.reference
            return
        with adapter_disabled(self.policy.lm) as lm:
            yield lm

    def tempered(self, logits: Tensor) -> Tensor:
        return logits if self.temperature == 1.0 else logits / self.temperature

    def use_float32_heads(self, on: bool) -> None:
        """The LM head and the value heads in float32, or in the weights' dtype (`model.fp32_lm_head`)."""
        self.policy.float32_head = on
        if self.critic is not None:
            self.critic.float32_head = on


class FrozenModels:
    """The reward model and the reference copy (None with LoRA), held outside the module's children: DDP and
    DeepSpeed wrap the whole LightningModule and would otherwise cast, shard (ZeRO-3) and checkpoint them."""

    def __init__(self, reward: nn.Module, reference: nn.Module | None) -> None:
        self.reward, self.reference = freeze(reward), reference

    def all(self) -> list[nn.Module]:
        return [self.reward] if self.reference is None else [self.reward, self.reference]

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """On `device`, in the policy's `dtype`: the reference computes what the starting policy did."""
        for model in self.all():
            model.to(device=device, dtype=dtype)

    def eval(self) -> None:
        for model in self.all():
            model.eval()


def build_models(
    policy: str,
    reward_model: str,
    lora: LoraOptions | None,
    critic: str | None,
    critic_free: bool,
    disable_dropout: bool,
    gradient_checkpointing: bool,
) -> tuple[PreTrainedTokenizerBase, PPOModels]:
    """The policy's tokenizer, and the trained and frozen models of a PPO run (temperature 1; the module
    sets the sampling one). Critic-free estimators get no value head; with LoRA, no reference copy."""
    tokenizer = load_tokenizer(policy)
    lm = load_causal_lm(policy)
    if disable_dropout:
        disable_dropout_in_model(lm)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None if lora else make_reference(lm)  # with LoRA: the policy with its adapter disabled
    value_head = critic is None and not critic_free
    trained = PolicyWithValueHead(apply_lora(lm, lora) if lora else lm, value_head=value_head)
    value_model = build_critic(critic, reward_model, tokenizer) if critic else None
    if value_model is not None and disable_dropout:
        disable_dropout_in_model(value_model)
    return tokenizer, PPOModels(trained, value_model, reference, temperature=1.0)
