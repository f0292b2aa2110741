"""Resuming, the rules without a fit: each setting is safe, refused or ignored, and a refusal names the
keys; a restored loader hands out the rest of its epoch. The resumed fits are in tests/e2e/test_resume.py."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
from torch.utils.data import Dataset

from lightning_ppo.config import PPOConfig
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import ConfigError
from lightning_ppo.lora import LoraOptions
from lightning_ppo.module import PPOModule
from lightning_ppo.resumable import resumable_loader
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


# ------------------------------------------------------------------------------------------------
# The loader's position


class Numbers(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


def test_a_restored_loader_hands_out_the_rest_of_its_epoch_once():
    loader = resumable_loader(Numbers(), batch_size=4, seed=3, world={})
    loader.sampler.set_epoch(2)
    full_epoch = [batch.tolist() for batch in loader]
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()

    restored = resumable_loader(Numbers(), batch_size=4, seed=3, world={})
    restored.load_state_dict(state)
    restored.sampler.set_epoch(2)
    rest = [batch.tolist() for batch in restored]
    assert seen + rest == full_epoch
    assert len(restored) == len(full_epoch)  # Lightning counts the epoch's length from the start
    assert [batch.tolist() for batch in restored] == full_epoch  # the skip applies to one pass only

    restored.load_state_dict(state)
    restored.sampler.set_epoch(3)  # a state from another epoch is not applied
    assert len([batch for batch in restored]) == len(full_epoch)


def test_ranks_share_an_epoch_without_overlap():
    shares = [resumable_loader(Numbers(), 4, 0, {"num_replicas": 2, "rank": rank}) for rank in (0, 1)]
    indices = [sorted(i for batch in loader for i in batch.tolist()) for loader in shares]
    assert not set(indices[0]) & set(indices[1])
    assert sorted(indices[0] + indices[1]) == list(range(40))
