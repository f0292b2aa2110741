"""Advantage estimators side by side, in one run on this machine: memory, step time, and tiny-demo reward.

    python -m benchmarks.estimators              # about 2 minutes on 2 idle CPU cores
    python -m benchmarks.estimators --steps 2 --demo-steps 6

1. GPT-2 shape (4 layers, 192 wide, 4,096-token vocabulary, random weights; `padding_free.SHAPES["small"]`):
   whole PPO steps through `Trainer.fit` (`step_time.fit_steps`), one fresh process per variant so that
   each peak RSS is its own: gae with the value head on the policy, gae with a separate critic (a second
   copy of the trunk: what the critic-free estimators save), grpo, rloo and reinforce_pp. Every variant
   samples `--k` responses for each of `--prompts` prompts, one minibatch of all rows per optimizer step.
2. Tiny demo (`configs/tiny.yaml`): `--demo-steps` PPO steps per variant through the CLI, same prompts and
   k; env/reward_mean from TensorBoard, first step and mean of the last three.
grpo runs with its KL in the loss (GRPO's, kl_loss_coef 0.04); the others keep it in the reward.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from benchmarks.padding_free import SHAPES, build_gpt2_shaped
from benchmarks.step_time import fit_steps
from lightning_ppo.data import PromptDataModule
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.rollout import SamplingConfig

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")

# name -> (model.ppo.advantage_estimator, model.ppo.kl_in, separate critic)
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "gae": ("gae", "reward", False),
    "gae + critic": ("gae", "reward", True),
    "grpo": ("grpo", "loss", False),
    "rloo": ("rloo", "reward", False),
    "reinforce_pp": ("reinforce_pp", "reward", False),
}


def run_variant(policy: str, variant: str, prompts: int, k: int, steps: int, warmup: int) -> dict[str, Any]:
    """`warmup + steps` PPO steps in this fresh process: median s/step and peak RSS (MiB)."""
    estimator, kl_in, critic = VARIANTS[variant]
    torch.manual_seed(0)
    module = PPOModule(
        policy=policy,
        reward_model="tiny:reward",
        ppo=PPOConfig(mini_batch_size=prompts * k, advantage_estimator=estimator, kl_in=kl_in),
        sampling=SamplingConfig(num_samples_per_prompt=k),
        critic=policy if critic else None,
        log_samples_every_n_steps=0,
    )
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    data = PromptDataModule(dataset="tiny:reviews", tokenizer=policy, batch_size=prompts)
    with tempfile.TemporaryDirectory() as root:
        records = fit_steps(module, data, steps, warmup, root)
    return {
        "s_per_step": statistics.median(r["step"] for r in records),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "trainable": trainable,
    }


def demo_fit_args(
    root: str, steps: int, prompts: int, k: int, estimator: str, kl_in: str, critic: bool = False
) -> list[str]:
    """CLI arguments of a `steps`-step tiny-demo fit (`configs/tiny.yaml`) with this estimator: k samples
    for each of `prompts` prompts, one minibatch of all rows per optimizer step, logs under `root`."""
    return [
        "fit", "--config", TINY, "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(steps), "--trainer.limit_val_batches", "0",
        "--model.log_samples_every_n_steps", "0",
        "--data.batch_size", str(prompts), "--model.ppo.mini_batch_size", str(prompts * k),
        "--model.sampling.num_samples_per_prompt", str(k),
        "--model.ppo.advantage_estimator", estimator, "--model.ppo.kl_in", kl_in,
        *(["--model.critic", "tiny:policy"] if critic else []),
        "--trainer.logger.init_args.save_dir", root,
    ]  # fmt: skip


def demo_rewards(variant: str, prompts: int, k: int, steps: int) -> list[float]:
    """env/reward_mean of each step of a tiny-demo fit (`configs/tiny.yaml`) with this variant."""
    from lightning_ppo.cli import main  # in the fresh process only

    estimator, kl_in, critic = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as root:
        cli = main(demo_fit_args(root, steps, prompts, k, estimator, kl_in, critic))
        events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
        events.Reload()
        return [e.value for e in events.Scalars("env/reward_mean")]


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a spawned process of its own (its own peak RSS, no state shared)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32, help="prompts per PPO step on the GPT-2 shape")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=2, help="measured PPO steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--demo-prompts", type=int, default=8, help="prompts per PPO step on the tiny demo")
    parser.add_argument("--demo-steps", type=int, default=10)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    start = time.perf_counter()
    shape, demo = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        policy = build_gpt2_shaped(Path(scratch) / "small", **SHAPES["small"])
        for name in VARIANTS:
            shape[name] = in_fresh_process(
                run_variant, policy, name, args.prompts, args.k, args.steps, args.warmup
            )
            print(f"GPT-2 shape, {name}: {shape[name]}", flush=True)
    for name in VARIANTS:
        demo[name] = in_fresh_process(demo_rewards, name, args.demo_prompts, args.k, args.demo_steps)
        print(f"tiny demo, {name}: env/reward_mean {[round(r, 3) for r in demo[name]]}", flush=True)
    print(
        f"\nGPT-2 shape {SHAPES['small']}: {args.prompts} prompts x {args.k} samples per step, median of "
        f"{args.steps} steps after {args.warmup} warm-up; tiny demo: {args.demo_prompts} prompts x {args.k}, "
        f"reward (env/reward_mean) at step 1 and mean of steps {args.demo_steps - 2}-{args.demo_steps}"
    )
    print(f"  {'variant':14s}{'s/step':>9s}{'peak RSS MiB':>14s}{'trainable':>12s}{'reward 1st':>12s}"
          f"{'reward last 3':>15s}")  # fmt: skip
    for name in VARIANTS:
        s, rewards = shape[name], demo[name]
        print(f"  {name:14s}{s['s_per_step']:9.2f}{s['peak_rss_mb']:14.0f}{s['trainable']:12,d}"
              f"{rewards[0]:12.2f}{statistics.mean(rewards[-3:]):15.2f}")  # fmt: skip
    print(f"\n({time.perf_counter() - start:.0f} s; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")  # fmt: skip


if __name__ == "__main__":
    main()
