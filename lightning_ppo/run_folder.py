"""One live fit per run folder: a lock file naming its holder, and the sweep of a killed write's leftovers.

Two fits in one folder would overwrite each other's checkpoints; `<run folder>/.fit.lock` names its
holder (pid, host, start time, SLURM step), and a lock whose holder is gone is taken over with a note."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from lightning_ppo.errors import ConfigError

LOCK_NAME = ".fit.lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), telling a reused pid from its holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _me() -> dict[str, object]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "start_time": _start_time(pid),
        "slurm_job": f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '')}"
        if "SLURM_JOB_ID" in os.environ
        else None,
    }


def _holder_is_live(holder: dict[str, object], me: dict[str, object]) -> bool:
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return False  # the same SLURM job step, requeued: its old process is gone
    if holder.get("host") != me["host"]:
        return True  # cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == me["pid"] or not _is_alive(pid):
        return False
    started = _start_time(pid)
    return started is None or holder.get("start_time") in (None, started)


def acquire(folder: str | Path) -> Path:
    """Take the run folder's lock for this process; refuse (ConfigError) if a live fit holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock, me = folder / LOCK_NAME, _me()
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}  # vanished or half-written: its writer died before finishing two lines
            if holder and _holder_is_live(holder, me):
                raise ConfigError(
                    f"the run folder {folder} is in use by another fit (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, see {lock}): give this fit its own folder "
                    "(--trainer.logger.init_args.version or save_dir), or stop that run; if no run is "
                    f"using it (another machine's fit that was killed), delete {lock}"
                ) from None
            if holder:
                rank_zero_info(f"Taking over the lock of {folder} from pid {holder.get('pid')}, which ended.")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(me) + "\n")
        return lock


def release(lock: Path) -> None:
    """Remove the lock if this process still holds it."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def remove_temporary_checkpoints(folder: str | Path) -> None:
    """Delete `.NAME.PID.tmp` files that `AtomicCheckpointIO` left when a process was killed mid-write.

    Called with the run folder's lock held: no live process of this run is writing them.
    """
    leftovers = [path for path in Path(folder).glob(".*.tmp") if path.is_file()]
    if not leftovers:
        return
    size = sum(path.stat().st_size for path in leftovers)
    for path in leftovers:
        path.unlink(missing_ok=True)
    rank_zero_info(
        f"Removed {len(leftovers)} temporary checkpoint file(s) ({size / 2**20:.1f} MiB) that a killed write "
        f"left in {folder}."
    )
