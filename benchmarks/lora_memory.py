"""Memory LoRA saves against full fine-tuning, on a GPT-2 (124M) shape with random weights (no download).

    python -m benchmarks.lora_memory                       # r=8, every linear layer
    python -m benchmarks.lora_memory --r 16 --target-modules c_attn

For each setup it builds `GPT2LMHeadModel(GPT2Config())` with a value head, runs one PPO-shaped Adam step
on a small batch, and counts trainable parameters, gradient and optimizer-state bytes (measured from the
tensors Adam holds), and the bytes of the frozen reference copy (none with LoRA: the adapter is disabled).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_ppo.lora import LoraOptions, apply_lora
from lightning_ppo.models import PolicyWithValueHead, make_reference

MIB = 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def reference_tensors(model: nn.Module | None) -> list[torch.Tensor]:
    return [] if model is None else [*model.parameters(), *model.buffers()]


def measure(
    lora: LoraOptions | None, config: GPT2Config | None = None, batch_size: int = 2, length: int = 32
) -> dict[str, float]:
    """Trainable parameters and the bytes of gradients, Adam state and reference copy after one step."""
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(config or GPT2Config())
    reference = None if lora else make_reference(lm)
    policy = PolicyWithValueHead(apply_lora(lm, lora) if lora else lm)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-5)
    input_ids = torch.randint(0, lm.config.vocab_size, (batch_size, length))  # (B, T)
    logits, values = policy(input_ids, torch.ones_like(input_ids), length // 2)
    (logits.float().logsumexp(-1).mean() + values.mean()).backward()
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "trainable parameters": sum(p.numel() for p in trainable),
        "all parameters": sum(p.numel() for p in policy.parameters()),
        "gradient MiB": tensor_bytes(p.grad for p in trainable if p.grad is not None) / MIB,
        "Adam state MiB": tensor_bytes(state) / MIB,
        "reference copy MiB": tensor_bytes(reference_tensors(reference)) / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (model.lora.r)")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (model.lora.alpha)")
    parser.add_argument(
        "--target-modules", nargs="+", default=["all-linear"], help="model.lora.target_modules"
    )
    args = parser.parse_args()
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    full = measure(None)
    lora = measure(LoraOptions(r=args.r, alpha=args.alpha, target_modules=targets))
    print(f"GPT-2 124M shape (GPT2Config()), float32; LoRA r={args.r}, target_modules={targets}")
    print(f"{'':24}{'full fine-tuning':>20}{'LoRA':>16}{'full - LoRA':>16}")
    for name in full:
        saved = full[name] - lora[name]
        cells = (f"{full[name]:,.0f}", f"{lora[name]:,.0f}", f"{saved:,.0f}")
        if "MiB" in name:
            cells = (f"{full[name]:,.1f}", f"{lora[name]:,.1f}", f"{saved:,.1f}")
        print(f"{name:24}{cells[0]:>20}{cells[1]:>16}{cells[2]:>16}")
    total_full = full["gradient MiB"] + full["Adam state MiB"] + full["reference copy MiB"]
    total_lora = lora["gradient MiB"] + lora["Adam state MiB"] + lora["reference copy MiB"]
    print(f"gradients + Adam state + reference: {total_full:,.1f} MiB -> {total_lora:,.1f} MiB")


if __name__ == "__main__":
    main()
