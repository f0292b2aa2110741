"""Time and peak memory of the fused log-prob + entropy pass against today's two separate functions.

    python -m benchmarks.fused_logprobs
    python -m benchmarks.fused_logprobs --dtype bfloat16 --repeats 3

The update's shape: logits (B=128, R=15, V=50257) as a leaf, float32 log-probs of the taken tokens
backpropagated through a PPO-like loss, the entropy logged without gradient (as `PPOModule` does today).
`separate` is `logprobs_from_logits(logits)` + `entropy_from_logits(logits.detach())`; `fused` is
`logprobs_and_entropy(logits)`. Each variant runs in its own process: peak memory is the growth of the
peak RSS over the inputs (logits and their gradient buffer excluded), so one variant cannot hide another.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from lightning_ppo.core import logprobs_and_entropy, logprobs_from_logits
from tests.helpers import entropy_from_logits

MIB = 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def step(variant: str, logits: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor) -> None:
    """One forward + backward of the log-prob part of the update, entropy logged."""
    if variant == "fused":
        logprobs, entropy = logprobs_and_entropy(logits, tokens)
    else:
        logprobs, entropy = logprobs_from_logits(logits, tokens), entropy_from_logits(logits.detach())
    (-(advantages * logprobs).mean()).backward()
    entropy.mean().item()


def child(variant: str, dtype: str, batch: int, response: int, vocab: int, repeats: int) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(batch, response, vocab, dtype=getattr(torch, dtype)).requires_grad_()
    logits.grad = torch.zeros_like(logits)  # the gradient buffer belongs to the inputs, not the variant
    tokens = torch.randint(0, vocab, (batch, response))  # (B, R)
    advantages = torch.randn(batch, response)  # (B, R)
    before = peak_rss_mib()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(variant, logits, tokens, advantages)
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "peak_mib": peak_rss_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--response", type=int, default=15)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=["separate", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.dtype, args.batch, args.response, args.vocab, args.repeats)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return
    results = {}
    for variant in ("separate", "fused"):
        command = [sys.executable, "-m", "benchmarks.fused_logprobs", "--child", variant]
        command += ["--dtype", args.dtype, "--batch", str(args.batch), "--response", str(args.response)]
        command += ["--vocab", str(args.vocab), "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.splitlines()[-1])
    element_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    logits_mib = args.batch * args.response * args.vocab * element_bytes / MIB
    print(
        f"logits ({args.batch}, {args.response}, {args.vocab}) {args.dtype}: {logits_mib:,.0f} MiB; "
        f"{torch.get_num_threads()} threads; median of {args.repeats} forward + backward"
    )
    print(f"{'':10}{'s / pass':>10}{'peak MiB over inputs':>22}")
    for variant, result in results.items():
        print(f"{variant:10}{result['seconds']:>10.3f}{result['peak_mib']:>22,.0f}")
    speedup = results["separate"]["seconds"] / results["fused"]["seconds"]
    saved = results["separate"]["peak_mib"] - results["fused"]["peak_mib"]
    print(f"fused: {speedup:.2f}x the speed, {saved:,.0f} MiB less peak memory")


if __name__ == "__main__":
    main()
