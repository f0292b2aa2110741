"""Whole PPO steps against a naive, loop-based reference of TRL 0.11.4's `PPOTrainer.step`.

The reference runs one row at a time (no padding at all), loops over tokens for rewards and GAE, and
follows TRL's loop for epochs, backward batches, gradient accumulation, statistics and early stopping.
The module runs `PPOModule.step` inside a Trainer. SGD makes the update linear in the gradient, so a
wrong loss scale under accumulation shows in the weights (Adam would hide it).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_ppo import core
from lightning_ppo.data import PromptDataModule
from lightning_ppo.experience import forward_passes
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.rollout import Rollout, SamplingConfig, draw_response_lengths
from tests.helpers import seeded

BATCH, LR, SEED = 8, 0.05, 1234


class FixedStep(PPOModule):
    """Every training step is `self.step` on the same given queries, responses and scores."""

    fixed: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]
    returned: list[dict[str, float]]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        torch.manual_seed(seeded(SEED))  # the reference draws the same minibatch permutations
        self.returned.append(self.step(*self.fixed))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.policy.parameters(), lr=LR)


def fixed_data(vocab_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seeded(0))
    query_lengths = [2, 5, 3, 7, 4, 2, 6, 3]
    response_lengths = [4, 9, 6, 15, 5, 12, 7, 10]
    queries = [torch.randint(2, vocab_size, (n,), generator=generator) for n in query_lengths]
    responses = [torch.randint(2, vocab_size, (n,), generator=generator) for n in response_lengths]
    return queries, responses, torch.randn(BATCH, generator=generator) * 2


def run_step(root: Path, ppo: PPOConfig) -> tuple[FixedStep, dict[str, float], dict[str, Any]]:
    """One `step` in a Trainer, and the starting models, for the reference."""
    torch.manual_seed(seeded(0))
    module = FixedStep(policy="tiny:policy", reward_model="tiny:reward", ppo=ppo, log_samples_every_n_steps=0)
    with torch.no_grad():  # a value head that predicts something, and a policy that moved off its reference
        module.policy.v_head.weight.normal_(0, 0.5)
        for weight in module.policy.lm.parameters():
            weight.add_(0.02 * torch.randn_like(weight))
    module.fixed = fixed_data(module.policy.lm.config.vocab_size)
    module.returned = []
    start = {
        "policy": copy.deepcopy(module.policy),
        "reference": copy.deepcopy(module.ref_policy),
        "kl_coef": module.kl_ctl.value,
    }
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(
        module,
        PromptDataModule(dataset="tiny:reviews", tokenizer="tiny:policy", batch_size=BATCH, val_size=BATCH),
    )
    start["optimizer_steps"] = trainer.global_step
    return module, module.returned[0], start


# ------------------------------------------------------------------------------------------------
# The reference: TRL 0.11.4's step, naively


def row_forward(lm, v_head, query, response):
    """Log-probs (R,) and values (R,) (or None) of one unpadded row."""
    ids = torch.cat([query, response])[None]
    out = lm(input_ids=ids, output_hidden_states=True)
    at = slice(len(query) - 1, len(query) - 1 + len(response))
    logprobs = torch.log_softmax(out.logits[0, at].float(), -1).gather(-1, response[:, None])[:, 0]
    values = v_head(out.hidden_states[-1][0, at]).squeeze(-1) if v_head is not None else None
    return logprobs, values


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in rows])


def naive_masked_mean(x, mask):
    return sum(float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]) / float(
        mask.sum()
    )


def naive_masked_var(x, mask):
    entries = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    mean = sum(entries) / len(entries)
    return sum((e - mean) ** 2 for e in entries) / (len(entries) - 1)


def naive_whiten(x, mask, shift_mean=True):
    mean, var = naive_masked_mean(x, mask), naive_masked_var(x, mask)
    whitened = (x - mean) / math.sqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def naive_kl(logp: float, ref: float, kind: str) -> float:
    return {"kl": logp - ref, "abs": abs(logp - ref), "mse": 0.5 * (logp - ref) ** 2}[kind]


def naive_advantages(values, rewards, mask, ppo: PPOConfig):
    """TRL's compute_advantages: mask, optional reward whitening, GAE over every position, whitening."""
    values, rewards = values * mask, rewards * mask
    if ppo.whiten_rewards:
        rewards = naive_whiten(rewards, mask, shift_mean=False)
        if ppo.whiten_rewards_masked:
            rewards = rewards * mask
    B, T = values.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = 0.0
        for t in reversed(range(T)):
            next_value = float(values[b, t + 1]) if t < T - 1 else 0.0
            delta = float(rewards[b, t]) + ppo.gamma * next_value - float(values[b, t])
            last = delta + ppo.gamma * ppo.lam * last
            advantages[b, t] = last
    returns = advantages + values
    return naive_whiten(advantages, mask), returns


def trl_step(start: dict[str, Any], data, ppo: PPOConfig) -> dict[str, Any]:
    """TRL 0.11.4's step on unpadded rows; returns its statistics, the updated policy and the step count."""
    queries, responses, scores = data
    policy, reference = start["policy"], start["reference"]
    lm, v_head = policy.lm, policy.v_head
    R = max(len(r) for r in responses)
    mask = padded([torch.ones(len(r)) for r in responses], R).double()  # (B, R)
    with torch.no_grad():
        rows = [row_forward(lm, v_head, q, r) for q, r in zip(queries, responses, strict=True)]
        ref_rows = [row_forward(reference, None, q, r)[0] for q, r in zip(queries, responses, strict=True)]
    old_logprobs = padded([row[0] for row in rows], R).double()
    old_values = padded([row[1] for row in rows], R).double()
    ref_logprobs = padded(ref_rows, R).double()

    kls = torch.zeros(BATCH, R, dtype=torch.float64)
    rewards = torch.zeros(BATCH, R, dtype=torch.float64)
    for b, response in enumerate(responses):
        for t in range(len(response)):
            kls[b, t] = naive_kl(float(old_logprobs[b, t]), float(ref_logprobs[b, t]), ppo.kl_penalty)
            rewards[b, t] = -start["kl_coef"] * kls[b, t]
        rewards[b, len(response) - 1] += float(scores[b])
    non_score = rewards.clone()
    for b, response in enumerate(responses):
        non_score[b, len(response) - 1] -= float(scores[b])
    advantages, returns = naive_advantages(old_values, rewards, mask, ppo)

    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    torch.manual_seed(seeded(SEED))
    stats: dict[str, list[float]] = {}
    steps = 0
    for _ in range(ppo.ppo_epochs):
        permutation = torch.randperm(BATCH)
        for start_row in range(0, BATCH, ppo.mini_batch_size * ppo.gradient_accumulation_steps):
            for i in range(ppo.gradient_accumulation_steps):
                first = start_row + i * ppo.mini_batch_size
                idx = permutation[first : first + ppo.mini_batch_size]
                new = [row_forward(lm, v_head, queries[j], responses[j]) for j in idx]
                logprobs, vpreds = padded([n[0] for n in new], R), padded([n[1] for n in new], R)
                m, old, adv, ret = mask[idx].float(), old_logprobs[idx].float(), advantages[idx], returns[idx]
                adv, ret, v_old, tokens = adv.float(), ret.float(), old_values[idx].float(), m.sum()
                ratio = torch.exp(logprobs - old)
                pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - ppo.cliprange, 1 + ppo.cliprange))
                v_clipped = torch.clamp(vpreds, v_old - ppo.cliprange_value, v_old + ppo.cliprange_value)
                vf = torch.maximum((vpreds - ret) ** 2, (v_clipped - ret) ** 2)
                loss = (pg * m).sum() / tokens + ppo.vf_coef * 0.5 * (vf * m).sum() / tokens
                (loss / ppo.gradient_accumulation_steps).backward()  # accelerate's backward under accumulate
                minibatch = {
                    "ppo/policy/advantages_mean": naive_masked_mean(adv, m),
                    "ppo/policy/policykl": naive_masked_mean((old - logprobs).detach(), m),
                    "ppo/returns/mean": naive_masked_mean(ret, m),
                    "ppo/returns/var": naive_masked_var(ret, m),
                    "ppo/val/error": naive_masked_mean(((vpreds - ret) ** 2).detach(), m),
                    "ppo/loss/total": float(loss.detach()),
                }
                for name, value in minibatch.items():
                    stats.setdefault(name, []).append(value)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        if ppo.early_stopping and stats["ppo/policy/policykl"][-1] > 1.5 * ppo.target_kl:
            break
    result = {name: sum(values) / len(values) for name, values in stats.items()}
    result["ppo/val/var_explained"] = 1 - result["ppo/val/error"] / result["ppo/returns/var"]
    sequence_kl = [float((kls[b] * mask[b]).sum()) for b in range(BATCH)]
    result["objective/kl"] = sum(sequence_kl) / BATCH
    result["ppo/mean_non_score_reward"] = naive_masked_mean(non_score, mask)
    error = min(max(result["objective/kl"] / ppo.target - 1, -0.2), 0.2)
    result["kl_coef_after"] = start["kl_coef"] * (1 + error * BATCH / ppo.horizon)
    return {"stats": result, "policy": policy, "optimizer_steps": steps}


# ------------------------------------------------------------------------------------------------
# Tests

CASES = {
    # GA: 2 minibatches of 2 rows per optimizer step; abs KL; TRL's reward whitening
    "accumulation_abs_whiten": PPOConfig(
        ppo_epochs=2, mini_batch_size=2, gradient_accumulation_steps=2, kl_penalty="abs", whiten_rewards=True,
        init_kl_coef=0.3,
    ),
    # early stopping after the first epoch; mse KL; the masked whitening variant
    "early_stop_mse_masked": PPOConfig(
        ppo_epochs=4, mini_batch_size=2, kl_penalty="mse", whiten_rewards=True, whiten_rewards_masked=True,
        early_stopping=True, target_kl=1e-6, init_kl_coef=0.3,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def step_and_reference(request, tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    ppo = CASES[request.param]
    module, stats, start = run_step(tmp_path_factory.mktemp("step"), ppo)
    reference = trl_step(copy.deepcopy(start), module.fixed, ppo)
    return request.param, module, stats, start, reference


def test_step_updates_the_weights_as_trls_loop(step_and_reference):
    _, module, _, start, reference = step_and_reference
    assert start["optimizer_steps"] == reference["optimizer_steps"]
    for (name, weight), expected in zip(
        module.policy.state_dict().items(), reference["policy"].state_dict().values(), strict=True
    ):
        torch.testing.assert_close(weight, expected, rtol=1e-4, atol=2e-6, msg=name)


def test_step_statistics_are_trls(step_and_reference):
    case, module, stats, start, reference = step_and_reference
    expected = reference["stats"]
    for name in (
        "ppo/policy/advantages_mean", "ppo/returns/mean", "ppo/returns/var", "ppo/val/error",
        "ppo/val/var_explained", "ppo/loss/total", "ppo/policy/policykl", "objective/kl",
        "ppo/mean_non_score_reward",
    ):  # fmt: skip
        assert stats[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    assert module.kl_ctl.value == pytest.approx(expected["kl_coef_after"], rel=1e-9)
    assert abs(stats["ppo/policy/advantages_mean"]) > 1e-3  # per minibatch: not the whole batch's 0
    ppo = CASES[case]
    steps_per_epoch = BATCH // (ppo.mini_batch_size * ppo.gradient_accumulation_steps)
    assert start["optimizer_steps"] == stats["ppo/epochs"] * steps_per_epoch
    if ppo.early_stopping:
        assert stats["ppo/epochs"] < ppo.ppo_epochs


def test_step_moves_the_policy_and_value_head_but_not_the_reference(step_and_reference):
    _, module, stats, start, _ = step_and_reference
    lm_before, lm_after = start["policy"].lm.state_dict(), module.policy.lm.state_dict()
    assert any(not torch.equal(lm_before[name], lm_after[name]) for name in lm_before)
    assert not torch.equal(start["policy"].v_head.weight, module.policy.v_head.weight)
    for name, weight in module.ref_policy.state_dict().items():
        assert torch.equal(weight, start["reference"].state_dict()[name]), name
    assert all(math.isfinite(value) for value in stats.values()), stats


@pytest.mark.parametrize("masked", [False, True])
def test_whitened_rewards_and_gae_match_trls_loop(masked: bool) -> None:
    torch.manual_seed(seeded(0))
    lengths, width = (5, 1, 8, 3), 8
    mask = padded([torch.ones(n, dtype=torch.float64) for n in lengths], width)
    values = torch.randn(len(lengths), width, dtype=torch.float64)
    rewards = torch.randn(len(lengths), width, dtype=torch.float64) * mask
    ppo = PPOConfig(whiten_rewards=True, whiten_rewards_masked=masked)
    advantages, returns = core.compute_advantages(values, rewards, mask, 1.0, 0.95, True, masked)
    expected_advantages, expected_returns = naive_advantages(values, rewards, mask, ppo)
    torch.testing.assert_close(advantages, expected_advantages, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-10, atol=1e-10)
    # the two variants differ exactly because TRL's GAE reads the whitened padding
    other, _ = core.compute_advantages(values, rewards, mask, 1.0, 0.95, True, not masked)
    assert (other - advantages).abs().max() > 1e-2


def test_step_refuses_a_batch_that_does_not_fill_optimizer_steps(tiny_assets: Path) -> None:
    from lightning_ppo.errors import ConfigError

    ppo = PPOConfig(mini_batch_size=2, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps"):
        ppo.check_batch_size(8)


# ------------------------------------------------------------------------------------------------
# Rollouts with a real `generate`


def tiny_prompts(module: PPOModule) -> dict[str, torch.Tensor]:
    texts = ["the movie was", "a", "this film was really quite", "the plot"]
    return dict(module.tokenizer(texts, return_tensors="pt", padding=True))  # left-padded


def test_recomputed_logprobs_equal_generates_own_scores(tiny_assets: Path) -> None:
    torch.manual_seed(seeded(0))
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward")
    prompts = tiny_prompts(module)
    out = module.policy.lm.generate(
        **prompts, do_sample=True, top_k=0, max_new_tokens=6, pad_token_id=module.tokenizer.pad_token_id,
        eos_token_id=None, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    P = prompts["input_ids"].shape[1]
    response_ids = out.sequences[:, P:]  # (B, 6)
    generated = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, 6, V)
    expected = generated.gather(-1, response_ids[..., None])[..., 0]  # (B, 6)
    rollout = Rollout(
        out.sequences, torch.cat([prompts["attention_mask"], torch.ones_like(response_ids)], 1), P,
        torch.ones_like(response_ids, dtype=torch.float32),
    )  # fmt: skip
    passes = forward_passes(module.models, rollout)
    logprobs, ref_logprobs = passes.logprobs, passes.ref_logprobs
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_logprobs, expected, rtol=0, atol=1e-5)


def test_real_rollout_lengths_stay_in_range_and_stop_at_eos(tiny_assets: Path) -> None:
    torch.manual_seed(seeded(0))
    sampling = SamplingConfig(response_min_length=3, response_max_length=7)
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward", sampling=sampling)
    eos = module.tokenizer.eos_token_id
    head = module.policy.lm.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))  # EOS 0.02 -> ~0.15 per token
    with torch.no_grad():
        head.bias[eos] = 2.0
    prompts = tiny_prompts(module)
    batch = {**prompts, "input_ids": prompts["input_ids"].repeat(8, 1)}
    batch["attention_mask"] = prompts["attention_mask"].repeat(8, 1)
    lengths = draw_response_lengths(32, sampling, module.device)
    rollout = module.generate_rollout(module.policy.lm, batch, lengths)
    kept = rollout.response_mask.sum(-1).long()  # (B,)
    assert rollout.response_ids.shape[1] <= sampling.response_max_length
    stopped_at_eos = 0
    for row, drawn in zip(range(32), lengths.tolist(), strict=True):
        assert sampling.response_min_length <= drawn <= sampling.response_max_length
        tokens = rollout.response_ids[row, :drawn].tolist()
        first_eos = tokens.index(eos) if eos in tokens else None
        expected = drawn if first_eos is None else first_eos + 1  # documented: EOS kept, the rest cut
        assert int(kept[row]) == expected
        assert (rollout.response_ids[row, expected:] == module.tokenizer.pad_token_id).all()
        stopped_at_eos += first_eos is not None and first_eos + 1 < drawn
    assert 0 < stopped_at_eos < 32  # both cases occurred


def test_fp32_lm_head_computes_the_heads_in_float32_under_bf16_autocast(tiny_assets: Path) -> None:
    from lightning_ppo.models import PolicyWithValueHead, load_causal_lm

    policy = PolicyWithValueHead(load_causal_lm("tiny:policy"))
    ids = torch.randint(2, policy.lm.config.vocab_size, (2, 9))
    gaps = {}
    with torch.no_grad():
        exact_logits, _ = policy(ids, torch.ones_like(ids), 4)
        for float32_head, dtype in ((False, torch.bfloat16), (True, torch.float32)):
            policy.float32_head = float32_head
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, values = policy(ids, torch.ones_like(ids), 4)
            assert logits.dtype == dtype and values.dtype == torch.float32
            gaps[float32_head] = float((logits.float() - exact_logits).abs().mean())
    assert gaps[True] < gaps[False] / 2  # only the trunk's bf16 rounding is left
