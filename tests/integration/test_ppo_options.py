"""Wiring of existing PPO options: temperature in every log-prob pass, KL estimator, fixed or adaptive KL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_ppo.experience as experience_lib
from lightning_ppo.cli import main
from lightning_ppo.core import logprobs_from_logits
from lightning_ppo.experience import forward_passes, make_experience
from lightning_ppo.models import response_logits
from lightning_ppo.module import PPOModule
from lightning_ppo.rollout import SamplingConfig
from lightning_ppo.update import ppo_loss
from tests.helpers import TINY, cli_seed_args, scalars


def test_temperature_divides_the_logits_of_old_ref_and_training_passes(tiny_assets: Path):
    temperature = 0.5
    module = PPOModule(
        policy="tiny:policy", reward_model="tiny:reward", sampling=SamplingConfig(temperature=temperature)
    )
    with torch.no_grad():  # make the policy differ from its reference
        module.policy.lm.lm_head.weight.add_(0.1 * torch.randn_like(module.policy.lm.lm_head.weight))
    encoded = module.tokenizer(["the movie was", "this film is"], return_tensors="pt", padding=True)
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    rollout = module.generate_rollout(module.policy.lm, batch, torch.tensor([5, 6]))
    passes = forward_passes(module.models, rollout)
    old, ref = passes.logprobs, passes.ref_logprobs

    args = (rollout.input_ids, rollout.attention_mask, rollout.response_start)
    with torch.no_grad():
        policy_logits, _ = response_logits(module.policy.lm, *args)
        ref_logits, _ = response_logits(module.ref_policy, *args)
    mask = rollout.response_mask
    ids = rollout.response_ids
    torch.testing.assert_close(old, logprobs_from_logits(policy_logits / temperature, ids) * mask)
    torch.testing.assert_close(ref, logprobs_from_logits(ref_logits / temperature, ids) * mask)
    assert not torch.allclose(old, logprobs_from_logits(policy_logits, ids) * mask)

    # the training pass tempers too: on unchanged weights its ratio to the rollout's log-probs is 1 (up to
    # float32 rounding: packed forwards group the rows differently in the no-grad pass and the update)
    rewards = torch.zeros_like(mask)
    rewards[:, 0] = torch.tensor([1.0, -1.0])
    experience = make_experience(rollout, passes, rewards, module.ppo)
    _, stats = ppo_loss(module.models, experience.select(torch.arange(2)), module.ppo)
    torch.testing.assert_close(
        stats["ppo/policy/ratio"], torch.tensor(1.0), atol=1e-6, rtol=0
    )  # float32 noise
    assert stats["ppo/policy/approxkl"] < 1e-12


def _fit(tmp_path: Path, steps: int, *overrides: str):
    return main(
        [
            "fit", "--config", TINY, *cli_seed_args(),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.logger.init_args.save_dir", str(tmp_path),
            *overrides,
        ]
    )  # fmt: skip


@pytest.mark.slow
def test_k3_reaches_the_rewards_and_the_adaptive_controller_follows_its_formula(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    calls = []
    original = experience_lib.compute_rewards

    def spy(scores, logprobs, ref_logprobs, mask, kl_coef, kind):
        result = original(scores, logprobs, ref_logprobs, mask, kl_coef, kind)
        calls.append((logprobs, ref_logprobs, mask, kl_coef, kind, result[1]))
        return result

    monkeypatch.setattr(experience_lib, "compute_rewards", spy)
    cli = _fit(tmp_path, 3, "--model.ppo.kl_penalty", "k3")
    logprobs, ref_logprobs, mask, kl_coef, kind, non_score = calls[-1]
    assert kind == "k3"
    log_ratio = logprobs - ref_logprobs
    assert (log_ratio * mask).abs().max() > 0  # the policy has moved since step 1
    expected = -kl_coef * (torch.expm1(-log_ratio) + log_ratio) * mask  # k3 = (r - 1) - log r, r = ref / pi
    torch.testing.assert_close(non_score, expected)
    assert (non_score <= 0).all()  # k3 >= 0, unlike the plain log-ratio

    logged = scalars(Path(cli.trainer.log_dir))
    coef, kl = logged["objective/kl_coef"], logged["objective/kl"]
    ppo = cli.model.ppo
    for i in range(len(coef) - 1):  # Ziegler et al.: coef *= 1 + clip(kl / target - 1, +-0.2) * n / horizon
        error = min(max(kl[i] / ppo.target - 1, -0.2), 0.2)
        assert coef[i + 1] == pytest.approx(coef[i] * (1 + error * 64 / ppo.horizon), rel=1e-6)
    assert coef[-1] != coef[0]


@pytest.mark.slow
def test_full_kl_runs_end_to_end_and_a_fixed_coefficient_stays_put(tiny_assets: Path, tmp_path: Path):
    cli = _fit(tmp_path, 3, "--model.ppo.kl_penalty", "full", "--model.ppo.adap_kl_ctrl", "false")
    logged = scalars(Path(cli.trainer.log_dir))
    assert all(torch.isfinite(torch.tensor(v)).all() for v in logged.values())
    assert logged["objective/kl_coef"] == [pytest.approx(cli.model.ppo.init_kl_coef)] * 3
    assert logged["ppo/mean_non_score_reward"][-1] < 0  # -coef * exact KL, once the policy has moved


def test_tis_weights_reach_the_policy_loss_and_its_statistics(tiny_assets: Path):
    """model.ppo.tis_cap with an engine's log-probs: the experience carries the capped weights per row
    (sliced with the minibatch), the loss is weighted and `ppo/tis_*` logged; without them, w = 1."""
    from dataclasses import replace

    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward")
    encoded = module.tokenizer(["the movie was", "this film is"], return_tensors="pt", padding=True)
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}
    rollout = module.generate_rollout(module.policy.lm, batch, torch.tensor([5, 6]))
    passes = forward_passes(module.models, rollout)
    mask = rollout.response_mask
    rewards = torch.zeros_like(mask)
    rewards[:, 0] = torch.tensor([1.0, -1.0])
    config = replace(module.ppo, tis_cap=1.5)
    assert make_experience(rollout, passes, rewards, config).tis_weights is None  # HF engine: w = 1
    _, plain_stats = ppo_loss(
        module.models, make_experience(rollout, passes, rewards, module.ppo), module.ppo
    )

    rollout.sampling_logprobs = (passes.logprobs + 0.4 * torch.randn_like(mask)) * mask  # an engine's
    experience = make_experience(rollout, passes, rewards, config)
    expected = torch.where(
        mask.bool(), (passes.logprobs - rollout.sampling_logprobs).exp().clamp(max=1.5), torch.ones_like(mask)
    )
    torch.testing.assert_close(experience.tis_weights, expected)
    row = experience.select(torch.tensor([1]))
    assert row.tis_weights.shape == row.response_mask.shape
    _, stats = ppo_loss(module.models, experience, config)
    torch.testing.assert_close(stats["ppo/tis_weight_mean"], expected[mask.bool()].mean())
    capped = (expected[mask.bool()] >= 1.5 * (1 - 1e-6)).float().mean()
    torch.testing.assert_close(stats["ppo/tis_capped_frac"], capped)
    assert "ppo/tis_weight_mean" not in plain_stats
    assert not torch.allclose(stats["ppo/loss/policy"], plain_stats["ppo/loss/policy"])
