"""Minibatches are padded only to their own longest prompt and response, without changing any number."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ppo.core import logprobs_from_logits
from lightning_ppo.data import collate_prompts
from lightning_ppo.experience import forward_passes, make_experience
from lightning_ppo.module import PPOModule
from lightning_ppo.rollout import Rollout, draw_response_lengths
from lightning_ppo.update import ppo_loss
from tests.helpers import seeded


@pytest.fixture(scope="module")
def module(tiny_assets: Path) -> PPOModule:
    torch.manual_seed(seeded(0))
    return PPOModule(policy="tiny:policy", reward_model="tiny:reward")


def experience_of_a_rollout(module: PPOModule):
    prompts = ["the movie", "a", "this film was really", "the plot and the actor were", "an"]
    examples = [{"input_ids": module.tokenizer(p).input_ids, "query": p} for p in prompts]
    batch = collate_prompts(examples, module.tokenizer.pad_token_id)
    lengths = draw_response_lengths(len(prompts), module.sampling, module.device)
    rollout = module.generate_rollout(module.policy.lm, batch, lengths)
    passes = forward_passes(module.models, rollout)
    return make_experience(rollout, passes, torch.randn_like(passes.logprobs), module.ppo)


def test_select_trims_padding_and_keeps_log_probs(module: PPOModule):
    torch.manual_seed(seeded(1))
    experience = experience_of_a_rollout(module)
    rows = torch.tensor([1, 4])  # the two one-token prompts: every other row's padding can go
    minibatch = experience.select(rows)
    assert minibatch.input_ids.shape[1] < experience.input_ids.shape[1]
    assert minibatch.response_start == experience.response_start - int(experience.prompt_pad[rows].min())
    assert int(minibatch.response_mask.sum()) == int(experience.response_mask[rows].sum())
    torch.testing.assert_close(minibatch.response_ids * minibatch.response_mask.long(),
                               experience.response_ids[rows, : minibatch.response_ids.shape[1]]
                               * minibatch.response_mask.long())  # fmt: skip
    with torch.no_grad():
        logits, values = module.policy(
            minibatch.input_ids, minibatch.attention_mask, minibatch.response_start
        )
    logprobs = logprobs_from_logits(logits, minibatch.response_ids) * minibatch.response_mask
    torch.testing.assert_close(logprobs, minibatch.old_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(values * minibatch.response_mask, minibatch.old_values, atol=1e-5, rtol=0)


def test_forward_micro_batches_change_no_number(module: PPOModule):
    torch.manual_seed(seeded(2))
    experience = experience_of_a_rollout(module)
    rollout = Rollout(
        experience.input_ids, experience.attention_mask, experience.response_start, experience.response_mask
    )
    whole = forward_passes(module.models, rollout)
    chunked = forward_passes(module.models, rollout, chunk=2)
    for a, b in [(whole.logprobs, chunked.logprobs), (whole.values, chunked.values),
                 (whole.ref_logprobs, chunked.ref_logprobs)]:  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_assets: Path):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(seeded(0))
        module = PPOModule(
            policy="tiny:policy", reward_model="tiny:reward", gradient_checkpointing=checkpointing
        )
        assert module.policy.lm.is_gradient_checkpointing is checkpointing
        module.train()
        torch.manual_seed(seeded(3))
        experience = experience_of_a_rollout(module)
        rows = torch.arange(experience.input_ids.shape[0])
        loss, _ = ppo_loss(module.models, experience.select(rows), module.ppo)
        loss.backward()
        grads.append([p.grad.clone() for p in module.policy.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
