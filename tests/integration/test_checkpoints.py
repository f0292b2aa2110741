"""Checkpoint files: a failed write leaves the previous one; checkpoints name their layout version (version
1, before the key existed, loads; a later one is refused); the callback's state key stays the one older
checkpoints were saved under."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_ppo.checkpointing import CHECKPOINT_VERSION, AtomicCheckpointIO, SafeCheckpoints
from lightning_ppo.config import PPOConfig
from lightning_ppo.errors import ConfigError
from lightning_ppo.module import PPOModule


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-write")


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path: Path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="mid-write"):
        io.save_checkpoint({"weights": torch.zeros(1000), "after": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture(scope="module")
def checkpoint(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What `on_save_checkpoint` adds to a plain state dict of a freshly built module."""
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward", ppo=PPOConfig(mini_batch_size=8))
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("ckpt") / "module.ckpt"
    torch.save(checkpoint, path)
    return torch.load(path, weights_only=False)


def test_a_checkpoint_records_its_layout_version(checkpoint: dict) -> None:
    assert checkpoint["lightning_ppo_version"] == CHECKPOINT_VERSION == 2


def test_a_checkpoint_from_before_the_version_key_loads(checkpoint: dict, tmp_path: Path) -> None:
    old = {k: v for k, v in checkpoint.items() if k != "lightning_ppo_version"}
    old["hyper_parameters"]["ppo"] = PPOConfig(mini_batch_size=8)
    for name in ("early_stopping", "target_kl", "whiten_rewards_masked"):  # fields added since version 1
        old["hyper_parameters"]["ppo"].__dict__.pop(name)
    torch.save(old, tmp_path / "old.ckpt")
    module = PPOModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=False)
    assert module.ppo.mini_batch_size == 8 and module.ppo.early_stopping is False  # the class default
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())


def test_a_checkpoint_of_a_later_layout_is_refused_with_its_version(checkpoint: dict, tmp_path: Path) -> None:
    torch.save({**checkpoint, "lightning_ppo_version": CHECKPOINT_VERSION + 1}, tmp_path / "new.ckpt")
    with pytest.raises(ConfigError, match=rf"version {CHECKPOINT_VERSION + 1}.*upgrade lightning-ppo"):
        PPOModule.load_from_checkpoint(tmp_path / "new.ckpt", weights_only=False)


def test_safe_checkpoints_keeps_the_state_key_checkpoints_were_saved_under(tmp_path: Path) -> None:
    """The callback was `FaultTolerance`: checkpoints hold its RNG states under that name, and resume."""
    options = dict(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer = lightning.Trainer(max_steps=1, callbacks=[SafeCheckpoints()], **options)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", weights_only=False)["callbacks"]
    assert list(saved["FaultTolerance"]) == ["rng_per_rank"]

    restored = []

    class Recording(SafeCheckpoints):
        def load_state_dict(self, state_dict: dict) -> None:
            restored.append(state_dict)
            super().load_state_dict(state_dict)

    resumed = lightning.Trainer(max_steps=2, callbacks=[Recording()], **options)
    resumed.fit(BoringModel(), ckpt_path=tmp_path / "one.ckpt")
    assert len(restored) == 1 and restored[0].keys() == saved["FaultTolerance"].keys()
