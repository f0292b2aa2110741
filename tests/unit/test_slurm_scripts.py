"""The SLURM batch scripts agree with the trainer arguments they launch, so Lightning's SLURM environment
matches the job (the signalled, requeued run is in tests/e2e/test_slurm.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_a_batch_script_matches_its_trainer_arguments(script: Path):
    text = script.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.MULTILINE))
    assert text.splitlines()[1].endswith(f"sbatch slurm/{script.name}")  # starts with how to submit it
    assert directives["ntasks-per-node"] == re.search(r"--trainer.devices (\d+)", text).group(1)
    assert directives["nodes"] == re.search(r"--trainer.num_nodes (\d+)", text).group(1)
    assert directives["signal"] == "SIGUSR1@90" and "requeue" in directives
    assert directives["output"] == "slurm/logs/%x-%j.out"
    assert "srun python -m lightning_ppo fit" in text
