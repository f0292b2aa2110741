"""Pure PPO math for language models: log-probs, masked statistics, KL penalties, GAE, losses, KL control.

Imports only torch. Tensors are (B, T) over right-padded response tokens with a 0/1 `mask`; formulas follow
TRL 0.11's legacy PPOTrainer. Only `masked_var(unbiased=True)` (so `masked_whiten`) syncs host and device."""

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

KLPenalty = Literal["kl", "abs", "mse", "full", "k3"]  # the per-token KL estimators of `kl_penalty`
KL_PENALTIES: tuple[str, ...] = get_args(KLPenalty)

# GAE builds a (T, T) float64 discount matrix up to this length and loops over columns beyond it.
_GAE_MATRIX_MAX_T = 256


def upcast(logits: Tensor) -> Tensor:
    """Logits in float32 at least: bf16/fp16 ones are cast up, float64 ones (precision 64-true) kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Float32 log-probability of each taken token (float64 of float64 logits); cast first, so bf16 is safe.

    Naive equivalent: `log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]`. Any leading shape:
    (B, T, V) logits and (B, T) tokens, or (n, V) and (n,).
    """
    logits = upcast(logits)  # (B, T, V)
    taken = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return taken - logits.logsumexp(-1)


def _zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    # Select rather than multiply by the mask: 0 * inf is nan, so inf/nan padding would leak.
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of the entries where mask is 1 (over everything if dim is None, else along dim)."""
    kept = _zero_outside(x, mask)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of the entries where mask is 1 (over everything if dim is None, else along dim).

    Empty selections give nan (0 / 0), as in TRL.
    """
    count = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / (count.sum() if dim is None else count.sum(dim))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the entries where mask is 1, times n / (n - 1) if unbiased (n = number of entries).

    With unbiased=True it raises ValueError when n < 2; that check syncs host and device (as TRL's does).
    """
    variance = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if not unbiased:
        return variance
    n = mask.to(x.dtype).sum()
    if n < 2:
        raise ValueError(f"masked_var(unbiased=True) needs at least 2 unmasked entries, got {int(n)}")
    return variance * n / (n - 1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise x to masked mean 0 and unbiased masked variance 1; keep the mean if not shift_mean.

    Statistics use masked entries only, but every entry is transformed (as TRL): re-mask if needed.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLPenalty = "kl") -> Tensor:
    """Per-token estimate of KL(policy || reference), (B, T), for one of `KL_PENALTIES`.

    "kl", "abs", "mse" and "k3" take the (B, T) log-probs of the taken tokens; "full" takes the
    (B, T, V) log-distributions and returns the exact per-token KL summed over the vocabulary.
    """
    if kind == "full":
        if logprobs.ndim != 3 or ref_logprobs.ndim != 3:
            raise ValueError(
                'kl_penalty "full" needs full log-distributions of shape (B, T, V) for both policy and '
                f"reference, got {tuple(logprobs.shape)} and {tuple(ref_logprobs.shape)}"
            )
        return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)  # (B, T)
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if kind == "kl":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # Unbiased, non-negative, low-variance estimator k3 = (r - 1) - log r with r = ref / pi:
        # J. Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown kl_penalty {kind!r}; valid kinds: {', '.join(KL_PENALTIES)}")


# compute_rewards' argument `kl_penalty` (TRL's config key) shadows the function of that name.
_kl_penalty = kl_penalty


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    kl_penalty: KLPenalty = "kl",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards: `-kl_coef * kl` everywhere, plus each sequence's score on its last real token.

    Returns (rewards, non_score_rewards, kl), all (B, T) and zero outside the mask. Log-probs are
    (B, T), or (B, T, V) for kl_penalty "full". A row whose mask is all zero receives no score.
    """
    kl = _zero_outside(_kl_penalty(logprobs, ref_logprobs, kl_penalty), mask)  # (B, T)
    non_score_rewards = -kl_coef * kl  # (B, T)
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device)  # (T,)
    last = (mask.long() * positions).argmax(dim=1)  # (B,) index of the last 1 (0 for an empty row)
    on_last = (positions == last.unsqueeze(1)) & mask.bool()  # (B, T) empty rows: all False
    rewards = non_score_rewards + on_last * scores.unsqueeze(1).to(non_score_rewards.dtype)
    return rewards, non_score_rewards, kl


def compute_advantages(
    values: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
    whiten_rewards_masked: bool = False,
) -> tuple[Tensor, Tensor]:
    """Whitened advantages and returns in TRL 0.11's order: mask, optionally whiten the rewards (mean kept),
    GAE, whiten the advantages. TRL's GAE then reads whitened rewards on padding; `whiten_rewards_masked`
    zeroes them there, so that only real tokens feed the advantages."""
    values = _zero_outside(values, mask)  # (B, T)
    rewards = _zero_outside(rewards, mask)  # (B, T)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
        if whiten_rewards_masked:
            rewards = _zero_outside(rewards, mask)
    advantages = _gae(values, rewards, gamma, lam)  # (B, T)
    returns = advantages + values
    return masked_whiten(advantages, mask), returns


def _gae(values: Tensor, rewards: Tensor, gamma: float, lam: float) -> Tensor:
    """GAE over every position of (B, T) values and rewards, as given (no masking). (B, T)"""
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T)
    deltas = rewards + gamma * next_values - values  # (B, T)
    T = values.shape[1]
    if T <= _GAE_MATRIX_MAX_T:
        # A_i = sum_{j >= i} (gamma * lam)^(j - i) * delta_j, as one matmul in float64: exact powers,
        # and immune to TF32 / reduced-precision matmul settings.
        steps = torch.arange(T, device=values.device, dtype=torch.float64)
        exponents = steps.unsqueeze(0) - steps.unsqueeze(1)  # (T, T) j - i, row = i
        discount = torch.where(exponents >= 0, (gamma * lam) ** exponents.clamp(min=0), 0.0)  # (T, T)
        return (deltas.double() @ discount.T).to(values.dtype)  # (B, T)
    columns = [torch.zeros_like(deltas[:, 0])]
    for t in reversed(range(T)):
        columns.append(deltas[:, t] + gamma * lam * columns[-1])
    return torch.stack(columns[:0:-1], dim=1)  # (B, T)


def tis_weights(old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights (B, T), `min(exp(old - sampling), cap)`, detached, 1 off `mask`.

    The rollout was drawn from the engine's distribution (`sampling_logprobs`), not the trainer's
    (`old_logprobs`): each token's policy-gradient loss is weighted by their probability ratio, capped
    (veRL's `tis_imp_ratio_cap`; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"). The log-ratio is clamped at log(cap) before exp, so no overflow."""
    with torch.no_grad():
        log_ratio = (old_logprobs.float() - sampling_logprobs.float()).clamp(max=math.log(cap))
        return torch.where(mask.bool(), log_ratio.exp(), torch.ones_like(log_ratio))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, `masked_mean(w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`.

    `weights` (B, T): per-token importance weights (`tis_weights`, no gradient), None for w = 1 (the same
    loss bit for bit). Stats (detached, 0-dim): clipfrac, approxkl, policykl, ratio (masked means, TRL's
    definitions, unweighted).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = log_ratio.exp()  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses2 = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    token_losses = torch.maximum(pg_losses, pg_losses2)  # (B, T)
    if weights is not None:  # after the clip, as veRL: the weight scales the clipped objective
        token_losses = token_losses * weights.detach()
    loss = masked_mean(token_losses, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).to(ratio.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "policykl": masked_mean(-log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, `0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))`.

    Stats (detached, 0-dim): clipfrac, vpred (mean prediction), error (mean squared error).
    """
    values_clipped = values.clamp(old_values - cliprange_value, old_values + cliprange_value)  # (B, T)
    vf_losses = (values - returns) ** 2  # (B, T)
    vf_losses2 = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_losses2 > vf_losses).to(values.dtype), mask),
            "vpred": masked_mean(values, mask),
            "error": masked_mean(vf_losses, mask),
        }
    return loss, stats


class KLController:
    """A KL coefficient `value` that checkpoints save and restore; subclasses say how `update` moves it."""

    value: float

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Move the coefficient after a batch of n_steps samples whose mean KL was current_kl."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore the coefficient saved by state_dict."""
        self.value = state_dict["value"]


class AdaptiveKLController(KLController):
    """KL coefficient steered towards a target KL, Ziegler et al. 2019 (arXiv:1909.08593, section 2.2).

    `e = clip(kl / target - 1, -0.2, 0.2)`, then `value *= 1 + e * n_steps / horizon`.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController(KLController):
    """Constant KL coefficient; `update` is a no-op so both controllers are interchangeable."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""


def kl_controller(adaptive: bool, init_kl_coef: float, target: float, horizon: int) -> KLController:
    """The adaptive controller (`model.ppo.adap_kl_ctrl`), or the fixed coefficient `init_kl_coef`."""
    return (
        AdaptiveKLController(init_kl_coef, target, horizon) if adaptive else FixedKLController(init_kl_coef)
    )


# ---------------------------------------------------------------- fused log-probs, critic-free estimators
# GRPO's KL-in-loss term is `masked_mean(kl_penalty(logprobs, ref_logprobs, "k3"), mask)`.


# The fused pass walks the batch in chunks of about this many logits (64 MiB of float32).
_FUSED_CHUNK_ELEMENTS = 2**24


class _LogprobsAndEntropy(torch.autograd.Function):
    """Taken-token log-probs (differentiable) and entropies (a statistic) from one logsumexp."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        rows = max(1, _FUSED_CHUNK_ELEMENTS // max(1, logits[0].numel()))
        lse, logprobs, entropy = [], [], []
        for chunk, chunk_tokens in zip(logits.split(rows), tokens.split(rows), strict=True):
            upcast_chunk = upcast(chunk)  # (b, R, V) cast once
            chunk_lse = upcast_chunk.logsumexp(-1, keepdim=True)  # (b, R, 1)
            taken = upcast_chunk.gather(-1, chunk_tokens.unsqueeze(-1)).squeeze(-1)  # (b, R)
            log_distribution = upcast_chunk - chunk_lse  # (b, R, V) log-softmax from the same lse
            # -sum(p * log p) equals lse - sum(p * l) but skips that difference of two large numbers:
            # 5-10x closer to a float64 reference on logits of scale 4-30.
            entropy.append(-log_distribution.exp().mul_(log_distribution).sum(-1))  # (b, R)
            logprobs.append(taken - chunk_lse.squeeze(-1))  # (b, R)
            lse.append(chunk_lse)
        ctx.save_for_backward(logits, torch.cat(lse), tokens)
        entropy = torch.cat(entropy)  # (B, R)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logprobs), entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor, grad_entropy: Tensor | None) -> tuple[Tensor, None]:
        # d log p_y / d l = onehot(y) - softmax(l), built in one float32 (B, R, V) buffer (bf16 logits
        # promote against the float32 lse; float64 ones stay float64) instead of autograd's separate
        # gather and logsumexp gradients.
        logits, lse, tokens = ctx.saved_tensors
        grad_logprobs = grad_logprobs.to(lse.dtype)  # the loss may hand back another float type
        grad = (logits - lse).exp_().mul_(-grad_logprobs.unsqueeze(-1))  # (B, R, V) float32 or float64
        grad.scatter_add_(-1, tokens.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
        return grad.to(logits.dtype), None


def logprobs_and_entropy(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Taken-token log-probs (with gradient) and entropies (a statistic), float32 or more, from one logsumexp.

    Naive equivalent: `logprobs_from_logits(logits, tokens)` and `logsumexp(l) - sum(softmax(l) * l)`;
    less peak memory, as the forward works in chunks. (B, R, V) logits, or (n, V) of n tokens.
    """
    return _LogprobsAndEntropy.apply(logits, tokens)


def _check_groups(batch_size: int, k: int, estimator: str) -> None:
    if k < 2:
        raise ValueError(f"{estimator} compares the k samples of a prompt and needs k >= 2, got k={k}")
    if batch_size % k:
        raise ValueError(
            f"{estimator} needs whole groups: a batch of {batch_size} rows is not divisible by k={k}"
        )


def grpo_advantages(
    scores: Tensor, mask: Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """GRPO advantages, (B, R): each sequence's `(r - group mean) / (group std + eps)` on its every token.

    Groups are contiguous rows [g*k, (g+1)*k); `scale_by_std=False` is Dr. GRPO (arXiv:2503.20783)."""
    _check_groups(scores.shape[0], k, "GRPO")
    grouped = scores.reshape(-1, k)  # (B / k, k)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # (B / k, k)
    if scale_by_std:
        # Unbiased group std and eps 1e-4, as TRL's GRPOTrainer (`rewards.view(-1, G).std(dim=1)`);
        # DeepSeekMath (arXiv:2402.03300, section 4.1.2) only says "normalized by the group std".
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return _zero_outside(advantages.reshape(-1, 1).expand(mask.shape), mask)  # (B, R)


def rloo_advantages(rewards: Tensor, mask: Tensor, k: int) -> Tensor:
    """RLOO advantages, (B, R): sequence reward minus the mean of the k-1 others of its group, every token.

    The sequence reward sums `compute_rewards`' per-token rewards, so the KL stays in it (arXiv:2402.14740,
    TRL's RLOOTrainer). Groups are contiguous rows [g*k, (g+1)*k) (TRL's are k-major)."""
    _check_groups(rewards.shape[0], k, "RLOO")
    grouped = masked_sum(rewards, mask, dim=1).view(-1, k)  # (B / k, k) sequence rewards
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (B / k, k)
    return _zero_outside((grouped - baseline).reshape(-1, 1).expand(mask.shape), mask)  # (B, R)


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """(3,) float64 `[count, sum, sum of squares]` of the masked entries: summable across ranks."""
    kept = _zero_outside(x, mask).double()  # (B, R)
    return torch.stack([mask.double().sum(), kept.sum(), (kept**2).sum()])


def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, sum_across_ranks: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """REINFORCE++ advantages (arXiv:2501.03262), (B, R): the whitened return to go (gamma 1) of rewards.

    `masked_moments` pass through `sum_across_ranks`: every rank whitens with the global batch's mean and
    biased variance; rstd = rsqrt(max(var, 1e-8)) as OpenRLHF's `_normalize_advantages`."""
    kept = _zero_outside(rewards, mask)  # (B, R)
    returns = kept.flip(1).cumsum(1).flip(1)  # (B, R) return to go, gamma = 1
    moments = masked_moments(returns, mask)  # (3,)
    if sum_across_ranks is not None:
        moments = sum_across_ranks(moments)
    count, total, total_sq = moments
    mean = total / count
    var = total_sq / count - mean**2
    advantages = (returns - mean) * var.clamp(min=1e-8).rsqrt()  # float64 statistics
    return _zero_outside(advantages.to(rewards.dtype), mask)  # (B, R)
