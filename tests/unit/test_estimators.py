"""Tier 1: critic-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) against python loops.

Rows of a group are contiguous: rows [g*k, (g+1)*k) are prompt g's samples. Padding is filled with 1e6
wherever an estimator reads per-token input, so any leak through the mask shows up.
"""

import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lightning_ppo import core
from lightning_ppo.config import PPOConfig
from lightning_ppo.data import repeat_prompts
from lightning_ppo.experience import ForwardPasses, forward_passes, make_experience, per_token_rewards
from lightning_ppo.module import PPOModule
from lightning_ppo.rollout import Rollout
from lightning_ppo.update import ppo_loss
from tests.helpers import seeded

PAD = 1e6


def right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.float64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    return mask


def broadcast_loop(per_row: list[float], mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 1:
                out[b, t] = per_row[b]
    return out


def naive_grpo(scores: list[float], k: int, scale_by_std: bool, eps: float = 1e-4) -> list[float]:
    out = []
    for g in range(0, len(scores), k):
        group = scores[g : g + k]
        mean = sum(group) / k
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (k - 1))
        out += [(r - mean) / (std + eps) if scale_by_std else r - mean for r in group]
    return out


def naive_rloo(sequence_rewards: list[float], k: int) -> list[float]:
    out = []
    for g in range(0, len(sequence_rewards), k):
        group = sequence_rewards[g : g + k]
        for i, r in enumerate(group):
            others = [group[j] for j in range(k) if j != i]
            out.append(r - sum(others) / (k - 1))
    return out


def token_rewards_loop(scores, logprobs, ref_logprobs, mask, kl_coef) -> torch.Tensor:
    """Score on the last real token, -kl_coef * (logp - ref) on each real token; padding stays PAD."""
    rewards = torch.full_like(mask, PAD)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        for t in range(n):
            rewards[b, t] = -kl_coef * (float(logprobs[b, t]) - float(ref_logprobs[b, t]))
        rewards[b, n - 1] += float(scores[b])
    return rewards


# Three groups of k=4 of unequal quality and spread, the middle one all equal; ragged response lengths.
K = 4
SCORES = [2.0, 3.5, 2.5, 4.0, 0.7, 0.7, 0.7, 0.7, -3.0, -1.0, -2.5, 0.5]
LENGTHS = [5, 1, 3, 5, 2, 5, 4, 1, 3, 5, 2, 4]


@pytest.fixture
def mask() -> torch.Tensor:
    return right_padded_mask(LENGTHS, max(LENGTHS))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_loop(mask: torch.Tensor, scale_by_std: bool) -> None:
    scores = torch.tensor(SCORES, dtype=torch.float64)
    out = core.grpo_advantages(scores, mask, K, scale_by_std=scale_by_std)
    assert_close(out, broadcast_loop(naive_grpo(SCORES, K, scale_by_std), mask))
    assert torch.isfinite(out).all()
    assert (out[4:8] == 0).all()  # the all-equal group: 0 / (0 + eps), no nan


def test_grpo_k2_edge() -> None:
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0], dtype=torch.float64)
    mask = right_padded_mask([2, 3, 1, 2], 3)
    out = core.grpo_advantages(scores, mask, 2)
    assert_close(out, broadcast_loop(naive_grpo([1.0, 3.0, 5.0, 5.0], 2, True), mask))
    # k = 2: mean 2, unbiased std sqrt(2), so -1 / (sqrt(2) + eps) and its opposite.
    assert_close(out[:2, 0], torch.tensor([-1.0, 1.0], dtype=torch.float64) / (math.sqrt(2) + 1e-4))


def test_rloo_matches_loop_with_kl_in_the_reward(mask: torch.Tensor) -> None:
    torch.manual_seed(seeded(0))
    logprobs = -torch.rand(mask.shape, dtype=torch.float64) * 3
    ref_logprobs = -torch.rand(mask.shape, dtype=torch.float64) * 3
    scores = torch.tensor(SCORES, dtype=torch.float64)
    kl_coef = 0.2
    rewards = core.compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)[0]
    # The TRL RLOOTrainer sequence reward: score - kl_coef * sum of per-token KL over real tokens.
    sequence = [
        SCORES[b] - kl_coef * sum(float(logprobs[b, t] - ref_logprobs[b, t]) for t in range(n))
        for b, n in enumerate(LENGTHS)
    ]
    out = core.rloo_advantages(rewards, mask, K)
    assert_close(out, broadcast_loop(naive_rloo(sequence, K), mask))
    padded = token_rewards_loop(scores, logprobs, ref_logprobs, mask, kl_coef)
    assert_close(core.rloo_advantages(padded, mask, K), out)  # padding never read


def test_rloo_of_an_all_equal_group_is_zero_and_k2_is_the_difference() -> None:
    mask = right_padded_mask([3, 1, 2, 2], 3)
    rewards = torch.zeros(4, 3, dtype=torch.float64)
    for b, (n, score) in enumerate(zip([3, 1, 2, 2], [0.7, 0.7, 1.0, 4.0], strict=True)):
        rewards[b, n - 1] = score
    out = core.rloo_advantages(rewards, mask, 2)
    assert (out[:2] == 0).all()
    assert_close(out[2:], broadcast_loop([0, 0, 1.0 - 4.0, 4.0 - 1.0], mask)[2:])


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_refuse_bad_groups(estimator: str) -> None:
    mask = torch.ones(6, 3)
    compute = {
        "grpo": lambda k: core.grpo_advantages(torch.randn(6), mask, k),
        "rloo": lambda k: core.rloo_advantages(torch.randn(6, 3), mask, k),
    }[estimator]
    with pytest.raises(ValueError, match="not divisible by k=4"):
        compute(4)
    with pytest.raises(ValueError, match="needs k >= 2, got k=1"):
        compute(1)
    compute(3)


def naive_reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    returns = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            running += float(rewards[b, t])
            returns[b, t] = running
    real = [float(returns[b, t]) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    mean = sum(real) / len(real)
    var = sum((x - mean) ** 2 for x in real) / len(real)
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 1:
                out[b, t] = (float(returns[b, t]) - mean) / math.sqrt(max(var, 1e-8))
    return out


def test_reinforce_pp_matches_loop(mask: torch.Tensor) -> None:
    torch.manual_seed(seeded(1))
    logprobs = -torch.rand(mask.shape, dtype=torch.float64) * 3
    ref_logprobs = -torch.rand(mask.shape, dtype=torch.float64) * 3
    scores = torch.tensor(SCORES, dtype=torch.float64)
    rewards = token_rewards_loop(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)  # padding = PAD
    assert_close(core.compute_rewards(scores, logprobs, ref_logprobs, mask, 0.1)[0], rewards * mask)
    out = core.reinforce_pp_advantages(rewards, mask)
    assert_close(out, naive_reinforce_pp(rewards, mask))
    assert_close(core.masked_mean(out, mask), torch.tensor(0.0, dtype=torch.float64))


def test_reinforce_pp_whitens_with_global_statistics_across_ranks(mask: torch.Tensor) -> None:
    torch.manual_seed(seeded(2))
    rewards = torch.randn(mask.shape, dtype=torch.float64) * mask
    expected = naive_reinforce_pp(rewards, mask)
    halves = [(rewards[:5], mask[:5]), (rewards[5:], mask[5:])]  # two "ranks" of unequal size
    all_moments = [core.masked_moments(r.flip(1).cumsum(1).flip(1), m) for r, m in halves]

    def all_reduce_sum(local: torch.Tensor) -> torch.Tensor:
        assert any(torch.equal(local, moments) for moments in all_moments)
        return sum(all_moments)

    per_rank = [core.reinforce_pp_advantages(r, m, all_reduce_sum) for r, m in halves]
    assert_close(torch.cat(per_rank), expected)
    assert not torch.allclose(core.reinforce_pp_advantages(*halves[0]), expected[:5])  # local != global


def test_grpo_kl_in_loss_is_kl_penalty_k3() -> None:
    torch.manual_seed(seeded(3))
    logp, ref = -torch.rand(3, 4, dtype=torch.float64) * 4, -torch.rand(3, 4, dtype=torch.float64) * 4
    k3 = core.kl_penalty(logp, ref, "k3")
    for b in range(3):
        for t in range(4):
            d = float(ref[b, t] - logp[b, t])
            assert_close(k3[b, t], torch.tensor(math.exp(d) - d - 1, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Wiring: `make_experience` dispatches on model.ppo.advantage_estimator; kl_in "loss" in `ppo_loss`

KL_COEF = 0.2


def rollout_and_passes(mask: torch.Tensor) -> tuple[Rollout, ForwardPasses]:
    """Responses of LENGTHS after 2 prompt tokens; in the all-equal group the policy is the reference."""
    torch.manual_seed(seeded(4))
    B, R = mask.shape
    input_ids = torch.randint(0, 50, (B, 2 + R))
    attention_mask = torch.cat([torch.ones(B, 2), mask], 1).long()
    logprobs = -torch.rand(B, R, dtype=torch.float64) * 3 * mask
    ref_logprobs = -torch.rand(B, R, dtype=torch.float64) * 3 * mask
    ref_logprobs[4:8] = logprobs[4:8]  # no KL: the group's sequence rewards are all equal
    return Rollout(input_ids, attention_mask, 2, mask), ForwardPasses(
        logprobs, torch.zeros_like(mask), ref_logprobs, None
    )


@pytest.mark.parametrize(
    ("estimator", "scale_by_std"), [("grpo", True), ("grpo", False), ("rloo", True), ("reinforce_pp", True)]
)
def test_make_experience_dispatches_to_the_estimator(mask: torch.Tensor, estimator: str, scale_by_std: bool):
    rollout, passes = rollout_and_passes(mask)
    config = PPOConfig(advantage_estimator=estimator, grpo_scale_by_std=scale_by_std)
    scores = torch.tensor(SCORES, dtype=torch.float64)
    rewards = per_token_rewards(scores, passes, mask, KL_COEF, config).rewards
    experience = make_experience(rollout, passes, rewards, config, K)

    logp, ref = passes.logprobs, passes.ref_logprobs
    sequence = [  # shaped score + the row's -kl_coef * kl tokens
        SCORES[b] - KL_COEF * sum(float(logp[b, t] - ref[b, t]) for t in range(n))
        for b, n in enumerate(LENGTHS)
    ]
    expected = {
        "grpo": lambda: broadcast_loop(naive_grpo(sequence, K, scale_by_std), mask),
        "rloo": lambda: broadcast_loop(naive_rloo(sequence, K), mask),
        "reinforce_pp": lambda: naive_reinforce_pp(
            token_rewards_loop(scores, logp, ref, mask, KL_COEF), mask
        ),
    }[estimator]()
    assert_close(experience.advantages, expected)
    assert torch.isfinite(experience.advantages).all()
    if estimator != "reinforce_pp":
        assert experience.advantages[4:8].abs().max() < 1e-12  # the all-equal group learns nothing, no nan
    assert experience.old_values is None and experience.returns is None  # no value function
    assert_close(experience.ref_logprobs, ref)
    minibatch = experience.select(torch.tensor([0, 5]))
    assert minibatch.returns is None and minibatch.ref_logprobs.shape == minibatch.advantages.shape


def test_gae_keeps_values_and_returns(mask: torch.Tensor) -> None:
    rollout, passes = rollout_and_passes(mask)
    rewards = per_token_rewards(torch.tensor(SCORES), passes, mask, KL_COEF, PPOConfig()).rewards
    experience = make_experience(rollout, passes, rewards, PPOConfig())
    advantages, returns = core.compute_advantages(passes.values, rewards, mask, 1.0, 0.95)
    assert_close(experience.advantages, advantages)
    assert_close(experience.returns, returns)
    assert experience.old_values is passes.values


def test_repeat_prompts_makes_contiguous_groups() -> None:
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "query": ["a", "b"], "index": torch.tensor([7, 9])}
    repeated = repeat_prompts(batch, 3)
    assert repeated["query"] == ["a", "a", "a", "b", "b", "b"]
    assert repeated["index"].tolist() == [7, 7, 7, 9, 9, 9]
    assert repeated["input_ids"].tolist() == [[1, 2]] * 3 + [[3, 4]] * 3


def test_kl_in_loss_adds_k3_against_the_reference(tiny_assets: Path) -> None:
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward")
    with torch.no_grad():  # make the policy differ from its reference
        module.policy.lm.lm_head.weight.add_(0.2 * torch.randn_like(module.policy.lm.lm_head.weight))
    encoded = module.tokenizer(["the movie was", "this film is", "it"], return_tensors="pt", padding=True)
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    rollout = module.generate_rollout(module.policy.lm, batch, torch.tensor([5, 2, 7]))
    passes = forward_passes(module.models, rollout)
    rewards = torch.zeros_like(rollout.response_mask)
    in_reward, in_loss = PPOConfig(), PPOConfig(kl_in="loss", kl_loss_coef=0.3)
    experience = make_experience(rollout, passes, rewards, in_reward).select(torch.arange(3))
    loss_reward, _ = ppo_loss(module.models, experience, in_reward)
    loss_kl, stats = ppo_loss(module.models, experience, in_loss)
    loss_kl.backward()

    logp, ref, mask = passes.logprobs, passes.ref_logprobs, rollout.response_mask
    k3 = [
        math.exp(float(ref[b, t] - logp[b, t])) - float(ref[b, t] - logp[b, t]) - 1
        for b in range(mask.shape[0])
        for t in range(mask.shape[1])
        if mask[b, t]
    ]
    expected = sum(k3) / len(k3)
    assert expected > 1e-4  # the policy has moved
    assert stats["ppo/policy/kl_loss"].item() == pytest.approx(expected, rel=1e-4)
    assert (loss_kl - loss_reward).item() == pytest.approx(0.3 * expected, rel=1e-4)
    assert all(torch.isfinite(p.grad).all() for p in module.policy.parameters() if p.grad is not None)
