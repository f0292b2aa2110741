"""Loading the policy: the fused GELU computes the same function as GPT-2's spelled-out one."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.activations import GELUTanh, NewGELUActivation

from lightning_ppo.models import load_causal_lm


def test_policy_loads_with_the_fused_gelu_and_the_same_outputs(tiny_assets: Path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy").eval()
    fused = load_causal_lm("tiny:policy").eval()
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert any(isinstance(m, GELUTanh) for m in fused.modules())
    input_ids = torch.randint(0, plain.config.vocab_size, (4, 12))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids).logits, plain(input_ids).logits, atol=1e-5, rtol=1e-5)
