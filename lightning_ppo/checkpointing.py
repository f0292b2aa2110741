"""Never lose a run: atomic checkpoint files, RNG states in checkpoints, signals handled between PPO steps.

A checkpoint taken by this callback's rules always holds the state between two PPO steps, so a resumed
run continues as if it had never stopped (same prompts, same sampling noise, same updates).
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_ppo.compat import cluster_environment
from lightning_ppo.config import PPOConfig
from lightning_ppo.errors import ConfigError, DiskFullError
from lightning_ppo.lora import LoraOptions
from lightning_ppo.resume import check_resumed_settings
from lightning_ppo.rollout import SamplingConfig, VLLMOptions
from lightning_ppo.shaping import ShapingConfig

# A fit stopped by SIGTERM (scancel, a preempting scheduler, Kubernetes, `docker stop`) exits with the
# shell's code for death by that signal, after saving `last.ckpt`: not 0, which would report success.
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM

# The layout of what `PPOModule` adds to a checkpoint. 1: before lightning-ppo 0.2 (no version key);
# 2: the same keys, now versioned. A checkpoint of a later layout is refused with its version named.
CHECKPOINT_VERSION = 2

# Checkpoints are loaded weights-only (`read_checkpoint`); older ones pickled these option classes in their
# hyper-parameters (PPOConfig also under the name `lightning_ppo.module.PPOConfig`), so allow them by name.
_OPTION_CLASSES = [PPOConfig, SamplingConfig, VLLMOptions, ShapingConfig, LoraOptions]
torch.serialization.add_safe_globals([*_OPTION_CLASSES, (PPOConfig, "lightning_ppo.module.PPOConfig")])


def check_checkpoint_version(version: int) -> None:
    """Refuse a checkpoint written in a layout this version of lightning-ppo cannot read."""
    if version > CHECKPOINT_VERSION:
        raise ConfigError(
            f"--ckpt_path: the checkpoint has lightning-ppo checkpoint version {version}, but this "
            f"lightning-ppo reads versions 1 to {CHECKPOINT_VERSION}: upgrade lightning-ppo to load it"
        )


LIGHTNING_KEYWORDS = ("last", "hpc", "registry")  # `--ckpt_path` values Lightning resolves itself


def read_checkpoint(
    path: str | Path,
    map_location: str | Callable | None = "cpu",
    weights_only: bool = True,
    mmap: bool = False,
    unsafe_advice: str = "if you trust its source, pass --weights_only false",
) -> dict[str, Any]:
    """`torch.load` of a checkpoint file, weights-only by default, so that a checkpoint cannot run code.

    A damaged file, or one weights-only loading refuses (`unsafe_advice` says what to do), is a `ConfigError`
    naming it and the checkpoints beside it; it is never retried with unsafe loading."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ckpt_path {str(path)!r}: no such checkpoint file ({path.absolute()})")
    if path.stat().st_size == 0:
        reason = "it is empty (0 bytes)"
    elif not zipfile.is_zipfile(path):  # what torch.save writes, since torch 1.6
        reason = "it is not a zip archive, as torch.save writes"
    else:
        try:
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
        except pickle.UnpicklingError as error:
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if refused:
                raise ConfigError(
                    f"--ckpt_path {str(path)!r}: the checkpoint holds {refused.group(1)}, which loading with "
                    f"weights_only=True refuses (unpickling it could run code); {unsafe_advice}"
                ) from error
            reason = _first_sentence(error)
        except (EOFError, RuntimeError, KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
            reason = _first_sentence(error)
    raise ConfigError(unreadable_checkpoint_message(path, reason))


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"torch.load said: {text.split('. ')[0][:200]}"


def unreadable_checkpoint_message(path: Path, reason: str) -> str:
    """The paragraph for a damaged checkpoint: which file, why, and which checkpoints to use instead."""
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p.name != path.name and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if others:
        names = ", ".join(p.name for p in others[:5])
        instead = (
            f"Use the previous checkpoint instead, e.g. --ckpt_path {others[0]} (the newest other "
            f"one in {path.parent}, newest first: {names})"
        )
    else:
        instead = f"No other checkpoint is in {path.parent}: use an earlier copy or start without --ckpt_path"
    return (
        f"--ckpt_path {str(path)!r} cannot be read as a checkpoint: {reason}. The file is damaged or not a "
        f"checkpoint. {instead}."
    )


def intact_checkpoint(path: Path) -> str | None:
    """After a failed write of `path`: its previous version (the rename never happened), else the newest
    other checkpoint in its folder, else None."""
    if path.is_file():
        return str(path)
    others = [p for p in path.parent.glob("*.ckpt") if not p.name.startswith(".")]
    return str(max(others, key=lambda p: p.stat().st_mtime)) if others else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it in place.

    A process killed mid-write leaves the previous file intact. Lightning's own save stages the file in
    the system temp folder and moves it, which is a plain (interruptible) copy when that is another disk.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so same file system
        try:
            with tmp.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # atomic on POSIX
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(str(path), intact_checkpoint(path)) from error
            raise

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Weights-only unless `weights_only=False` is asked for; a damaged local file is a `ConfigError`."""
        if "://" in str(path):  # remote (fsspec): Lightning's own loading
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location, weights_only is not False)


def collect_rng_states() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python RNG states, in checkpoint-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])


class SafeCheckpoints(Callback):
    """Atomic checkpoint files, every rank's RNG states, validation on a side RNG stream, and signals held
    until the step ends: SIGUSR1 requeues (SLURM), Ctrl-C and SIGTERM save `last.ckpt` first, a second one
    interrupts at once (docs/reliability.md). A fit always ends with an up-to-date `last.ckpt`."""

    def __init__(self) -> None:
        self._rng_to_restore: dict[str, Any] | None = None
        self._rng_before_validation: dict[str, Any] | None = None
        self._held_handlers: dict[int, Any] = {}
        self._pending: set[int] = set()
        self._launcher: Any = None
        self._last_saved_step = -1

    @property
    def state_key(self) -> str:
        return "FaultTolerance"  # the class's former name, under which checkpoints hold its state

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own plugin stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    # ----------------------------------------------------------------------------------------------
    # RNG states: saved for every rank, restored just before the first resumed training step

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states()
        if dist.is_available() and dist.is_initialized():
            per_rank: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, states)
            return {"rng_per_rank": per_rank}
        return {"rng_per_rank": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict["rng_per_rank"]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # a different world size cannot continue every stream; rank 0's is the best available
        self._rng_to_restore = per_rank[rank] if rank < len(per_rank) else per_rank[0]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._hold_signals(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rng_before_validation = collect_rng_states()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._rng_before_validation is not None:
            restore_rng_states(self._rng_before_validation)
            self._rng_before_validation = None

    # ----------------------------------------------------------------------------------------------
    # Signals held until the PPO step ends

    def _hold_signals(self, trainer: Trainer) -> None:
        self._launcher = trainer.strategy.launcher if hasattr(trainer.strategy.launcher, "kill") else None
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._held_handlers[signal.SIGINT] = signal.default_int_handler
        environment = cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            requeue = environment.requeue_signal
            self._held_handlers[requeue] = signal.getsignal(requeue)  # Lightning's save-and-requeue
        else:
            self._held_handlers[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)  # restored at teardown
        for signum in self._held_handlers:
            signal.signal(signum, self._hold)

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signum in self._pending:
            self._held_handlers[signum](signum, frame)  # second Ctrl-C: KeyboardInterrupt now
        if signum == signal.SIGTERM and signum in self._pending:
            if self._launcher is not None:  # processes it started would wait for this one forever
                self._launcher.kill(signal.SIGKILL)
            raise SystemExit(TERMINATED_EXIT_CODE)
        rank_zero_info(
            f"Received {signal.Signals(signum).name}: stopping when this PPO step ends and its checkpoint "
            "is saved (send it again to stop at once)."
        )
        self._pending.add(signum)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for signum in list(self._held_handlers):
            # every rank must act on the same step: any rank that got the signal decides for all
            if not trainer.strategy.reduce_boolean_decision(signum in self._pending, all=False):
                continue
            self._pending.discard(signum)
            if signum == signal.SIGINT:
                # not `should_stop`: that ends the epoch, and a checkpoint of it would skip the rest
                self._save_last(trainer)
                raise KeyboardInterrupt
            if signum == signal.SIGTERM:
                self._save_last(trainer)
                rank_zero_info(f"Saved the checkpoint after SIGTERM; exiting with {TERMINATED_EXIT_CODE}.")
                raise SystemExit(TERMINATED_EXIT_CODE)
            else:
                self._held_handlers[signum](signum, None)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._last_saved_step = checkpoint["global_step"]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_saved_step != trainer.global_step:
            self._save_last(trainer)

    def _save_last(self, trainer: Trainer) -> None:
        """Save `last.ckpt` beside the ModelCheckpoint's files; nothing when checkpointing is off."""
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            name = checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION
            # claimed as its own (also in the saved state), ModelCheckpoint later overwrites this file
            # instead of writing `last-v1.ckpt` beside it
            checkpoint.last_model_path = os.path.join(checkpoint.dirpath, name)
            trainer.save_checkpoint(checkpoint.last_model_path, weights_only=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning has put back the handlers from before the fit already, unless it left ours
        for signum, handler in self._held_handlers.items():
            if signal.getsignal(signum) == self._hold:
                signal.signal(signum, handler)
        self._held_handlers, self._pending = {}, set()


def frozen_state_keys(module: LightningModule) -> set[str]:
    """Frozen weights of a module's registered models: a LoRA policy's base (tied names included). The
    reference and the reward model are not registered, so they are never in the state dict."""
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return frozen & module.state_dict().keys()


def save_training_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """What a PPO checkpoint holds beyond Lightning's: the KL controller and score moments; frozen weights
    (a LoRA policy's base) are left out, as they are rebuilt from their source on load."""
    state = checkpoint["state_dict"]
    for key in frozen_state_keys(module) & state.keys():
        del state[key]
    checkpoint["lightning_ppo_version"] = CHECKPOINT_VERSION
    checkpoint["kl_controller"] = module.kl_ctl.state_dict()
    checkpoint["score_moments"] = module.score_moments.state_dict()


def load_training_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """Check the checkpoint's layout and the resumed run's settings (`lightning_ppo.resume`, before the
    weights: a refusal, not a shape error); then restore what `save_training_state` added."""
    check_checkpoint_version(checkpoint.get("lightning_ppo_version", 1))
    changes = check_resumed_settings(module, checkpoint)  # a changed init_kl_coef sets a new KL start
    if "state_dict" in checkpoint:  # a DeepSpeed client state has none: the engine restores the weights
        frozen = frozen_state_keys(module)
        checkpoint["state_dict"].update({k: v for k, v in module.state_dict().items() if k in frozen})
    if "kl_controller" in checkpoint:
        module.kl_ctl.load_state_dict(checkpoint["kl_controller"])
    if "model.ppo.init_kl_coef" in {change.key for change in changes}:
        module.kl_ctl.value = module.ppo.init_kl_coef  # a new coefficient to start from, adaptive or fixed
    if "score_moments" in checkpoint:
        module.score_moments.load_state_dict(checkpoint["score_moments"])
