"""LoRA policies: only adapter (and value-head) weights train; the reference is the adapter switched off.

With LoRA no second copy of the policy is held for the KL penalty: the reference log-probs come from
the same network inside `peft_model.disable_adapter()`, which is exactly the frozen starting model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from lightning_ppo.errors import ConfigError, check_number


@dataclass
class LoraOptions:
    """LoRA adapter settings (peft's `LoraConfig`); the base model is frozen, only the adapter trains.

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator: the update is multiplied by alpha / r.
        dropout: Dropout on the adapter input; 0 keeps the first PPO ratio exactly 1.
        target_modules: Module names to adapt, or "all-linear" for every linear layer but the output one.
        bias: Which biases train: none, all or lora_only.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default="all-linear")
    bias: str = "none"

    def __post_init__(self) -> None:
        check_number("model.lora.r", self.r, 1, integer=True)
        check_number("model.lora.alpha", self.alpha, 0, open_low=True)
        check_number("model.lora.dropout", self.dropout, 0, 1, open_high=True)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"model.lora.bias must be none, all or lora_only, got {self.bias!r}")


def apply_lora(lm: PreTrainedModel, options: LoraOptions) -> PeftModel:
    """Wrap `lm` in a LoRA PeftModel: base weights frozen in place, fresh adapter weights trainable."""
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        bias=options.bias,
    )
    with warnings.catch_warnings():
        # peft notices GPT-2's Conv1D layers and sets fan_in_fan_out itself, warning each time
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        return get_peft_model(lm, config)


def is_lora(lm: nn.Module) -> bool:
    return isinstance(lm, PeftModel)


@contextmanager
def adapter_disabled(lm: nn.Module) -> Iterator[nn.Module]:
    """Inside, `lm` computes the starting model (its LoRA adapter is switched off); no-op without LoRA."""
    with lm.disable_adapter() if is_lora(lm) else nullcontext():
        yield lm


def adapts_tied_output_layer(policy: PeftModel) -> bool:
    """Whether the adapter sits on an output layer that shares its weight with the input embeddings."""
    lm = policy.get_base_model()
    output = lm.get_output_embeddings()
    tied = output is not None and lm.get_input_embeddings().weight is output.weight
    return tied and isinstance(output, BaseTunerLayer)


def save_policy(policy: nn.Module, out_dir: str | Path, merge: bool = False) -> list[Path]:
    """Save a policy LM (`PPOModule.policy.lm`) for use outside training; returns the folders written.

    A LoRA policy writes its adapter to `out_dir` and with `merge` the merged model to `out_dir/merged`,
    leaving the training model untouched; a plain policy is saved whole."""
    out_dir = Path(out_dir)
    if merge and is_lora(policy) and adapts_tied_output_layer(policy):
        raise ConfigError(
            "cannot merge a LoRA adapter on an output layer tied to the input embeddings "
            "(model.lora.target_modules includes it): merging would change the embeddings too. Export "
            "the adapter without merging, or train without the output layer in model.lora.target_modules."
        )
    policy.save_pretrained(out_dir)
    written = [out_dir]
    if merge and is_lora(policy):
        merged = copy.deepcopy(policy).merge_and_unload()
        merged.save_pretrained(out_dir / "merged")
        written.append(out_dir / "merged")
    return written
