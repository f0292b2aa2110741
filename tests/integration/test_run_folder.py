"""One live fit per run folder: a lock naming its holder, stale locks taken over, killed writes swept."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ppo import cli, run_folder
from lightning_ppo.errors import ConfigError
from tests.helpers import TINY, cli_seed_args


def start_time(pid: int) -> str:
    """The process's start time as the lock records it: field 22 of /proc/<pid>/stat (Linux)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def write_lock(folder: Path, pid: int, **fields: object) -> Path:
    """The lock file `acquire` writes, as process `pid` on this host would have written it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / run_folder.LOCK_NAME
    holder = {"pid": pid, "host": socket.gethostname(), "slurm_job": None, **fields}
    if "start_time" not in holder:
        holder["start_time"] = start_time(pid)
    lock.write_text(json.dumps(holder) + "\n")
    return lock


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def test_the_lock_names_this_process_as_the_test_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`write_lock` writes what `acquire` does, so the tests below fake real holders."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = run_folder.acquire(tmp_path)
    assert json.loads(lock.read_text()) == json.loads(write_lock(tmp_path / "mine", os.getpid()).read_text())
    run_folder.release(lock)


def test_a_live_holder_is_refused_and_named(tmp_path: Path, live_process: subprocess.Popen):
    write_lock(tmp_path, live_process.pid)
    with pytest.raises(ConfigError, match=rf"in use by another fit \(pid {live_process.pid} on"):
        run_folder.acquire(tmp_path)


def test_a_lock_whose_holder_ended_is_taken_over(tmp_path: Path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    write_lock(tmp_path, int(ended.stdout), start_time=None)  # its /proc entry is gone
    lock = run_folder.acquire(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    run_folder.release(lock)
    assert not lock.exists()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path: Path, live_process: subprocess.Popen):
    write_lock(tmp_path, live_process.pid, start_time="1")  # the pid now belongs to a later process
    run_folder.release(run_folder.acquire(tmp_path))


def test_the_same_slurm_job_step_requeued_takes_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    write_lock(tmp_path, 1, host="another-node", slurm_job="4242.0")  # the job's last run, elsewhere
    run_folder.release(run_folder.acquire(tmp_path))
    write_lock(tmp_path, 1, host="another-node", slurm_job="777.0")  # another job's: cannot be checked
    with pytest.raises(ConfigError, match="delete"):
        run_folder.acquire(tmp_path)


def test_this_process_own_leftover_lock_is_taken_over(tmp_path: Path):
    run_folder.acquire(tmp_path)  # an in-process fit that raised before releasing it
    run_folder.release(run_folder.acquire(tmp_path))
    assert not (tmp_path / run_folder.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_fit_refuses_a_folder_in_use_then_takes_it_over_and_sweeps_killed_writes(
    tiny_assets: Path, tmp_path: Path, live_process: subprocess.Popen, capsys: pytest.CaptureFixture[str]
):
    version = tmp_path / "tiny" / "version_0"
    lock = write_lock(version, live_process.pid)
    leftover = version / "checkpoints" / ".last.ckpt.12345.tmp"  # a write killed mid-file
    leftover.parent.mkdir()
    leftover.write_bytes(b"\0" * 4096)
    args = [
        "fit", "--config", TINY, *cli_seed_args(), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.version", "0",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        cli.run(args)
    assert refused.value.code == cli.CONFIG_ERROR_EXIT_CODE
    message = capsys.readouterr().err
    assert f"{version} is in use by another fit (pid {live_process.pid}" in message, message
    assert not (version / "config.yaml").exists() and leftover.exists()  # the live run's files untouched

    live_process.kill()
    live_process.wait()
    cli.run(args)
    assert not leftover.exists()
    assert (version / "checkpoints" / "last.ckpt").exists() and (version / "config.yaml").exists()
    assert not lock.exists()  # released when the fit ended
