"""Padding-free forwards (`lightning_ppo.packing`): the same numbers as one padded forward, less compute."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lightning_ppo.experience import forward_passes
from lightning_ppo.module import PPOModule
from lightning_ppo.packing import RowLengths, bucketed, length_buckets, pack_rows, plan_buckets, spread
from lightning_ppo.rollout import Rollout
from lightning_ppo.update import UpdateContext, ppo_epochs, ppo_loss
from tests.helpers import (
    REVIEW_OPENINGS,
    experience_of_a_rollout,
    padded_tokens,
    seeded,
    short_response_module,
)


@pytest.fixture(scope="module")
def module(tiny_assets: Path) -> PPOModule:
    return short_response_module()


def test_packed_rows_hold_each_rows_tokens_from_column_zero(module: PPOModule):
    experience = experience_of_a_rollout(module, seed=1)
    rows = torch.tensor([6, 0, 3])
    packed = pack_rows(experience.input_ids, experience.response_start, experience.lengths, rows)
    for i, row in enumerate(rows.tolist()):  # naive: the row's attended tokens, in order
        real = experience.input_ids[row][experience.attention_mask[row].bool()]
        assert packed.input_ids[i, : len(real)].tolist() == real.tolist()
        padding = packed.input_ids.shape[1] - len(real)
        assert packed.attention_mask[i].tolist() == [1] * len(real) + [0] * padding
        prompt = int(experience.attention_mask[row, : experience.response_start].sum())
        assert int(packed.response_start[i]) == prompt
        n = int(experience.response_len[row])
        assert packed.response_ids[i, :n].tolist() == real[prompt:].tolist()
    assert packed.input_ids.shape[1] == int(experience.lengths.totals(experience.response_start)[rows].max())


def test_the_head_runs_only_on_the_real_response_tokens(module: PPOModule):
    """`token_mask` logits are the full (b, R, V) logits at the packed rows' real response tokens, and
    `spread` lays per-token values back out where `x[mask]` took them."""
    experience = experience_of_a_rollout(module, seed=4)
    packed = pack_rows(experience.input_ids, experience.response_start, experience.lengths, torch.arange(8))
    args = (packed.input_ids, packed.attention_mask, packed.response_start, packed.response_ids.shape[1])
    assert packed.response_mask.tolist() == [
        [column < int(n) for column in range(packed.response_ids.shape[1])] for n in experience.response_len
    ]
    assert not packed.response_mask.all()  # some rows end before the widest: their tail is skipped
    with torch.no_grad():
        full, full_values = module.policy(*args)  # (b, R, V)
        narrow, values = module.policy(*args, packed.response_mask)  # (n, V)
    assert narrow.shape == (int(experience.response_len.sum()), full.shape[-1])
    torch.testing.assert_close(narrow, full[packed.response_mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(values, full_values)
    per_token = torch.randn(narrow.shape[0], requires_grad=True)
    laid_out = spread(per_token, packed.response_mask)  # (b, R)
    for row, n in enumerate(experience.response_len.tolist()):  # naive: row-major, then zeros
        start = int(experience.response_len[:row].sum())
        assert laid_out[row, :n].tolist() == per_token[start : start + n].tolist()
        assert not laid_out[row, n:].any()
    laid_out.sum().backward()
    assert torch.equal(per_token.grad, torch.ones_like(per_token))


def test_bucketed_forward_gives_the_padded_forwards_log_probs_and_values(module: PPOModule):
    experience = experience_of_a_rollout(module, seed=2)
    mask = experience.response_mask

    def forward(packed):
        width = packed.response_ids.shape[1]
        logits, values = module.policy(packed.input_ids, packed.attention_mask, packed.response_start, width)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, packed.response_ids[..., None])[..., 0]
        return logprobs, values

    rows = torch.randperm(len(REVIEW_OPENINGS))
    with torch.no_grad():
        (logprobs, values), computed = bucketed(
            forward, experience.input_ids, experience.response_start, experience.lengths, rows, 3
        )
    torch.testing.assert_close(logprobs * mask[rows], experience.old_logprobs[rows], atol=2e-5, rtol=0)
    torch.testing.assert_close(values * mask[rows], experience.old_values[rows], atol=2e-5, rtol=0)
    assert computed < experience.input_ids.numel()


def test_bucketing_wastes_under_15_percent_at_the_notebooks_lengths():
    torch.manual_seed(seeded(3))
    prompts, responses = torch.randint(2, 8, (128,)), torch.randint(4, 16, (128,))  # notebook: 2-7, 4-15
    totals = prompts + responses
    padded = 128 * int(prompts.max() + responses.max())  # one forward in the rollout layout
    buckets, computed, useful = length_buckets(totals, 4)
    assert (useful, computed) == padded_tokens(totals, buckets)
    assert 1 - useful / padded > 0.3 and 1 - useful / computed < 0.15


def run_ppo_epochs(module: PPOModule, config, experience) -> tuple[list[torch.Tensor], dict]:
    """The PPO epochs with SGD on a copy of the policy; its weights after and the statistics."""
    models = copy.copy(module.models)
    models.policy = copy.deepcopy(module.policy).train()
    optimizer = torch.optim.SGD(models.policy.parameters(), lr=0.5)

    def optimizer_step(loss):
        optimizer.step()
        optimizer.zero_grad()

    context = UpdateContext(
        backward=lambda loss: loss.backward(),
        no_sync=lambda last: nullcontext(),
        optimizer_step=optimizer_step,
        mean_over_ranks=lambda x: x,
    )
    torch.manual_seed(seeded(4))  # the same minibatches
    stats = ppo_epochs(models, experience, config, context)
    return [p.detach().clone() for p in models.policy.parameters()], stats


@pytest.mark.parametrize("buckets", [1, 3])
def test_a_packed_ppo_step_leaves_the_weights_of_the_padded_one(module: PPOModule, buckets: int):
    experience = experience_of_a_rollout(module, seed=5)
    base = replace(module.ppo, mini_batch_size=4, ppo_epochs=2)
    padded_weights, padded_stats = run_ppo_epochs(module, replace(base, packing=False), experience)
    packed_weights, packed_stats = run_ppo_epochs(
        module, replace(base, packing=True, length_buckets=buckets), experience
    )
    start = [p.detach() for p in module.policy.parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(padded_weights, start, strict=True))
    assert moved > 1e-3  # the step did something
    for a, b in zip(packed_weights, padded_weights, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for name, value in padded_stats.items():
        if name != "tokens/update_waste":
            torch.testing.assert_close(packed_stats[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert packed_stats["tokens/update_waste"] < padded_stats["tokens/update_waste"]


def test_the_loss_sees_every_row_once(module: PPOModule):
    experience = experience_of_a_rollout(module, seed=6)
    rows = torch.arange(len(REVIEW_OPENINGS))
    config = replace(module.ppo, length_buckets=len(REVIEW_OPENINGS))  # one row per bucket at most
    loss, stats = ppo_loss(module.models, experience.select(rows), config)
    padded, padded_stats = ppo_loss(module.models, experience.select(rows), replace(config, packing=False))
    torch.testing.assert_close(loss, padded, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["ppo/policy/entropy"], padded_stats["ppo/policy/entropy"])


def test_row_lengths_of_a_rollout():
    attention = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    response_mask = attention[:, 3:].float()
    lengths = RowLengths.of(attention, 3, response_mask)
    assert lengths.prompt_pad.tolist() == [2, 0] and lengths.response_len.tolist() == [2, 3]
    assert lengths.totals(3).tolist() == [3, 6]


@pytest.mark.parametrize(("buckets", "chunk"), [(1, None), (3, 2)])
def test_packed_no_grad_passes_equal_the_padded_ones(module: PPOModule, buckets: int, chunk: int | None):
    experience = experience_of_a_rollout(module, seed=7)
    rollout = Rollout(
        experience.input_ids, experience.attention_mask, experience.response_start, experience.response_mask
    )
    padded = forward_passes(module.models, rollout, full_kl=True)
    packed = forward_passes(module.models, rollout, chunk, full_kl=True, length_buckets=buckets)
    for name in ("logprobs", "values", "ref_logprobs"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=2e-5, rtol=0, msg=name)
    mask = rollout.response_mask.bool()
    for a, b in zip(packed.full, padded.full, strict=True):  # (B, R, V) log-distributions on real tokens
        torch.testing.assert_close(a[mask], b[mask], atol=2e-5, rtol=0)


@pytest.mark.parametrize(("max_buckets", "max_rows"), [(4, None), (3, 5), (6, 4)])
def test_the_number_of_forwards_depends_only_on_the_number_of_rows(max_buckets: int, max_rows: int | None):
    generator = torch.Generator().manual_seed(seeded(max_buckets))
    counts = set()
    for totals in [torch.full((13,), 9), torch.randint(4, 20, (13,), generator=generator), torch.arange(13)]:
        buckets = plan_buckets(totals, max_buckets, max_rows)
        assert sorted(torch.cat(buckets).tolist()) == list(range(13))  # every row once
        assert max_rows is None or max(len(b) for b in buckets) <= max_rows
        counts.add(len(buckets))
    assert len(counts) == 1  # the same on every rank, whatever lengths it drew (ZeRO-3)
