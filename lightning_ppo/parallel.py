"""What changes when PPO runs on several devices: DDP gradient sync, the DeepSpeed config, ZeRO-3 generation.

The module calls these helpers with `self.trainer.strategy`; on a single device each one is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, ParallelStrategy, Strategy
from torch import nn

from lightning_ppo.errors import ConfigError


def no_backward_sync(strategy: Strategy | None, last_micro_batch: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-batch but the last of a minibatch.

    The gradients then accumulate locally and the last backward all-reduces their sum once. Lightning's
    `block_backward_sync` enters `DistributedDataParallel.no_sync` (a no-op for other strategies).
    """
    if last_micro_batch or not isinstance(strategy, ParallelStrategy):
        return nullcontext()
    return strategy.block_backward_sync()


def gather_rows(rows: list[Any]) -> list[Any]:
    """Every rank's rows, rank after rank (the local rows when not distributed); a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    per_rank: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, rows)
    return [row for rank_rows in per_rank for row in rank_rows]


def zero_stage(strategy: Strategy | None) -> int:
    """The ZeRO stage DeepSpeed runs with; 0 for any other strategy."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int((strategy.config or {}).get("zero_optimization", {}).get("stage", 0))


def clips_in_engine(strategy: Strategy | None) -> bool:
    """DeepSpeed clips in `engine.step()` from its config; Lightning's `clip_gradients` does nothing there."""
    return isinstance(strategy, DeepSpeedStrategy)


def configure_deepspeed(strategy: Strategy, max_grad_norm: float | None) -> None:
    """Write PPO's gradient clipping and step boundary into the DeepSpeed config, before the engine reads it.

    DeepSpeed clips inside `engine.step()` from its config (`self.clip_gradients` is a no-op under it), so
    `model.ppo.max_grad_norm` becomes `gradient_clipping`. PPO calls backward once per micro-batch and steps
    once per minibatch: `managed_gradient_accumulation: false` makes every `step()` the accumulation boundary
    instead of DeepSpeed's own micro-step counter (DeepSpeed `engine.step` docstring).
    """
    if not clips_in_engine(strategy):
        return
    if zero_stage(strategy) not in (2, 3):  # the unmanaged step boundary needs partitioned gradients
        raise ConfigError(
            f"DeepSpeed ZeRO stage {zero_stage(strategy)} is not supported: set "
            "trainer.strategy.init_args.stage to 2 or 3 (configs/deepspeed_zero2.yaml, deepspeed_zero3.yaml)"
        )
    config: dict[str, Any] = strategy.config
    wanted = max_grad_norm or 0.0  # DeepSpeed's "off"
    configured = config.setdefault("gradient_clipping", wanted)
    if configured != wanted:
        raise ConfigError(
            f"the DeepSpeed config sets gradient_clipping={configured} but model.ppo.max_grad_norm is "
            f"{max_grad_norm}: remove gradient_clipping from the DeepSpeed config and set "
            "model.ppo.max_grad_norm instead"
        )
    config["managed_gradient_accumulation"] = False


@contextmanager
def gathered_for_generation(strategy: Strategy | None, policy: nn.Module) -> Iterator[bool]:
    """Make the policy generate with whole weights; yields whether `generate` needs `synced_gpus=True`.

    Under ZeRO-3 every module forward all-gathers its weights and releases them afterwards, so sampling
    would gather the whole model once per token. Instead: gather the policy's weights once for the whole
    rollout and pause the engine's per-module hooks meanwhile (as TRL's `unwrap_model_for_generation`).
    Ranks may still generate different numbers of tokens, so they step together (`synced_gpus`).
    """
    if zero_stage(strategy) != 3:
        yield False
        return
    import deepspeed

    offload = _zero3_parameter_offload(strategy.model)
    with deepspeed.zero.GatheredParameters(list(policy.parameters())):
        _pause_zero3_hooks(offload)
        try:
            yield True
        finally:
            _resume_zero3_hooks(offload)


def _zero3_parameter_offload(engine: Any) -> Any:
    """The object that owns ZeRO-3's module hooks; None if the engine has none (hooks then stay on)."""
    optimizer = getattr(engine, "optimizer", None)
    return getattr(optimizer, "parameter_offload", optimizer)


def _pause_zero3_hooks(offload: Any) -> None:
    """Remove ZeRO-3's fetch/release hooks (trl/models/utils.py `remove_hooks`)."""
    if offload is None:
        return
    for param in offload.module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def _resume_zero3_hooks(offload: Any) -> None:
    """Register ZeRO-3's hooks again (trl/models/utils.py `add_hooks`)."""
    if offload is not None:
        offload._register_deepspeed_module(offload.module)
