"""The Lightning internals in `lightning_ppo/compat.py` still exist and mean what we read them for.

Fails loudly on a Lightning upgrade that moves them: then mend `compat.py`, the one place that reads them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_ppo.compat import cluster_environment, logging_step


def test_logging_step_counts_the_training_batches_that_stepped(tmp_path: Path) -> None:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    assert logging_step(trainer) == 0
    trainer.fit(BoringModel())
    assert logging_step(trainer) == 3 == trainer.global_step


def test_cluster_environment_is_found_on_a_single_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(cluster_environment(Trainer(accelerator="cpu", logger=False)), LightningEnvironment)
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "ppo", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    assert isinstance(cluster_environment(trainer), SLURMEnvironment)
