"""Seconds per PPO step, split by phase, against the notebook's one-prompt-at-a-time loop.

    python -m benchmarks.step_time --model tiny --batch-size 128
    python -m benchmarks.step_time --model gpt2-shaped --batch-size 128 --rollout-only

Measured in one run, on the same prompts and models:
- rollout: the trainer's batched sampling (`PPOModule._sample`) vs one `generate` call per prompt (the
  notebook) vs a plain batched `generate` (the floor the trainer's sampling should reach);
- whole PPO steps through `Trainer.fit` (rollout, reward, old/ref/value passes, optimisation) for the
  trainer and for the same trainer whose rollout generates one prompt at a time;
- the optimisation phase against a bare forward + backward of the same tokens, as many times.
`--model gpt2-shaped` builds a 12-layer, 768-wide GPT-2 from its config (random weights, no download)
with a word-level tokenizer of about 50k entries; `--model tiny` uses the offline tiny assets.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from lightning.pytorch import Callback, Trainer
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from lightning_ppo.data import PromptDataModule
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.rollout import Rollout, draw_response_lengths, sample_responses
from lightning_ppo.tiny import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, make_policy_tokenizer


class OneAtATimeModule(PPOModule):
    """The notebook's rollout: one `generate` call per prompt, unpadded; everything else unchanged."""

    def generate_rollout(self, model: torch.nn.Module, batch: dict, lengths: torch.Tensor) -> Rollout:
        return sample_one_at_a_time(self, model, batch, lengths)


def sample_one_at_a_time(
    module: PPOModule, model: torch.nn.Module, batch: dict, lengths: torch.Tensor
) -> Rollout:
    """Generate prompt by prompt, then lay the results out as the batched rollout does."""
    pad = module.tokenizer.pad_token_id
    rows = []
    for i in range(len(lengths)):
        keep = batch["attention_mask"][i].bool()
        rows.append(
            sample_responses(
                model,
                batch["input_ids"][i, keep][None],
                batch["attention_mask"][i, keep][None],
                lengths[i : i + 1],
                module.sampling,
                pad_token_id=pad,
                eos_token_id=module.tokenizer.eos_token_id,
            )
        )
    width = max(r.response_ids.shape[1] for r in rows)
    response_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        response_ids[i, : r.response_ids.shape[1]] = r.response_ids[0]
        response_mask[i, : r.response_ids.shape[1]] = r.response_mask[0]
    prompt_width = batch["input_ids"].shape[1]
    return Rollout(
        input_ids=torch.cat([batch["input_ids"], response_ids.to(batch["input_ids"].device)], 1),
        attention_mask=torch.cat(
            [batch["attention_mask"], response_mask.long().to(batch["input_ids"].device)], 1
        ),
        response_start=prompt_width,
        response_mask=response_mask.to(batch["input_ids"].device),
    )


def build_gpt2_shaped(directory: Path) -> str:
    """A GPT-2-shaped policy (random weights) with a ~50k-entry word-level tokenizer, saved to `directory`."""
    words = [*POSITIVE_WORDS, *NEGATIVE_WORDS, *NEUTRAL_WORDS]
    words += [f"w{i}" for i in range((50257 - 2) // 2 - len(words))]
    tokenizer = make_policy_tokenizer(words)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def timed_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call, the variants taking turns so that machine noise hits them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


class ProfileOneStep(Callback):
    """Runs the PyTorch profiler over one PPO step (the first after the warm-up) and prints its table."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.profiler.__exit__(None, None, None)
            print(self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


class StepTimes(Callback):
    """Wall time of each PPO step and the module's own phase timings (`time/*`)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("time/", "tokens/"))
        }
        record["step"] = time.perf_counter() - self._start
        self.steps.append(record)


def fit_steps(
    module: PPOModule,
    data: PromptDataModule,
    steps: int,
    warmup: int,
    root: str,
    profile: bool = False,
    timer: StepTimes | None = None,
) -> list[dict[str, float]]:
    """`warmup + steps` PPO steps through `Trainer.fit`; the records of the steps after the warm-up."""
    timer = timer or StepTimes()
    callbacks = [timer, ProfileOneStep(warmup)] if profile else [timer]
    trainer = Trainer(
        default_root_dir=root,
        accelerator="auto",
        devices=1,
        max_epochs=1,
        limit_train_batches=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    return timer.steps[warmup:]


def median_of(records: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in records)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "gpt2-shaped"), default="tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mini-batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="measured PPO steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rollout-only", action="store_true", help="skip whole-step and optimisation timings"
    )
    parser.add_argument("--profile", action="store_true", help="print the PyTorch profiler table of one step")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as scratch:
        policy = "tiny:policy" if args.model == "tiny" else build_gpt2_shaped(Path(scratch) / "policy")
        ppo = PPOConfig(mini_batch_size=args.mini_batch_size)
        module = PPOModule(policy=policy, reward_model="tiny:reward", ppo=ppo, log_samples_every_n_steps=0)
        data = PromptDataModule(dataset="tiny:reviews", tokenizer=policy, batch_size=args.batch_size)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        module.to(device)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        lengths = draw_response_lengths(args.batch_size, module.sampling, module.device)
        lm = module.policy.lm

        def plain_generate() -> None:
            config = GenerationConfig(
                do_sample=True, top_k=0, top_p=1.0, max_new_tokens=int(lengths.max()),
                pad_token_id=module.tokenizer.pad_token_id, eos_token_id=module.tokenizer.eos_token_id,
            )  # fmt: skip
            with torch.no_grad():
                lm.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    generation_config=config,
                )

        repeats = max(args.steps, 1)
        batched = timed_interleaved(
            {"trainer": lambda: module.generate_rollout(lm, batch, lengths), "plain": plain_generate},
            repeats,
            args.warmup,
        )
        single = timed_interleaved(
            {"one per prompt": lambda: sample_one_at_a_time(module, lm, batch, lengths)}, 1, 0
        )
        rollout = module.generate_rollout(lm, batch, lengths)
        new_tokens = float(rollout.response_mask.sum())

        threads = torch.get_num_threads()
        print(f"machine: {platform.machine()}, {threads} torch threads, device {device}")
        print(f"torch {torch.__version__}, transformers {transformers.__version__}")
        print(f"model: {args.model} ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters), "
              f"batch {args.batch_size}, mini-batch {args.mini_batch_size}")  # fmt: skip
        print("\nrollout (median seconds for the batch)")
        b, p = statistics.median(batched["trainer"]), statistics.median(batched["plain"])
        s = single["one per prompt"][0]
        print(f"  trainer, batched            {b:8.3f} s  {new_tokens / b:9.1f} new tokens/s")
        print(f"  plain batched generate      {p:8.3f} s")
        print(f"  one generate per prompt     {s:8.3f} s")
        print(f"  speed-up vs one per prompt  {s / b:8.1f}x   (plain generate: {s / p:.1f}x)")
        print(f"  trainer / plain generate    {b / p:8.2f}")
        if args.rollout_only:
            print(f"\npeak memory: {peak_memory_mb():.0f} MiB")
            return

        fresh = dict(policy=policy, reward_model="tiny:reward", ppo=ppo, log_samples_every_n_steps=0)
        torch.manual_seed(0)
        trainer_steps = fit_steps(PPOModule(**fresh), data, args.steps, args.warmup, scratch, args.profile)
        torch.manual_seed(0)
        notebook_steps = fit_steps(OneAtATimeModule(**fresh), data, args.steps, args.warmup, scratch)
        print("\nwhole PPO step through Trainer.fit (median seconds)")
        for name in ("time/rollout", "time/reward", "time/forward", "time/optimize", "step"):
            t, n = median_of(trainer_steps, name), median_of(notebook_steps, name)
            print(f"  {name:16s} trainer {t:8.3f}   one-per-prompt rollout {n:8.3f}")
        step_t, step_n = median_of(trainer_steps, "step"), median_of(notebook_steps, "step")
        tokens = median_of(trainer_steps, "tokens/responses_len_mean") * args.batch_size
        print(f"  speed-up of the whole step {step_n / step_t:.1f}x; {tokens / step_t:.1f} response tokens/s")

        optimizer_steps = ppo.ppo_epochs * (args.batch_size // args.mini_batch_size)
        bare_model = module.policy.lm.train()

        def bare_forward_backward() -> None:
            for _ in range(optimizer_steps):
                for rows in torch.arange(args.batch_size).split(args.mini_batch_size):
                    out = bare_model(
                        input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows]
                    )
                    out.logits.float().mean().backward()

        bare = statistics.median(timed_interleaved({"bare": bare_forward_backward}, repeats)["bare"])
        optimize = median_of(trainer_steps, "time/optimize")
        print("\noptimisation phase")
        print(f"  trainer PPO epochs          {optimize:8.3f} s")
        print(f"  bare forward+backward       {bare:8.3f} s  ({optimizer_steps} passes over the batch)")
        print(f"  ratio                       {optimize / bare:8.2f}")
        print(f"\npeak memory: {peak_memory_mb():.0f} MiB")


if __name__ == "__main__":
    main()
