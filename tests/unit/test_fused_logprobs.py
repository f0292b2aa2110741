"""Tier 1: the fused log-prob + entropy pass equals the two separate functions, values and gradients."""

import pytest
import torch
from torch.testing import assert_close

from lightning_ppo import core
from tests.helpers import entropy_from_logits, seeded


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(seeded(0))


@pytest.fixture(params=[2**24, 600, 1], ids=["one-chunk", "few-rows-per-chunk", "one-row-per-chunk"])
def chunk_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Fused-pass chunk budgets: the whole batch, one or two rows (of 582 or 265 logits), one row each."""
    monkeypatch.setattr(core, "_FUSED_CHUNK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_values_equal_the_separate_functions(dtype: torch.dtype, chunk_elements: int) -> None:
    logits = (torch.randn(4, 6, 97) * 4).to(dtype)  # (B, R, V)
    tokens = torch.randint(0, 97, (4, 6))  # (B, R)
    logprobs, entropy = core.logprobs_and_entropy(logits, tokens)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == (4, 6)
    assert torch.equal(logprobs, core.logprobs_from_logits(logits, tokens))
    # Float32 noise apart: the fused form -sum(p log p) avoids lse - sum(p l)'s cancellation.
    assert_close(entropy, entropy_from_logits(logits), rtol=1e-4, atol=1e-4)
    upcast = logits.double()
    exact = upcast.logsumexp(-1) - (upcast.softmax(-1) * upcast).sum(-1)  # (B, R) float64
    assert_close(entropy.double(), exact, rtol=0, atol=3e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logprob_gradients_equal_the_separate_function(dtype: torch.dtype, chunk_elements: int) -> None:
    tokens = torch.randint(0, 53, (3, 5))  # (B, R)
    weights = torch.randn(3, 5)  # (B, R) stands in for -advantages * mask
    base = (torch.randn(3, 5, 53) * 3).to(dtype)  # (B, R, V)
    fused_logits, separate_logits = base.clone().requires_grad_(), base.clone().requires_grad_()

    logprobs, entropy = core.logprobs_and_entropy(fused_logits, tokens)
    (logprobs * weights).sum().backward()
    (core.logprobs_from_logits(separate_logits, tokens) * weights).sum().backward()

    assert not entropy.requires_grad  # a statistic by default: no graph kept for it
    assert fused_logits.grad.dtype == dtype
    assert_close(fused_logits.grad, separate_logits.grad, rtol=0, atol=0)


def test_fused_on_flat_tokens_equals_the_batched_layout(chunk_elements: int) -> None:
    """(n, V) logits of the real tokens only (the packed passes' layout) give the same log-probs,
    entropies and gradients as those positions of the (B, R, V) call."""
    base = torch.randn(4, 6, 97) * 4  # (B, R, V)
    tokens = torch.randint(0, 97, (4, 6))  # (B, R)
    real = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 1])[:, None]  # (B, R) a prefix per row
    batched, flat = base.clone().requires_grad_(), base[real].clone().requires_grad_()  # (n, V) n = 13
    batched_out, flat_out = (
        core.logprobs_and_entropy(batched, tokens),
        core.logprobs_and_entropy(flat, tokens[real]),
    )
    for whole, part in zip(batched_out, flat_out, strict=True):
        assert part.shape == (13,)
        assert_close(part, whole[real], rtol=0, atol=1e-6)
    assert_close(core.logprobs_from_logits(flat, tokens[real]), flat_out[0], rtol=0, atol=0)
    (batched_out[0] * real).sum().backward()
    flat_out[0].sum().backward()
    assert_close(flat.grad, batched.grad[real], rtol=0, atol=1e-6)


def test_fused_under_no_grad_builds_no_graph() -> None:
    logits = torch.randn(2, 3, 11, requires_grad=True)
    with torch.no_grad():
        logprobs, entropy = core.logprobs_and_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    assert not logprobs.requires_grad and not entropy.requires_grad


def test_fused_gradient_flows_through_a_head_and_matches_a_float64_log_softmax() -> None:
    hidden = torch.randn(3, 4, 8)  # (B, R, H)
    head = torch.nn.Linear(8, 29)
    reference_head = torch.nn.Linear(8, 29).double()
    reference_head.load_state_dict(head.state_dict())
    tokens = torch.randint(0, 29, (3, 4))
    weights = torch.randn(3, 4)

    logprobs, _ = core.logprobs_and_entropy(head(hidden), tokens)
    (logprobs * weights).sum().backward()
    log_distribution = torch.log_softmax(reference_head(hidden.double()), dim=-1)  # (B, R, V) float64
    taken = log_distribution.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (taken * weights.double()).sum().backward()

    assert_close(head.weight.grad.double(), reference_head.weight.grad, rtol=1e-5, atol=1e-6)
    assert_close(head.bias.grad.double(), reference_head.bias.grad, rtol=1e-5, atol=1e-6)


def test_fused_on_float64_logits_stays_float64_and_passes_gradcheck(chunk_elements: int) -> None:
    """Precision 64-true: was `scatter(): Expected self.dtype to be equal to src.dtype` in the backward."""
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)  # (B, R, V)
    tokens = torch.randint(0, 11, (2, 3))  # (B, R)
    logprobs, entropy = core.logprobs_and_entropy(logits, tokens)
    assert logprobs.dtype == entropy.dtype == core.logprobs_from_logits(logits, tokens).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: core.logprobs_and_entropy(x, tokens)[0], (logits,))
