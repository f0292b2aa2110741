"""The decoding loop against vLLM as the generation engine: rollout and whole-step seconds, peak memory.

    python -m benchmarks.vllm_engine                            # in the vLLM environment (docs/vllm.md)
    python -m benchmarks.vllm_engine --lengths 16 128 --steps 3 --batch-size 64
    python -m benchmarks.vllm_engine --shape gpt2-124m          # the GPT-2 (124M) shape (on a GPU: as is)
    OMP_NUM_THREADS=1 python -m benchmarks.vllm_engine --rounds 1   # a shared machine (docs/performance.md)

For each response length and `model.sampling.engine` ("loop", "vllm"), in a fresh process of its own (so
each peak RSS is its own): `--warmup` PPO steps, then `--steps` measured ones through `Trainer.fit`, every
response exactly that long (response_min_length = response_max_length; random weights rarely emit EOS).
Reported: the median `time/rollout` and `time/step` of the measured steps, the first step's rollout (vLLM:
building the engine and its warm-up), peak RSS (CUDA: peak allocated), and vLLM's `rollout/logprob_diff`;
`--rounds` runs every cell that often, in turn, and keeps each cell's fastest run.
Each step is seeded by its index, so both engines see the same prompts. Shapes: `small` (4 layers, 192
wide, 4,096 tokens) and `gpt2-124m` (12 layers, 768 wide, 50,257 tokens), random weights and a word-level
tokenizer saved to a temp folder.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.step_time import StepTimes, fit_steps, peak_memory_mb
from lightning_ppo.data import PromptDataModule
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.rollout import SamplingConfig, VLLMOptions
from lightning_ppo.tiny import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, make_policy_tokenizer

SHAPES = {"small": dict(n_layer=4, n_embd=192, n_head=4, vocab=4096), "gpt2-124m": dict(vocab=50257)}
ENGINES = ("loop", "vllm")


def build_gpt2_shaped(directory: Path, vocab: int, **config: int) -> str:
    """A GPT-2-shaped policy (random weights) with a word-level tokenizer of `vocab` entries."""
    words = [*POSITIVE_WORDS, *NEGATIVE_WORDS, *NEUTRAL_WORDS]
    words += [f"w{i}" for i in range((vocab - 2) // 2 - len(words))]  # each word twice: bare and "Ġ"-led
    tokenizer = make_policy_tokenizer(words)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, **config)
    ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


class SeededStepTimes(StepTimes):
    """`StepTimes` records plus the `rollout/*` metrics; each step seeded by its index (same prompts)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(batch_idx)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        rollout = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("rollout/")}
        self.steps[-1].update(rollout)


def run(policy: str, engine: str, length: int, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    """`warmup + steps` PPO steps in this fresh process; medians of the measured steps, peak memory."""
    torch.manual_seed(0)
    sampling = SamplingConfig(
        response_min_length=length,
        response_max_length=length,
        engine=engine,
        vllm=VLLMOptions(cpu_kv_cache_gib=1.0),
    )
    module = PPOModule(
        policy=policy,
        reward_model="tiny:reward",
        ppo=PPOConfig(ppo_epochs=1, mini_batch_size=batch_size),
        sampling=sampling,
        log_samples_every_n_steps=0,
    )
    data = PromptDataModule(dataset="tiny:reviews", tokenizer=policy, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as root:
        records = fit_steps(module, data, steps + warmup, 0, root, timer=SeededStepTimes())
    measured = records[warmup:]
    return {
        "engine": engine,
        "length": length,
        "first_rollout": records[0]["time/rollout"],
        "rollout": statistics.median(r["time/rollout"] for r in measured),
        "step": statistics.median(r["time/step"] for r in measured),
        "logprob_diff": max((r.get("rollout/logprob_diff", float("nan")) for r in measured), default=None),
        "peak_mb": peak_memory_mb(),
    }


def rollout_sweep(policy: str, lengths: list[int], batch_size: int, repeats: int) -> list[dict[str, Any]]:
    """Rollout seconds only, both engines in this one process, calls alternated (loop, vllm, loop, ...) so
    that a shared machine's interference falls on both alike; each engine's fastest of `repeats` calls."""
    from lightning_ppo.generation import build_engine
    from lightning_ppo.models import load_causal_lm, load_tokenizer

    lm, tokenizer = load_causal_lm(policy).eval(), load_tokenizer(policy)
    texts = [
        f"{POSITIVE_WORDS[i % len(POSITIVE_WORDS)]} {NEUTRAL_WORDS[i % len(NEUTRAL_WORDS)]}"
        for i in range(batch_size)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id
    engines = {name: build_engine(SamplingConfig(engine=name), lm, eos, eos) for name in ENGINES}
    results = []
    for length in lengths:
        config = SamplingConfig(response_min_length=length, response_max_length=length)
        lengths_ = torch.full((batch_size,), length)
        times: dict[str, list[float]] = {name: [] for name in ENGINES}
        for _ in range(repeats + 1):  # the first call of each is a warm-up
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.sample(lm, batch["input_ids"], batch["attention_mask"], lengths_, config)
                times[name].append(time.perf_counter() - start)
        results += [{"engine": n, "length": length, "rollout": min(t[1:])} for n, t in times.items()]
    return results


def table(results: list[dict[str, Any]], batch_size: int) -> str:
    lines = [
        f"| {batch_size} prompts x length | engine | rollout | whole step | first rollout | peak memory "
        "| logprob_diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = "" if r["engine"] == "loop" else f"{r['logprob_diff']:.1e}"
        lines.append(
            f"| {r['length']} | {r['engine']} | {r['rollout']:.3f} s | {r['step']:.3f} s "
            f"| {r['first_rollout']:.2f} s | {r['peak_mb']:,.0f} MiB | {diff} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="measured PPO steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="PPO steps before them (vLLM's warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every cell, in turn; the fastest kept")
    parser.add_argument("--rollout-only", action="store_true", help="both engines in one process, alternated")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    print(f"{args.shape} GPT-2 shape, {args.batch_size} prompts, torch {torch.__version__}, {device}")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        shape = dict(SHAPES[args.shape])
        policy = build_gpt2_shaped(Path(folder), shape.pop("vocab"), **shape)
        if args.rollout_only:
            for r in rollout_sweep(policy, args.lengths, args.batch_size, repeats=3):
                print(f"| {r['length']} | {r['engine']} | {r['rollout']:.3f} s |")
            return
        spawn = multiprocessing.get_context("spawn")
        for _ in range(args.rounds):
            for length in args.lengths:
                for engine in args.engines:
                    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                        job = pool.submit(
                            run, policy, engine, length, args.batch_size, args.steps, args.warmup
                        )
                        results.append(job.result())
                    print(results[-1], flush=True)
    print(table(fastest(results), args.batch_size))


def fastest(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cell's fastest round (by whole-step time): on a shared VM interference only ever adds time."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in results:
        key = (r["engine"], r["length"])
        if key not in best or r["step"] < best[key]["step"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["length"], ENGINES.index(r["engine"])))


if __name__ == "__main__":
    main()
