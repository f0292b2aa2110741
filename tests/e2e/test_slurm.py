"""SLURM: a signalled job saves, requeues and resumes by itself. The batch scripts against Lightning:
tests/unit/test_slurm_scripts.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import cli_seed_args

ROOT = Path(__file__).parents[2]
OPT_STEPS_PER_PPO_STEP = 8  # 4 PPO epochs x (16 / 8) minibatches
PPO_STEPS = 24
JOB_ID = "4242"


def slurm_env(tmp_path: Path) -> dict[str, str]:
    """A one-task SLURM job as `SLURMEnvironment.detect()` sees it; `scontrol` only records its calls."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    scontrol = stubs / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "ppo-test",  # not "bash" or "interactive", which Lightning ignores
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }


def job_command(run_dir: Path) -> list[str]:
    """What the batch scripts run, on the tiny config and the CPU."""
    return [
        sys.executable, "-m", "lightning_ppo", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        *cli_seed_args(),
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(PPO_STEPS),
        "--trainer.limit_val_batches", "0",
        "--data.batch_size", "16",
        "--model.ppo.mini_batch_size", "8",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir.parents[1]),
        "--trainer.logger.init_args.name", run_dir.parent.name,
        "--trainer.logger.init_args.version", JOB_ID,
    ]  # fmt: skip


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_a_signalled_job_saves_requeues_and_resumes(tiny_assets: Path, tmp_path: Path):
    env, run_dir = slurm_env(tmp_path), tmp_path / "runs" / "ppo-test" / f"version_{JOB_ID}"  # as the scripts
    log = tmp_path / "job.out"
    job = subprocess.Popen(job_command(run_dir), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (run_dir / "hparams.yaml").exists():  # written when training starts
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)  # SLURM's warning before the time limit
    while not (tmp_path / "scontrol.calls").exists():
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)  # SLURM ends the requeued job's first run
    job.wait()

    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", JOB_ID]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved_at = global_step(hpc)  # saved between two PPO steps, not in the middle of one
    assert 0 < saved_at < PPO_STEPS * OPT_STEPS_PER_PPO_STEP and saved_at % OPT_STEPS_PER_PPO_STEP == 0

    log = tmp_path / "requeued.out"
    requeued = subprocess.run(job_command(run_dir), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    assert requeued.returncode == 0, log.read_text()[-3000:]
    assert f"Restoring states from the checkpoint path at {hpc}" in log.read_text()
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == PPO_STEPS * OPT_STEPS_PER_PPO_STEP
