"""How far bf16-autocast log-probs are from float32 ones, with and without `model.fp32_lm_head`.

    python -m benchmarks.fp32_head

On the same sampled tokens: max and mean |log-prob - float32 log-prob| over the response tokens, and
the seconds of one training forward + backward (policy and value head), for the tiny policy and a
GPT-2-shaped model (random weights, built from `GPT2Config()`, no download). CPU bf16 autocast.
"""

from __future__ import annotations

import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_ppo.core import logprobs_from_logits
from lightning_ppo.models import PolicyWithValueHead, load_causal_lm
from lightning_ppo.tiny import ensure_tiny_assets

BATCH, PROMPT, RESPONSE, REPEATS = 8, 16, 32, 3


def logprobs(policy: PolicyWithValueHead, ids: torch.Tensor, bf16: bool, fp32_head: bool) -> torch.Tensor:
    policy.float32_head = fp32_head
    mask = torch.ones_like(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, values = policy(ids, mask, PROMPT)
        loss = logprobs_from_logits(logits, ids[:, PROMPT:]).mean() + values.float().mean()
    return loss, logprobs_from_logits(logits, ids[:, PROMPT:]).detach()


def measure(name: str, policy: PolicyWithValueHead) -> None:
    torch.manual_seed(0)
    vocab = policy.lm.config.vocab_size
    prompt = torch.randint(vocab, (BATCH, PROMPT))
    with torch.no_grad():
        sampled = policy.lm.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
            max_new_tokens=RESPONSE, min_new_tokens=RESPONSE, pad_token_id=0,
        )  # fmt: skip
    _, exact = logprobs(policy, sampled, bf16=False, fp32_head=False)
    for fp32_head in (False, True):
        _, approx = logprobs(policy, sampled, bf16=True, fp32_head=fp32_head)
        gap = (approx - exact).abs()
        seconds = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            loss, _ = logprobs(policy, sampled, bf16=True, fp32_head=fp32_head)
            loss.backward()
            seconds.append(time.perf_counter() - start)
            policy.zero_grad()
        print(
            f"{name:10s} fp32_lm_head={fp32_head!s:5s} |dlogp| max {gap.max():.4f} mean {gap.mean():.5f}  "
            f"forward+backward {min(seconds):.3f} s ({BATCH} x {PROMPT + RESPONSE} tokens, best of {REPEATS})"
        )


def main() -> None:
    ensure_tiny_assets()
    measure("tiny", PolicyWithValueHead(load_causal_lm("tiny:policy")))
    measure("gpt2-124M", PolicyWithValueHead(GPT2LMHeadModel(GPT2Config())))


if __name__ == "__main__":
    main()
