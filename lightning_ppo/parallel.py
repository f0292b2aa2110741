"""What changes when PPO runs on several devices: DDP gradient sync, the DeepSpeed config and strategies
(GPU and CPU), ZeRO-3 generation, export and evaluation from a ZeRO-3 checkpoint.

The module calls these helpers with `self.trainer.strategy`; on a single device each one is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, ParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lightning_ppo.config import PPOConfig
from lightning_ppo.errors import ConfigError


class PPODeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy` that can also `test`/`predict` from a ZeRO-3 checkpoint folder.

    DeepSpeed cannot load one without an optimizer (deepspeedai/DeepSpeed#7272): outside `fit` the folder is
    consolidated into fp32 weights (zero_to_fp32) that every rank loads gathered."""

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict:
        if self._evaluates_zero3_folder(checkpoint_path):
            return consolidate_zero_checkpoint(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self.zero_stage_3 and not self.load_full_weights and "state_dict" in checkpoint:
            load_whole_weights(self.lightning_module, checkpoint["state_dict"])
        else:
            super().load_model_state_dict(checkpoint, strict)

    def _evaluates_zero3_folder(self, checkpoint_path: str | Path) -> bool:
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        full_weights = self.load_full_weights or not Path(checkpoint_path).is_dir()
        return self.zero_stage_3 and not fitting and not full_weights


class CPUDeepSpeedStrategy(PPODeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy` on CPU processes (oneCCL, else gloo): `trainer.accelerator: cpu`,
    `trainer.strategy: {class_path: lightning_ppo.parallel.CPUDeepSpeedStrategy, init_args: {stage: 2}}`.
    Devices are named `cpu:0..N-1`: Lightning and `deepspeed.initialize` reject a CPU device's index None."""

    def setup_environment(self) -> None:
        devices = self.parallel_devices or []  # Lightning's accelerator connector has set them by now
        self.parallel_devices = [torch.device("cpu", index) for index in range(len(devices))]
        _skip_shared_memory_comm_build()
        super(DeepSpeedStrategy, self).setup_environment()  # DDPStrategy's: DeepSpeedStrategy's is CUDA-only


CPU_DEEPSPEED = "lightning_ppo.parallel.CPUDeepSpeedStrategy"
LIGHTNING_DEEPSPEED = ("lightning.pytorch.strategies.DeepSpeedStrategy", "DeepSpeedStrategy")


def on_cpu(accelerator: Any) -> bool:
    """Whether a `trainer.accelerator` config value means CPU processes ("auto" does without CUDA)."""
    if isinstance(accelerator, str):
        return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return "CPUAccelerator" in str(getattr(accelerator, "class_path", type(accelerator).__name__))


def cpu_deepspeed_config(strategy: Any) -> dict[str, Any] | None:
    """`CPUDeepSpeedStrategy` as {"class_path", "init_args"} for Lightning's DeepSpeed names (`deepspeed`,
    `deepspeed_stage_3`, its class path, ...), else None: Lightning's own runs on CUDA only."""
    if isinstance(strategy, str):
        from lightning.pytorch.strategies import StrategyRegistry

        # not `StrategyRegistry.get`: it builds the strategy
        if strategy not in StrategyRegistry.available_strategies():
            return None
        entry = StrategyRegistry[strategy]
        if entry["strategy"] is not DeepSpeedStrategy:
            return None
        return {"class_path": CPU_DEEPSPEED, "init_args": dict(entry["init_params"])}
    class_path = getattr(strategy, "class_path", None)
    if class_path in LIGHTNING_DEEPSPEED:
        init_args = getattr(strategy, "init_args", None)
        return {"class_path": CPU_DEEPSPEED, "init_args": dict(vars(init_args)) if init_args else {}}
    return None


def _skip_shared_memory_comm_build() -> None:
    """Keep DeepSpeed's comm backend from JIT-compiling its shared-memory op (about 150 s of g++ on 2 cores).

    Only `inference_all_reduce` uses the op; without it DeepSpeed falls back to the process group's
    all-reduce (deepspeed/comm/torch.py `build_shm_op` builds only ops marked compatible).
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def consolidate_zero_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint folder (ZeRO-2 or 3) as one Lightning checkpoint: full fp32 weights, on CPU.

    The weights come from DeepSpeed's zero_to_fp32; the rest (hyper-parameters, loops, callbacks, the
    module's own keys) is the client state DeepSpeed saved beside rank 0's shard.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files

    folder = Path(folder)
    tag = (folder / "latest").read_text().strip()
    rank0_states = get_model_state_files(str(folder / tag))[0]
    checkpoint = torch.load(rank0_states, map_location="cpu", weights_only=False)
    for deepspeed_key in ("module", "optimizer", "lr_scheduler"):  # the shards' own, not Lightning's
        checkpoint.pop(deepspeed_key, None)
    checkpoint["state_dict"] = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return checkpoint


def load_whole_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load full weights into a ZeRO-3 partitioned module; a collective (every rank holds `state_dict`).

    Rank 0's copy is what every rank keeps (`modifier_rank=0` re-partitions it from there).
    """
    import deepspeed

    expected = module.state_dict().keys()  # tied weights under each of their names, as in the checkpoint
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise KeyError(
            f"checkpoint and model differ: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.copy_(state_dict[name])
    for name, buffer in module.named_buffers():
        if name in state_dict:
            buffer.copy_(state_dict[name])


@contextmanager
def whole_parameters(strategy: Strategy | None, module: nn.Module) -> Iterator[None]:
    """Under ZeRO-3, gather `module`'s partitioned parameters for reading; a collective: every rank enters."""
    if zero_stage(strategy) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        yield


def no_backward_sync(strategy: Strategy | None, last_micro_batch: bool) -> AbstractContextManager:
    """Skip DDP's gradient all-reduce on every micro-batch but the last of a minibatch.

    The gradients then accumulate locally and the last backward all-reduces their sum once. Lightning's
    `block_backward_sync` enters `DistributedDataParallel.no_sync` (a no-op for other strategies); ZeRO-2/3
    reduce every backward into their partitions, and DeepSpeed's `no_sync` refuses them.
    """
    if last_micro_batch or not isinstance(strategy, ParallelStrategy) or clips_in_engine(strategy):
        return nullcontext()
    return strategy.block_backward_sync()


def max_over_ranks(strategy: Strategy, count: int) -> int:
    """The largest `count` over the ranks (the count itself when not distributed); a collective."""
    return int(strategy.reduce(torch.tensor(count, device=strategy.root_device), reduce_op="max"))


def local_gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """This rank's gradients of the optimizer's parameters, those that have one."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def gather_rows(rows: list[Any]) -> list[Any]:
    """Every rank's rows, rank after rank (the local rows when not distributed); a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    per_rank: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, rows)
    return [row for rank_rows in per_rank for row in rank_rows]


def gather_flat(strategy: Strategy, x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` (N, ...), stacked rank after rank into one (world * N, ...); a collective."""
    return strategy.all_gather(x).reshape(-1, *x.shape[1:])


def zero_stage(strategy: Strategy | None) -> int:
    """The ZeRO stage DeepSpeed runs with; 0 for any other strategy."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int((strategy.config or {}).get("zero_optimization", {}).get("stage", 0))


def clips_in_engine(strategy: Strategy | None) -> bool:
    """DeepSpeed clips in `engine.step()` from its config; Lightning's `clip_gradients` does nothing there."""
    return isinstance(strategy, DeepSpeedStrategy)


def configure_deepspeed(strategy: Strategy, ppo: PPOConfig) -> None:
    """Write PPO's gradient clipping, step boundary and micro-batch into the DeepSpeed config before the
    engine reads it: DeepSpeed clips in `engine.step()`, every `step()` is a boundary (PPO steps once per
    minibatch), and `test` has no train dataloader to give the micro-batch size."""
    if not clips_in_engine(strategy):
        return
    max_grad_norm, micro_batch_size = ppo.max_grad_norm, ppo.mini_batch_size
    if zero_stage(strategy) not in (2, 3):  # the unmanaged step boundary needs partitioned gradients
        raise ConfigError(
            f"DeepSpeed ZeRO stage {zero_stage(strategy)} is not supported: set "
            "trainer.strategy.init_args.stage to 2 or 3 (configs/deepspeed_zero2.yaml, deepspeed_zero3.yaml)"
        )
    several = {
        "model.ppo.max_tokens_per_microbatch": ppo.max_tokens_per_microbatch is not None,
        "model.ppo.gradient_accumulation_steps": ppo.gradient_accumulation_steps > 1,
    }
    if zero_stage(strategy) == 3 and any(several.values()):
        # measured: on 2 CPU ranks a ZeRO-3 step over micro-batches left other weights than the uncut one
        key = next(name for name, is_set in several.items() if is_set)
        raise ConfigError(
            f"{key} is not supported with DeepSpeed ZeRO-3: a ZeRO-3 step over several backwards did not "
            "reproduce the one-backward gradient in this project's tests; use ZeRO-2 "
            "(configs/deepspeed_zero2.yaml), or one backward per optimizer step (budget null, "
            "gradient_accumulation_steps 1, a smaller model.ppo.mini_batch_size)"
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
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    # Lightning's default; its ZeRO-3 `test`/`predict` engine reads it even from a user's `config`
    config.setdefault("zero_allow_untested_optimizer", True)


@contextmanager
def gathered_for_generation(strategy: Strategy | None, policy: nn.Module) -> Iterator[bool]:
    """Make the policy generate with whole weights; yields whether `generate` needs `synced_gpus=True`.

    Under ZeRO-3 the weights are gathered once per rollout rather than per token, the engine's hooks paused
    (TRL's `unwrap_model_for_generation`); ranks step together, as their lengths differ."""
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
