"""Token-budget micro-batches (`model.ppo.max_tokens_per_microbatch`): the uncut minibatch's gradient,
statistics and ratio guard, in forwards of at most the budget."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lightning_ppo.cli import main
from lightning_ppo.errors import ConfigError
from lightning_ppo.experience import Experience, forward_passes
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.packing import TokenBudget
from lightning_ppo.rollout import Rollout
from lightning_ppo.update import UpdateContext, minibatch_backward, ppo_epochs
from tests.helpers import (
    REVIEW_OPENINGS,
    TINY,
    cli_seed_args,
    experience_of_a_rollout,
    scalars,
    seeded,
    short_response_module,
)


@pytest.fixture(scope="module")
def module(tiny_assets: Path) -> PPOModule:
    return short_response_module()


def an_experience(module: PPOModule, seed: int) -> Experience:
    experience = experience_of_a_rollout(module, seed)
    # engine log-probs near the trainer's: TIS weights that are not all 1
    weights = (torch.randn_like(experience.old_logprobs) * 0.3).exp().clamp(
        max=2.0
    ) * experience.response_mask
    return replace(experience, tis_weights=weights)


def critic_free(experience: Experience) -> Experience:
    return replace(experience, old_values=None, returns=None)


def widest_row(experience: Experience) -> int:
    return int(experience.lengths.totals(experience.response_start).max())


def context_for(models, gradients: bool = True) -> UpdateContext:
    def local_gradients():
        return [p.grad for p in models.policy.parameters() if p.grad is not None]

    return UpdateContext(
        backward=lambda loss: loss.backward(),
        no_sync=lambda last: nullcontext(),
        optimizer_step=lambda loss: None,
        mean_over_ranks=lambda x: x,
        gradients=local_gradients if gradients else None,
    )


def copy_of(module: PPOModule):
    models = copy.copy(module.models)
    models.policy = copy.deepcopy(module.policy).train()
    return models


def gradient_of(module, experience, config, first=True, gradients=True, start=None):
    """The policy's gradient after one minibatch's backward (on top of `start`), and its statistics."""
    models = copy_of(module)
    if start is not None:
        for p, g in zip(models.policy.parameters(), start, strict=True):
            p.grad = g.clone()
    context = context_for(models, gradients)
    _, stats = minibatch_backward(models, experience, config, context, sync=True, first=first)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in models.policy.parameters()]
    return grads, stats


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# The cut


def naive_cost(prompt_len, response_len, rows, padded):
    if padded:
        return len(rows) * (max(prompt_len[r] for r in rows) + max(response_len[r] for r in rows))
    return len(rows) * max(prompt_len[r] + response_len[r] for r in rows)


def naive_fewest(prompt_len, response_len, budget, padded) -> int:
    """The fewest micro-batches of rows taken shortest first, each within the budget (or one row)."""
    order = sorted(range(len(prompt_len)), key=lambda row: prompt_len[row] + response_len[row])
    count, current = 0, []
    for row in order:
        if current and naive_cost(prompt_len, response_len, [*current, row], padded) <= budget:
            current.append(row)
        else:
            count, current = count + 1, [row]
    return count


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("budget", [1, 20, 45, 1000])
def test_every_row_lands_in_one_micro_batch_within_the_budget(padded: bool, budget: int):
    generator = torch.Generator().manual_seed(seeded(budget))
    prompt_len, response_len = torch.randint(1, 9, (23,), generator=generator), torch.randint(1, 30, (23,))
    parts = TokenBudget(budget).cut(prompt_len, response_len, padded)
    rows = torch.cat(parts).tolist()
    assert sorted(rows) == list(range(23))
    p, r = prompt_len.tolist(), response_len.tolist()
    for part in parts:
        assert len(part) == 1 or naive_cost(p, r, part.tolist(), padded) <= budget
    fewest = naive_fewest(p, r, budget, padded)
    assert len(parts) == fewest
    # as even as that count allows: no cap below the cut's largest micro-batch fits in as few
    largest = max(naive_cost(p, r, x.tolist(), padded) for x in parts)
    if len(parts) > 1 and largest > max(naive_cost(p, r, [row], padded) for row in range(23)):
        assert naive_fewest(p, r, largest - 1, padded) > fewest
    if budget == 1000:
        assert len(parts) == 1


def test_ranks_agree_on_the_number_of_micro_batches():
    prompt_len, response_len = torch.full((10,), 3), torch.arange(10)
    own = TokenBudget(40).cut(prompt_len, response_len)
    parts = TokenBudget(40, agree=lambda n: n + 3).cut(prompt_len, response_len)
    assert len(parts) == len(own) + 3
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert all(naive_cost(prompt_len.tolist(), response_len.tolist(), x.tolist(), False) <= 40 for x in parts)


@pytest.mark.parametrize("value", [0, -5, 2.5])
def test_a_bad_budget_is_refused_by_name(value):
    with pytest.raises(ConfigError, match="model.ppo.max_tokens_per_microbatch"):
        PPOConfig(max_tokens_per_microbatch=value)


# ------------------------------------------------------------------------------------------------------
# The uncut minibatch's numbers


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("estimator", ["gae", "critic_free_kl_in_loss"])
def test_micro_batches_give_the_uncut_gradient_and_statistics(
    module: PPOModule, packing: bool, estimator: str
):
    experience = an_experience(module, seed=1)
    config = replace(module.ppo, packing=packing, mini_batch_size=len(REVIEW_OPENINGS), tis_cap=2.0)
    if estimator != "gae":
        experience = critic_free(experience)
        config = replace(config, advantage_estimator="grpo", kl_in="loss")
    uncut, uncut_stats = gradient_of(module, experience, config)
    budget = widest_row(experience) * 2  # two or three rows per forward
    cut, stats = gradient_of(module, experience, replace(config, max_tokens_per_microbatch=budget))
    assert stats["tokens/micro_batches"] >= 3  # it was cut
    assert max(float(g.abs().max()) for g in uncut) > 1e-3  # a gradient to compare
    assert_same(cut, uncut)
    for name, value in uncut_stats.items():
        if name != "tokens/update_waste":
            torch.testing.assert_close(stats[name], value, atol=1e-6, rtol=1e-5, msg=name)
    if estimator == "gae":
        assert "ppo/val/error" in stats


def test_the_guard_reads_the_whole_minibatch_not_each_micro_batch(module: PPOModule):
    """Rows 0-2 made off-policy (ratio ~e^2): some micro-batch's own mean ratio is far above the whole
    minibatch's. A threshold between the two keeps everything uncut, and so must the micro-batches; a
    threshold below the whole minibatch's drops everything, also gradients already taken in place."""
    experience = an_experience(module, seed=2)
    with torch.no_grad():
        rollout = Rollout(
            experience.input_ids,
            experience.attention_mask,
            experience.response_start,
            experience.response_mask,
        )
        now = forward_passes(copy_of(module), rollout).logprobs
    old = now.clone()
    old[:3] -= 2.0
    experience = replace(experience, old_logprobs=old * experience.response_mask)
    mask = experience.response_mask
    ratio = (now - experience.old_logprobs).exp()
    whole = float((ratio * mask).sum() / mask.sum())
    budget = widest_row(experience)
    prompt_len = experience.response_start - experience.prompt_pad
    parts = TokenBudget(budget).cut(prompt_len, experience.response_len)
    highest = max(float((ratio[part] * mask[part]).sum() / mask[part].sum()) for part in parts)
    assert highest > 1.5 * whole
    base = replace(
        module.ppo, mini_batch_size=len(REVIEW_OPENINGS), max_tokens_per_microbatch=budget, tis_cap=2.0
    )
    start = [torch.randn_like(p) for p in module.policy.parameters()]  # an accumulated minibatch's
    for threshold in [(whole + highest) / 2, whole * 0.9]:
        config = replace(base, ratio_threshold=threshold)
        uncut, uncut_stats = gradient_of(module, experience, replace(config, max_tokens_per_microbatch=None))
        assert float(uncut_stats["ppo/skipped_minibatches"]) == (threshold < whole)
        for first, gradients in [(True, True), (True, False), (False, True)]:  # drop in place / decide first
            cut, stats = gradient_of(module, experience, config, first=first, gradients=gradients)
            assert stats["tokens/micro_batches"] >= 2
            assert float(stats["ppo/skipped_minibatches"]) == (threshold < whole)
            assert_same(cut, uncut)
        cut, _ = gradient_of(module, experience, config, first=False, start=start)
        assert_same(cut, [s + g for s, g in zip(start, uncut, strict=True)])


@pytest.mark.parametrize("gradients", [True, False])  # False: the strategy keeps them (DeepSpeed)
def test_ppo_epochs_in_micro_batches_leave_the_uncut_weights(module: PPOModule, gradients: bool):
    """Two epochs, two minibatches per optimizer step (the second's guard decided first), SGD."""
    experience = an_experience(module, seed=3)
    config = replace(module.ppo, mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2, tis_cap=2.0)
    weights = []
    for budget in (None, widest_row(experience)):
        models = copy_of(module)
        optimizer = torch.optim.SGD(models.policy.parameters(), lr=0.5)

        def optimizer_step(loss, optimizer=optimizer):
            optimizer.step()
            optimizer.zero_grad()

        context = replace(context_for(models, gradients), optimizer_step=optimizer_step)
        torch.manual_seed(seeded(4))  # the same minibatches
        stats = ppo_epochs(models, experience, replace(config, max_tokens_per_microbatch=budget), context)
        weights.append([p.detach().clone() for p in models.policy.parameters()])
    assert stats["tokens/micro_batches"] > 1
    moved = max(
        float((a - b.detach()).abs().max())
        for a, b in zip(weights[0], module.policy.parameters(), strict=True)
    )
    assert moved > 1e-3
    assert_same(weights[1], weights[0])


@pytest.mark.parametrize("packing", [True, False])
def test_no_grad_passes_in_micro_batches_equal_the_uncut_ones(module: PPOModule, packing: bool):
    experience = an_experience(module, seed=5)
    rollout = Rollout(
        experience.input_ids, experience.attention_mask, experience.response_start, experience.response_mask
    )
    buckets = 3 if packing else None
    uncut = forward_passes(module.models, rollout, length_buckets=buckets)
    calls = []
    tokens = widest_row(experience) if packing else rollout.input_ids.shape[1] * 2
    budget = TokenBudget(tokens, agree=lambda n: calls.append(n) or n + 1)  # another rank needs one more
    cut = forward_passes(module.models, rollout, length_buckets=buckets, budget=budget)
    assert calls and calls[0] >= 3
    for name in ("logprobs", "values", "ref_logprobs"):
        torch.testing.assert_close(getattr(cut, name), getattr(uncut, name), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_a_fit_in_micro_batches_logs_what_an_uncut_one_does(tiny_assets: Path, tmp_path: Path):
    """Two PPO steps through the CLI, with and without a budget (about two rows per forward here)."""
    logged = []
    for name, budget in [("uncut", []), ("cut", ["--model.ppo.max_tokens_per_microbatch", "48"])]:
        cli = main(
            [
                "fit", "--config", TINY, *cli_seed_args(),
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "0",
                "--trainer.logger.init_args.save_dir", str(tmp_path / name), *budget,
            ]
        )  # fmt: skip
        logged.append(scalars(Path(cli.trainer.log_dir)))
    uncut, cut = logged
    assert min(cut["tokens/micro_batches"]) > 4  # minibatches of 32 rows
    for name in ("env/reward_mean", "objective/kl", "ppo/loss/total", "ppo/policy/ratio", "ppo/val/error"):
        assert cut[name] == pytest.approx(uncut[name], abs=1e-4), name


def test_equal_rows_are_cut_evenly():
    parts = TokenBudget(4096).cut(torch.full((16,), 16), torch.full((16,), 256))  # 16 x 272 = 4,352 tokens
    assert [len(part) for part in parts] == [8, 8]
