"""Peak memory and seconds of the PPO epochs in token-budget micro-batches against whole minibatches.

    python -m benchmarks.token_budget                                  # 4-layer shape, 256 and 1,008 tokens
    python -m benchmarks.token_budget --shape gpt2-124m --lengths 256  # GPT-2 (124M) shape; on a GPU as is

For each response length and `model.ppo.max_tokens_per_microbatch` (null, then each of --budgets), in a fresh
process of its own (so that each peak is its own): a synthetic experience of --rows rows (16-token prompts,
responses exactly that long, within GPT-2's 1,024 positions; random tokens, advantages and returns), one
PPO epoch over one minibatch of all rows (dropout off), once to warm up and once measured. Reported: the
update's seconds, its peak memory above what the process held before it (CPU: peak RSS; CUDA: peak
allocated), and the minibatch's `ppo/loss/total`, which must not depend on the budget.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from benchmarks.vllm_engine import SHAPES, build_gpt2_shaped
from lightning_ppo.experience import Experience
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.update import UpdateContext, ppo_epochs

PROMPT = 16


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def synthetic_experience(rows: int, length: int, vocab: int, device: str) -> Experience:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, PROMPT + length), generator=generator)
    per_token = [torch.randn(rows, length, generator=generator) for _ in range(4)]
    old_logprobs = -5 - per_token[0].abs()
    return Experience(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        response_start=PROMPT,
        response_mask=torch.ones(rows, length, device=device),
        old_logprobs=old_logprobs.to(device),
        ref_logprobs=old_logprobs.to(device),
        old_values=per_token[1].to(device),
        advantages=per_token[2].to(device),
        returns=per_token[3].to(device),
        prompt_pad=torch.zeros(rows, dtype=torch.long),
        response_len=torch.full((rows,), length),
    )


def run(policy: str, rows: int, length: int, budget: int | None) -> dict[str, Any]:
    """One cell, in this process: a warm-up update, then the measured one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ppo = PPOConfig(ppo_epochs=1, mini_batch_size=rows, max_tokens_per_microbatch=budget)
    torch.manual_seed(0)  # the same value head in every cell
    module = PPOModule(policy=policy, reward_model="tiny:reward", ppo=ppo, log_samples_every_n_steps=0)
    models = module.models
    models.policy.to(device).train()
    for layer in models.policy.modules():  # dropout off, so that the losses compare
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    optimizer = torch.optim.SGD(models.policy.parameters(), lr=0.0)  # the same weights for every cell
    experience = synthetic_experience(rows, length, models.policy.lm.config.vocab_size, device)

    def step(loss: torch.Tensor) -> None:
        optimizer.step()
        optimizer.zero_grad()

    context = UpdateContext(
        backward=lambda loss: loss.backward(),
        no_sync=lambda last: nullcontext(),
        optimizer_step=step,
        mean_over_ranks=lambda x: x,
        gradients=lambda: [p.grad for p in models.policy.parameters() if p.grad is not None],
    )
    before = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else rss_mb()
    ppo_epochs(models, experience, ppo, context)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stats = ppo_epochs(models, experience, ppo, context)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "length": length,
        "budget": budget,
        "seconds": seconds,
        "peak_mb": peak_mb() - before,
        "micro_batches": float(stats.get("tokens/micro_batches", torch.tensor(1.0))),
        "loss": float(stats["ppo/loss/total"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--rows", type=int, default=32, help="rows of the one minibatch")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1008])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 1024])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        shape = dict(SHAPES[args.shape])
        policy = build_gpt2_shaped(Path(scratch) / "policy", shape.pop("vocab"), **shape)
        results = []
        for length in args.lengths:
            for budget in [None, *args.budgets]:
                with ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn")
                ) as pool:  # a fresh process: its own peak
                    results.append(pool.submit(run, policy, args.rows, length, budget).result())
    print(f"machine: {platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads")
    print(
        f"shape {args.shape}, one minibatch of {args.rows} rows x ({PROMPT} + length) tokens, 1 PPO epoch\n"
    )
    print("| response tokens | max_tokens_per_microbatch | micro-batches | update | peak memory | loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        budget = "null" if r["budget"] is None else f"{r['budget']:,}"
        print(
            f"| {r['length']:,} | {budget} | {r['micro_batches']:.0f} | {r['seconds']:.2f} s | "
            f"{r['peak_mb']:,.0f} MiB | {r['loss']:.6f} |"
        )


if __name__ == "__main__":
    main()
