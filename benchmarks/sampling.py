"""Drawing one token per row: `torch.multinomial` against `rollout.sample_tokens`, in one run.

    python -m benchmarks.sampling
    python -m benchmarks.sampling --rows 128 --vocab 4096 50257 --repeats 50

The decoding loop draws a token for each running row at every step from the softmax of its (b, V) scores.
Both are timed on the same probabilities (a softmax of random logits of scale 3), taking turns, median of
`--repeats` calls each. Also printed: the total variation distance between each sampler's token
frequencies over `--draws` draws from one row and the row's probabilities, with the distance two exact
samplers of that many draws would typically show (a sampling-noise floor, not a bound).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lightning_ppo.rollout import sample_tokens


def multinomial(probs: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(probs, num_samples=1).squeeze(1)


SAMPLERS = {"torch.multinomial": multinomial, "sample_tokens": sample_tokens}


def seconds_per_call(probs: torch.Tensor, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in SAMPLERS}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, sampler in SAMPLERS.items():
            start = time.perf_counter()
            sampler(probs)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def total_variation(probs: torch.Tensor, draws: int) -> dict[str, float]:
    """TV distance between each sampler's frequencies (one row, `draws` draws in chunks) and `probs` (V,)."""
    out = {}
    for name, sampler in SAMPLERS.items():
        counts = torch.zeros_like(probs, dtype=torch.float64)
        for chunk in torch.arange(draws).split(10_000):
            counts += torch.bincount(sampler(probs.expand(len(chunk), -1)), minlength=len(probs))
        out[name] = 0.5 * float((counts / draws - probs.double()).abs().sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 50257])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--draws", type=int, default=20_000)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    torch.manual_seed(0)
    for vocab in args.vocab:
        probs = torch.softmax(torch.randn(args.rows, vocab) * 3, dim=-1)  # (b, V)
        seconds = seconds_per_call(probs, args.repeats)
        distance = total_variation(probs[0], args.draws)
        reference = seconds["torch.multinomial"]
        print(f"\n== {args.rows} rows x {vocab} tokens (median of {args.repeats} calls)")
        for name, s in seconds.items():
            print(f"  {name:18s} {s * 1e3:8.3f} ms  x{reference / s:6.1f}   TV over {args.draws} draws "
                  f"{distance[name]:.4f}")  # fmt: skip
        noise = (vocab / (2 * torch.pi * args.draws)) ** 0.5  # E|TV| of an exact sampler, many cells
        print(f"  (sampling noise alone: TV ~ {noise:.4f} at most, less when few tokens carry the mass)")


if __name__ == "__main__":
    main()
