"""Padding-free PPO steps: decode and step time with each switch on and off, in one run on this machine.

    python -m benchmarks.padding_free                    # tiny and the 4-layer GPT-2 shape, ~6 minutes
    python -m benchmarks.padding_free --gpt2-124m        # also the GPT-2 (124M) shape: ~35 minutes more
    python -m benchmarks.padding_free --models tiny small --rollout-only   # the rollout table only, ~1 minute
    python -m benchmarks.padding_free --models small --variants both --bucket-sweep 3 6 8   # length buckets

For each model, at the same batch of prompts and drawn lengths:
1. rollout only: seconds of `PPOModule._sample` and decoded positions (useful vs computed) for each
   `model.sampling.engine`: "generate" (one `generate` call per batch, the old behaviour) and "loop";
2. whole PPO steps through `Trainer.fit` (`limit_train_batches`), one fresh process per variant so that
   each peak RSS is its own: the module's logged `time/*` phases with `time/other`, which add up to
   `time/step`; decode and update padding waste (`tokens/*`); peak RSS. Each step is seeded by its index
   (the same prompts and drawn lengths for every variant), and `--rounds` repeats the variants in turn;
   the table keeps each step's fastest round (this VM's speed drifts by 10-15% between processes doing
   identical work, and interference only ever adds time), with the plain median of all runs below it.
A variant is a name and the `PPOModule` keyword arguments it changes (`VARIANTS`): "baseline" is the
behaviour before issue 13 (one `generate` call, padded update), then each change alone and both. Models:
`tiny` (offline tiny assets), `small` (4 layers, 192 wide, 4,096-token vocabulary) and `gpt2-124m` (12
layers, 768 wide, 50,257 tokens); GPT-2 shapes have random weights and a word-level tokenizer, saved to a
temp folder and loaded by path.
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.step_time import StepTimes, fit_steps
from lightning_ppo.data import PromptDataModule
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.rollout import Rollout, SamplingConfig, draw_response_lengths
from lightning_ppo.tiny import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, make_policy_tokenizer

SHAPES = {"small": dict(n_layer=4, n_embd=192, n_head=4, vocab=4096), "gpt2-124m": dict(vocab=50257)}

# name -> PPOModule keyword arguments ("ppo": PPOConfig fields); "baseline" is the old behaviour of every
# switch.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": dict(sampling=SamplingConfig(engine="generate"), ppo=dict(packing=False)),
    "decode loop": dict(sampling=SamplingConfig(engine="loop"), ppo=dict(packing=False)),
    "packed update": dict(sampling=SamplingConfig(engine="generate"), ppo=dict(packing=True)),
    "both": dict(sampling=SamplingConfig(engine="loop"), ppo=dict(packing=True)),
}

PHASES = ("time/rollout", "time/reward", "time/forward", "time/optimize")


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


class CountingModule(PPOModule):
    """The trainer's module, recording each training rollout's decoded and useful positions."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.decode_counts: list[tuple[int, int]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._in_training_step = True
        try:
            super().training_step(batch, batch_idx)
        finally:
            self._in_training_step = False

    def generate_rollout(
        self, model: torch.nn.Module, batch: dict[str, Any], lengths: torch.Tensor
    ) -> Rollout:
        rollout = super().generate_rollout(model, batch, lengths)
        if getattr(self, "_in_training_step", False):
            self.decode_counts.append((rollout.decoded_positions, rollout.useful_positions))
        return rollout


class DecodeCountingTimes(StepTimes):
    """`step_time.StepTimes` records, plus the decoded and useful positions of the step's rollout.

    Each step starts from the seed of its index, so every variant draws the same response lengths for the
    same prompts at every step (the decoders consume the random stream differently while sampling).
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(batch_idx)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.steps[-1]["decoded"], self.steps[-1]["useful"] = pl_module.decode_counts[-1]


def run_variant(policy: str, batch_size: int, steps: int, warmup: int, module_kwargs: dict[str, Any]) -> dict:
    """`warmup + steps` PPO steps through `Trainer.fit` in this fresh process; step records, peak RSS."""
    torch.manual_seed(0)
    module_kwargs = dict(module_kwargs)
    module = CountingModule(
        policy=policy,
        reward_model="tiny:reward",
        ppo=PPOConfig(mini_batch_size=batch_size, **module_kwargs.pop("ppo", {})),
        log_samples_every_n_steps=0,
        **module_kwargs,
    )
    data = PromptDataModule(dataset="tiny:reviews", tokenizer=policy, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as root:
        records = fit_steps(module, data, steps, warmup, root, timer=DecodeCountingTimes())
    return {
        "steps": records,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }


def rollout_sweep(
    policy: str, batch_size: int, decoders: list[str], repeats: int
) -> dict[str, dict[str, float]]:
    """Median seconds and decode counts of one rollout per `model.sampling.engine`, taking turns."""
    torch.manual_seed(0)
    module = PPOModule(policy=policy, reward_model="tiny:reward", log_samples_every_n_steps=0)
    data = PromptDataModule(dataset="tiny:reviews", tokenizer=policy, batch_size=batch_size)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    lengths = draw_response_lengths(batch_size, module.sampling, module.device)
    default = module.sampling
    seconds: dict[str, list[float]] = {k: [] for k in decoders}
    counts: dict[str, tuple[int, int]] = {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for k in decoders:
            module.sampling = replace(default, engine=k)
            start = time.perf_counter()
            rollout = module.generate_rollout(module.policy.lm, batch, lengths)
            if round_:
                seconds[k].append(time.perf_counter() - start)
            counts[k] = (rollout.decoded_positions, rollout.useful_positions)
    module.sampling = default
    return {
        k: {"s": statistics.median(seconds[k]), "decoded": counts[k][0], "useful": counts[k][1]}
        for k in decoders
    }


def median(records: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in records)


def report_model(name: str, policy: str, args: argparse.Namespace, steps: int) -> None:
    load = os.getloadavg()[0]
    sweep = rollout_sweep(policy, args.batch_size, args.decoders, args.rollout_repeats)
    base = sweep[args.decoders[0]]
    print(f"\n== {name}: batch {args.batch_size}, {steps} measured steps after {args.warmup} warm-up")
    print(f"rollout only (median of {args.rollout_repeats}; decoded positions: useful / computed, waste; "
          f"1-min load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)")  # fmt: skip
    for k, r in sweep.items():
        waste = 1 - r["useful"] / r["decoded"]
        print(f"  decoder={k:9s} {r['s']:7.3f} s  x{base['s'] / r['s']:4.2f}  "
              f"{r['useful']:5d} / {r['decoded']:5d}  waste {waste:5.1%}")  # fmt: skip
    if args.rollout_only:
        return
    context = multiprocessing.get_context("spawn")
    rounds: dict[str, list[list[dict]]] = {v: [] for v in args.variants}  # each round's step records
    peak_rss = dict.fromkeys(args.variants, 0.0)
    for _ in range(args.rounds):  # variants take turns, so a slow spell of the machine hits them alike
        for variant in args.variants:
            with ProcessPoolExecutor(1, mp_context=context) as pool:  # fresh process: its own peak RSS
                run = pool.submit(
                    run_variant, policy, args.batch_size, steps, args.warmup, VARIANTS[variant]
                ).result()
            rounds[variant].append(run["steps"])
            peak_rss[variant] = max(peak_rss[variant], run["peak_rss_mb"])
    # step i of every round ran the same prompts and drawn lengths: keep its fastest run, whole (its
    # phases still add up), then the median over the steps
    best = {
        v: [min(runs, key=lambda r: r["time/step"]) for runs in zip(*rs, strict=True)]
        for v, rs in rounds.items()
    }
    print(f"whole PPO step through Trainer.fit: each step's fastest of {args.rounds} rounds, median of")
    print(f"{steps} steps, in s (the module's time/* scalars: the phases and time/other add up to time/step,")
    print("the interval between two steps' logging points)")
    print(f"  {'':16s}" + "".join(f"{v:>16s}" for v in best))
    for key in (*PHASES, "time/other", "time/step"):
        row = [median(records, key) for records in best.values()]
        print(f"  {key:16s}" + "".join(f"{t:16.3f}" for t in row))
    updates = [median(records, "tokens/update_waste") for records in best.values()]
    print(f"  {'update waste':16s}" + "".join(f"{w:16.1%}" for w in updates))
    wastes = [
        1 - sum(r["useful"] for r in records) / sum(r["decoded"] for r in records)
        for records in best.values()
    ]
    print(f"  {'decode waste':16s}" + "".join(f"{w:16.1%}" for w in wastes))
    print(f"  {'peak RSS MiB':16s}" + "".join(f"{peak_rss[v]:16.0f}" for v in best))
    first = median(best[args.variants[0]], "time/step")
    print(f"  {'speed-up':16s}" + "".join(f"{first / median(r, 'time/step'):15.2f}x" for r in best.values()))
    # the same ratio from the median of every step of every round, for comparison
    pooled = {v: [r for run in rs for r in run] for v, rs in rounds.items()}
    first = median(pooled[args.variants[0]], "time/step")
    print(f"  {'all-runs median':16s}" + "".join(f"{median(r, 'time/step'):16.3f}" for r in pooled.values()))
    print(
        f"  {'its speed-up':16s}"
        + "".join(f"{first / median(r, 'time/step'):15.2f}x" for r in pooled.values())
    )
    print(f"  (1-min load average {os.getloadavg()[0]:.2f} after the variants)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", choices=("tiny", "small", "gpt2-124m"), default=["tiny", "small"]
    )
    parser.add_argument("--gpt2-124m", action="store_true", help="add the GPT-2 (124M) shape (slow)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="measured PPO steps per variant (after warm-up)")
    parser.add_argument("--gpt2-steps", type=int, default=1, help="measured PPO steps for the 124M shape")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per variant, the variants taking turns"
    )
    parser.add_argument(
        "--decoders", nargs="+", choices=("generate", "loop"), default=["generate", "loop"],
        help="model.sampling.engine values timed in the rollout table; the first is the x1.00 reference",
    )  # fmt: skip
    parser.add_argument("--rollout-repeats", type=int, default=3)
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="whole-step variants"
    )
    parser.add_argument("--rollout-only", action="store_true", help="skip the whole-step variants")
    parser.add_argument(
        "--bucket-sweep", type=int, nargs="+", default=[], metavar="N",
        help='also run "both" with model.ppo.length_buckets N (one variant per N)',
    )  # fmt: skip
    args = parser.parse_args()
    for buckets in args.bucket_sweep:
        VARIANTS[f"{buckets} buckets"] = {
            **VARIANTS["both"],
            "ppo": dict(packing=True, length_buckets=buckets),
        }
        args.variants.append(f"{buckets} buckets")
    models = [*args.models, *(["gpt2-124m"] if args.gpt2_124m and "gpt2-124m" not in args.models else [])]
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for name in models:
            start = time.perf_counter()
            policy = (
                "tiny:policy" if name == "tiny" else build_gpt2_shaped(Path(scratch) / name, **SHAPES[name])
            )
            report_model(name, policy, args, args.gpt2_steps if name == "gpt2-124m" else args.steps)
            print(f"  ({time.perf_counter() - start:.0f} s for this model)")
    print(f"\nthis process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
