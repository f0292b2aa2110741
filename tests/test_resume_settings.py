"""Resuming with other settings: which changes take effect and which are refused, naming each."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from lightning_ppo.config import PPOConfig
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import ConfigError
from lightning_ppo.lora import LoraOptions
from lightning_ppo.module import PPOModule
from lightning_ppo.resume import IGNORED, REFUSED, SAFE, compare_settings, resume_changes
from lightning_ppo.rollout import SamplingConfig
from lightning_ppo.shaping import ShapingConfig

SECTIONS = {"ppo": PPOConfig, "sampling": SamplingConfig, "shaping": ShapingConfig, "lora": LoraOptions}

# ------------------------------------------------------------------------------------------------
# The pure comparison


def leaf_keys(cls: type, sections: dict[str, type]) -> set[str]:
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "reward"}
    keys = {name for name in names if name not in sections}
    for name in names & sections.keys():
        keys |= {f"{name}.{f.name}" for f in fields(sections[name])}
    return keys


def test_every_setting_is_either_safe_refused_or_ignored():
    settings = {"model": leaf_keys(PPOModule, SECTIONS), "data": leaf_keys(PromptDataModule, {})}
    for section, keys in settings.items():
        known = SAFE[section] | REFUSED[section].keys() | IGNORED[section]
        assert keys <= known, (section, keys - known)
        assert not SAFE[section] & REFUSED[section].keys()


SAVED_MODEL = {
    "policy": "tiny:policy",
    "learning_rate": 1e-3,
    "ppo": {"cliprange": 0.2, "advantage_estimator": "gae", "init_kl_coef": 0.05},
    "sampling": {"response_max_length": 15},
    "shaping": None,
    "lora": None,
    "critic": None,
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
}


def test_safe_changes_are_listed_leaf_by_leaf_and_nothing_else():
    requested = {
        **SAVED_MODEL,
        "learning_rate": 5e-4,
        "ppo": {**SAVED_MODEL["ppo"], "cliprange": 0.1},
        "shaping": ShapingConfig(score_clip=3.0),  # a null section is its defaults
        "reward": object(),  # not saved in checkpoints: not compared
        "_instantiator": None,
    }
    changes = compare_settings(SAVED_MODEL, requested, "model")
    assert [(c.key, c.old, c.new, c.refused) for c in changes] == [
        ("model.learning_rate", 1e-3, 5e-4, None),
        ("model.ppo.cliprange", 0.2, 0.1, None),
        ("model.shaping.score_clip", None, 3.0, None),
    ]
    assert resume_changes(SAVED_MODEL, requested) == changes
    assert resume_changes(SAVED_MODEL, dict(SAVED_MODEL)) == []
    assert changes[0].describe() == "model.learning_rate: 0.001 -> 0.0005"


def test_unsafe_changes_are_refused_in_one_message_naming_each_key_and_both_values():
    requested = {
        **SAVED_MODEL,
        "learning_rate": 5e-4,  # safe: not in the message
        "ppo": {**SAVED_MODEL["ppo"], "advantage_estimator": "grpo"},
        "lora": LoraOptions(r=4),
    }
    saved_data = {"batch_size": 16, "seed": 0, "val_size": 8, "tokenizer": "tiny:policy"}
    data = {"batch_size": 8, "seed": 0, "val_size": 4, "tokenizer": "elsewhere"}
    with pytest.raises(ConfigError) as error:
        resume_changes(SAVED_MODEL, requested, saved_data, data, "fit")
    message = str(error.value)
    assert "\n" not in message
    assert 'model.ppo.advantage_estimator (checkpoint "gae", requested "grpo"' in message
    assert 'model.lora (checkpoint null, requested {"r": 4' in message
    assert "data.batch_size (checkpoint 16, requested 8" in message
    for not_refused in ("learning_rate", "val_size", "tokenizer", "seed"):
        assert not_refused not in message.split(". To resume")[0]
    assert "--model.policy <log_dir>/export" in message and "without --ckpt_path" in message

    lora = compare_settings({"lora": {"r": 8, "dropout": 0.0}}, {"lora": {"r": 4, "dropout": 0.1}}, "model")
    assert [(c.key, bool(c.refused)) for c in lora] == [("model.lora.r", True), ("model.lora.dropout", False)]
    with pytest.raises(ConfigError, match=r"To test this checkpoint, give the checkpoint's values"):
        resume_changes(SAVED_MODEL, {**SAVED_MODEL, "policy": "other"}, command="test")
