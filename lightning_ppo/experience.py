"""Experience for the PPO epochs: the no-grad passes over a scored rollout, per-token rewards, advantages.

Steps 3-5 of a PPO iteration as plain functions, in TRL 0.11's order: `forward_passes`, then
`experience_from_scores`: `per_token_rewards`, `make_experience`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ppo.config import PPOConfig
from lightning_ppo.core import (
    compute_advantages,
    compute_rewards,
    grpo_advantages,
    logprobs_from_logits,
    masked_sum,
    reinforce_pp_advantages,
    rloo_advantages,
    tis_weights,
)
from lightning_ppo.models import PPOModels, eval_mode
from lightning_ppo.packing import (
    PackedRows,
    RowLengths,
    TokenBudget,
    bucketed,
    on_response_tokens,
    pad_responses,
    response_inputs,
)
from lightning_ppo.rollout import Rollout
from lightning_ppo.shaping import RunningMoments, Scores, ShapingConfig, shape_scores

PER_TOKEN_FIELDS = (
    "response_mask",
    "old_logprobs",
    "ref_logprobs",
    "old_values",
    "advantages",
    "returns",
    "tis_weights",
)


@dataclass
class Experience:
    """A rollout with everything the PPO epochs need. Row-indexable for minibatches."""

    input_ids: Tensor  # (B, P + R) left-padded prompt then right-padded response
    attention_mask: Tensor  # (B, P + R)
    response_start: int  # P
    response_mask: Tensor  # (B, R) float32, 1 on response tokens that count
    old_logprobs: Tensor  # (B, R) float32 log pi_old(a_t | s_t)
    ref_logprobs: Tensor  # (B, R) float32 log pi_ref(a_t | s_t), for the KL term of kl_in "loss"
    old_values: Tensor | None  # (B, R) float32 V_old(s_t); None for a critic-free estimator
    advantages: Tensor  # (B, R) float32
    returns: Tensor | None  # (B, R) float32 value targets; None for a critic-free estimator (no value loss)
    prompt_pad: Tensor  # (B,) long, on CPU: left padding of each prompt
    response_len: Tensor  # (B,) long, on CPU: real response tokens of each row
    tis_weights: Tensor | None = None  # (B, R) float32 truncated IS weights (model.ppo.tis_cap); None: w = 1

    def select(self, rows: Tensor) -> Experience:
        """The given rows, padded only to the longest prompt and response among them."""
        left = int(self.prompt_pad[rows].min())
        right = int(self.response_len[rows].max())
        on_device = rows.to(self.input_ids.device)
        end = self.response_start + right
        per_token = {
            name: None if (value := getattr(self, name)) is None else value[on_device, :right]
            for name in PER_TOKEN_FIELDS
        }
        return Experience(
            input_ids=self.input_ids[on_device, left:end],
            attention_mask=self.attention_mask[on_device, left:end],
            response_start=self.response_start - left,
            prompt_pad=self.prompt_pad[rows] - left,
            response_len=self.response_len[rows],
            **per_token,
        )

    @property
    def response_ids(self) -> Tensor:  # (B, R)
        return self.input_ids[:, self.response_start :]

    @property
    def lengths(self) -> RowLengths:
        return RowLengths(self.prompt_pad, self.response_len)


@dataclass
class ForwardPasses:
    """The no-grad passes over a rollout, masked to its response tokens."""

    logprobs: Tensor  # (B, R) float32 log pi_old(a_t | s_t)
    values: Tensor  # (B, R) float32 V_old(s_t)
    ref_logprobs: Tensor  # (B, R) float32 log pi_ref(a_t | s_t)
    full: tuple[Tensor, Tensor] | None  # (B, R, V) both log-distributions, for kl_penalty "full" only

    @property
    def per_token(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.logprobs, self.values, self.ref_logprobs


@dataclass
class Rewards:
    """Per-token rewards of a rollout and the KL they hold."""

    rewards: Tensor  # (B, R) -kl_coef * kl, plus the score on each response's last token
    non_score_rewards: Tensor  # (B, R) -kl_coef * kl
    kls: Tensor  # (B, R) the chosen KL estimator per token (TRL's `kls`)


def forward_passes(
    models: PPOModels,
    rollout: Rollout,
    chunk: int | None = None,
    full_kl: bool = False,
    length_buckets: int | None = None,
    budget: TokenBudget | None = None,
) -> ForwardPasses:
    """One no-grad forward of the policy (log-probs and values) and one of the reference, in eval mode.

    `chunk` rows per forward; `full_kl` also keeps both log-distributions; `length_buckets` packs the rows
    (`packing.bucketed`), None keeps the rollout's padded layout; a token `budget` replaces both chunks
    and buckets by its micro-batches."""
    trainable = [m for m in (models.policy, models.critic) if m is not None]
    with torch.no_grad(), eval_mode(*trainable):
        if length_buckets is None:
            if budget is not None:  # every row of the padded layout is as wide
                rows = rollout.input_ids.shape[0]
                fitting = max(1, budget.max_tokens // rollout.input_ids.shape[1])
                chunk = -(-rows // budget.agree(-(-rows // fitting)))
            parts = [
                _forward_rows(models, part, full_kl)
                for part in rollout.split(chunk or rollout.input_ids.shape[0])
            ]
            outputs = [torch.cat(column) for column in zip(*parts, strict=True)]
        else:
            lengths = RowLengths.of(rollout.attention_mask, rollout.response_start, rollout.response_mask)
            outputs, _ = bucketed(
                # the heads only on the real tokens, unless both full distributions are kept
                lambda rows: _forward_rows(models, rows, full_kl, None if full_kl else rows.response_mask),
                rollout.input_ids,
                rollout.response_start,
                lengths,
                torch.arange(rollout.input_ids.shape[0]),
                length_buckets,
                chunk,
                budget,
            )
    mask = rollout.response_mask
    outputs = [pad_responses(output, mask.shape[1]) for output in outputs]  # trailing all-masked columns
    return ForwardPasses(
        logprobs=outputs[0] * mask,
        values=outputs[1] * mask,
        ref_logprobs=outputs[2] * mask,
        full=(outputs[3], outputs[4]) if full_kl else None,
    )


def _forward_rows(
    models: PPOModels, rows: Rollout | PackedRows, full_kl: bool, token_mask: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Log-probs, values (zeros without a value model) and reference log-probs of the response tokens,
    (B, R) each, then with `full_kl` both log-distributions (B, R, V); not masked.

    `token_mask` (B, R) bool: the LM heads run only at its True positions, the log-probs 0 elsewhere."""
    args = response_inputs(rows, token_mask)
    logits, values = models.logits_and_values(*args)  # (B, R, V) or (n, V), (B, R)
    ref_logits = models.reference_logits(*args)  # (B, R, V) or (n, V)
    logprobs, ref_logprobs = (
        on_response_tokens(logprobs_from_logits, x, rows.response_ids, token_mask)
        for x in (logits, ref_logits)
    )
    outputs = (
        logprobs,
        torch.zeros(rows.response_ids.shape, device=logprobs.device) if values is None else values,
        ref_logprobs,
    )
    if full_kl:
        outputs += (torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1))
    return outputs


def per_token_rewards(
    scores: Tensor, passes: ForwardPasses, mask: Tensor, kl_coef: float, config: PPOConfig
) -> Rewards:
    """`-kl_coef * kl` on every response token, plus each (shaped) score (B,) on its last token."""
    kl_inputs = passes.full if passes.full is not None else (passes.logprobs, passes.ref_logprobs)
    rewards, non_score_rewards, kls = compute_rewards(scores, *kl_inputs, mask, kl_coef, config.kl_penalty)
    return Rewards(rewards, non_score_rewards, kls)


def experience_from_scores(
    rollout: Rollout,
    passes: ForwardPasses,
    scores: Scores,
    kl_coef: float,
    config: PPOConfig,
    shaping: ShapingConfig,
    moments: RunningMoments,
    samples_per_prompt: int = 1,
    sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Rewards, Experience]:
    """The shaped scores (B,), the per-token rewards (`-kl_coef * kl`, plus each shaped score on its last
    token) and the experience with its advantages (`make_experience`)."""
    shaped = shape_scores(scores.local, scores.has_eos, shaping, moments, scores.everyone())
    rewards = per_token_rewards(shaped, passes, rollout.response_mask, kl_coef, config)
    experience = make_experience(
        rollout, passes, rewards.rewards, config, samples_per_prompt, sum_across_ranks
    )
    return shaped, rewards, experience


def make_experience(
    rollout: Rollout,
    passes: ForwardPasses,
    rewards: Tensor,
    config: PPOConfig,
    samples_per_prompt: int = 1,
    sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
) -> Experience:
    """Advantages of `config.advantage_estimator` from the per-token rewards (B, R), packed for the epochs.

    Rows [g*k, (g+1)*k) are prompt g's k samples (grpo, rloo); `sum_across_ranks` gives reinforce_pp the
    global batch's statistics. Critic-free estimators have no returns. With `config.tis_cap` and an engine
    that reported its log-probs, the truncated importance-sampling weights (`core.tis_weights`)."""
    mask = rollout.response_mask
    if config.advantage_estimator == "gae":
        advantages, returns = compute_advantages(
            passes.values,
            rewards,
            mask,
            config.gamma,
            config.lam,
            config.whiten_rewards,
            config.whiten_rewards_masked,
        )
        values, returns = passes.values, returns.detach()
    else:  # no value function: no old values to clip around, no value targets
        advantages = critic_free_advantages(rewards, mask, config, samples_per_prompt, sum_across_ranks)
        values = returns = None
    lengths = RowLengths.of(rollout.attention_mask, rollout.response_start, mask)
    return Experience(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        response_start=rollout.response_start,
        response_mask=mask,
        old_logprobs=passes.logprobs,
        ref_logprobs=passes.ref_logprobs,
        old_values=values,
        advantages=advantages.detach(),
        returns=returns,
        prompt_pad=lengths.prompt_pad,
        response_len=lengths.response_len,
        tis_weights=(
            None
            if config.tis_cap is None or rollout.sampling_logprobs is None
            else tis_weights(passes.logprobs, rollout.sampling_logprobs, mask, config.tis_cap)
        ),
    )


def critic_free_advantages(
    rewards: Tensor,
    mask: Tensor,
    config: PPOConfig,
    samples_per_prompt: int,
    sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(B, R) advantages of grpo, rloo or reinforce_pp from the per-token rewards (B, R).

    grpo and rloo read each row's sequence reward: its shaped score plus its `-kl_coef * kl` tokens.
    """
    if config.advantage_estimator == "grpo":
        sequence_rewards = masked_sum(rewards, mask, dim=1)  # (B,)
        return grpo_advantages(sequence_rewards, mask, samples_per_prompt, config.grpo_scale_by_std)
    if config.advantage_estimator == "rloo":
        return rloo_advantages(rewards, mask, samples_per_prompt)
    return reinforce_pp_advantages(rewards, mask, sum_across_ranks)
