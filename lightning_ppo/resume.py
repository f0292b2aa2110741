"""Resuming with other settings: which changed keys take effect and which a resumed run must refuse.

`resume_changes` compares a checkpoint's saved settings with the loading run's: a key in `SAFE` takes effect;
one in `REFUSED`, or unknown, is refused, its state built for the old value. docs/resume.md lists both."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any

from lightning_ppo.config import PPOConfig
from lightning_ppo.errors import ConfigError
from lightning_ppo.rollout import SamplingConfig
from lightning_ppo.shaping import ShapingConfig

# model.* and data.* keys (without the prefix) whose change a resumed run honours
SAFE = {
    "model": {
        "reward_batch_size",
        "learning_rate",
        "critic_learning_rate",
        "forward_batch_size",
        "gradient_checkpointing",
        "disable_dropout",
        "log_samples_every_n_steps",
        "num_log_samples",
        "max_consecutive_bad_steps",
        "fp32_lm_head",
        "lora.dropout",
        *(f"ppo.{f.name}" for f in fields(PPOConfig) if f.name != "advantage_estimator"),
        *(f"sampling.{f.name}" for f in fields(SamplingConfig)),
        *(f"shaping.{f.name}" for f in fields(ShapingConfig)),
    },
    "data": {
        "eval_batch_size",
        "val_size",
        "test_size",
        "predict_file",
        "predict_prompt_max_tokens",
        "num_workers",
    },
}

# the keys a resumed run refuses to change, and why
_WEIGHTS = "the checkpoint's weights belong to it"
_LORA = "the checkpoint holds an adapter of this layout and scale"
_PROMPTS = "the rest of the epoch's prompts would differ from the ones the checkpoint has yet to see"
REFUSED = {
    "model": {
        "policy": _WEIGHTS,
        "reward_model": "it is what the run optimises (and a critic may start from it)",
        "reward_label": "it is what the run optimises",
        "critic": "it decides whether the checkpoint holds a separate critic and which",
        "lora": "it decides whether the checkpoint holds a LoRA adapter or the whole policy",
        "lora.r": _LORA,
        "lora.alpha": _LORA,
        "lora.target_modules": _LORA,
        "lora.bias": _LORA,
        "ppo.advantage_estimator": "it decides whether the checkpoint holds a value head",
    },
    "data": {
        "dataset": _PROMPTS,
        "text_column": _PROMPTS,
        "train_split": _PROMPTS,
        "eval_split": _PROMPTS,
        "eval_fraction": _PROMPTS,
        "min_text_length": _PROMPTS,
        "prompt_min_tokens": _PROMPTS,
        "prompt_max_tokens": _PROMPTS,
        "batch_size": _PROMPTS,
        "seed": _PROMPTS,
    },
}

# not compared: data.tokenizer is model.policy's (the CLI links them)
IGNORED = {"model": set(), "data": {"tokenizer"}}

# a null section means its dataclass's defaults
_SECTION_DEFAULTS = {"ppo": PPOConfig, "sampling": SamplingConfig, "shaping": ShapingConfig}


@dataclass(frozen=True)
class Change:
    """A setting whose value differs between the checkpoint and this run."""

    key: str  # e.g. "model.ppo.cliprange"
    old: Any  # the checkpoint's value
    new: Any  # this run's value
    refused: str | None  # why it cannot change on resume; None: it takes effect

    def describe(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def compare_settings(saved: Mapping[str, Any], requested: Mapping[str, Any], section: str) -> list[Change]:
    """The changes from `saved` to `requested` settings of `section` ("model" or "data"), key by key.

    Nested settings (ppo, sampling, shaping, lora) are compared leaf by leaf; keys missing on either side
    (written by another version of lightning-ppo) and private keys (`_instantiator`) are not compared.
    """
    saved, requested = _plain(saved), _plain(requested)
    if section == "model":
        saved, requested = _with_section_defaults(saved), _with_section_defaults(requested)
    changes = []
    for key, old, new in _differences(saved, requested, ""):
        if key in IGNORED[section]:
            continue
        refused = None if key in SAFE[section] else REFUSED[section].get(key, "lightning-ppo does not know")
        changes.append(Change(f"{section}.{key}", old, new, refused))
    return changes


def resume_changes(
    saved_model: Mapping[str, Any],
    model: Mapping[str, Any],
    saved_data: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    command: str = "fit",
) -> list[Change]:
    """The changed settings that take effect; raises `ConfigError` naming every one that cannot.

    `saved_data`/`data` are compared when both are given (a fit: the data position is in the checkpoint).
    `command` picks the advice given.
    """
    changes = compare_settings(saved_model, model, "model")
    if saved_data is not None and data is not None:
        changes += compare_settings(saved_data, data, "data")
    refused = [change for change in changes if change.refused]
    if refused:
        raise ConfigError(refusal(refused, command))
    return changes


def refusal(refused: list[Change], command: str) -> str:
    """One paragraph: each refused key with both values and why, then what to do instead."""
    what = "; ".join(
        f"{c.key} (checkpoint {_show(c.old)}, requested {_show(c.new)}: {c.refused})" for c in refused
    )
    same = (
        "give the checkpoint's values (the config.yaml beside the checkpoint's checkpoints/ folder holds "
        "them, e.g. --config <log_dir>/config.yaml)"
    )
    if command == "fit":
        advice = (
            f"To resume, {same}. To train with the new values from the tuned weights, start a new fit "
            "without --ckpt_path and with --model.policy <log_dir>/export (every fit writes it at its end; "
            "for any checkpoint: python -m lightning_ppo export --ckpt_path CKPT --output_dir DIR, then "
            "--model.policy DIR, or DIR/merged after export --merge of a LoRA policy): the value head, the "
            "optimizer, the KL coefficient and the epoch then start afresh (docs/resume.md)"
        )
    else:
        advice = f"To {command} this checkpoint, {same} (docs/resume.md)"
    return (
        f"--ckpt_path: the checkpoint was written with other values of settings that cannot change when it "
        f"is loaded: {what}. {advice}"
    )


def _differences(saved: Mapping[str, Any], requested: Mapping[str, Any], prefix: str) -> Iterator[tuple]:
    for key, old in saved.items():
        if key.startswith("_") or key not in requested:
            continue
        new, name = requested[key], f"{prefix}{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            yield from _differences(old, new, f"{name}.")
        elif old != new:
            yield name, old, new


def _plain(value: Any) -> Any:
    """Dataclasses, jsonargparse Namespaces and mappings as nested dicts."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    elif hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _with_section_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        key: asdict(_SECTION_DEFAULTS[key]()) if value is None and key in _SECTION_DEFAULTS else value
        for key, value in settings.items()
    }


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_resumed_settings(module: Any, checkpoint: dict[str, Any]) -> list[Change]:
    """Compare a module's settings with its checkpoint's: refuse the ones that cannot change, and print
    (rank 0) the ones that take effect. A fit compares the data module's too."""
    saved = checkpoint.get("hyper_parameters")
    if not saved:
        return []
    trainer = module._trainer
    command = str(trainer.state.fn.value) if trainer is not None and trainer.state.fn else "fit"
    datamodule = getattr(trainer, "datamodule", None) if command == "fit" else None
    saved_data = checkpoint.get("datamodule_hyper_parameters") if datamodule is not None else None
    data = datamodule.hparams if saved_data is not None else None
    changes = resume_changes(saved, module.hparams, saved_data, data, command)
    if trainer is None or trainer.is_global_zero:
        for change in changes:
            print(f"lightning-ppo: changed since the checkpoint, in effect: {change.describe()}")
    return changes
