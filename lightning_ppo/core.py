"""Pure PPO math for language models: log-probs, masked statistics, KL penalties, GAE, losses, KL control.

Imports only torch so it can be tested without Lightning or transformers. Unless stated otherwise every
tensor is (B, T) over response tokens, right-padded, with a 0/1 (float or bool) `mask` where 1 marks a
real token. Formulas follow TRL 0.11's legacy PPOTrainer; nothing here syncs host and device except
`masked_var(unbiased=True)` (and so `masked_whiten`), which checks the token count.
"""

import torch
from torch import Tensor

KL_PENALTIES = ("kl", "abs", "mse", "full", "k3")

# GAE builds a (T, T) float64 discount matrix up to this length and loops over columns beyond it.
_GAE_MATRIX_MAX_T = 256


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Float32 log-probability of each taken token; logits are cast first so bf16 stays safe.

    Naive equivalent: `log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]`.
    """
    logits = logits.float()  # (B, T, V)
    taken = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return taken - logits.logsumexp(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Float32 entropy of each token's distribution: `logsumexp(l) - sum(softmax(l) * l)`."""
    logits = logits.float()  # (B, T, V)
    return logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)  # (B, T)


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


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "kl") -> Tensor:
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
    kl_penalty: str = "kl",
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


def compute_gae(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns (= advantages + masked values), not whitened.

    Naive equivalent (TRL): loop t from T-1 down to 0, `delta = r_t + gamma * V_{t+1} - V_t` with
    V_T = 0, `A_t = delta + gamma * lam * A_{t+1}`. Values and rewards are masked first.
    """
    values = _zero_outside(values, mask)  # (B, T)
    advantages = _gae(values, _zero_outside(rewards, mask), gamma, lam)
    return advantages, advantages + values


def compute_advantages(
    values: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
    whiten_rewards_masked: bool = False,
) -> tuple[Tensor, Tensor]:
    """Whitened advantages and returns, in TRL 0.11's `compute_advantages` order.

    Masks values and rewards, optionally whitens the rewards (`shift_mean=False`), runs GAE, whitens the
    advantages over the whole batch. TRL's GAE then reads the whitened rewards on padding too (they are
    not 0 there); `whiten_rewards_masked` zeroes them again so only real tokens feed the advantages.
    """
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


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, `masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`.

    Stats (detached, 0-dim): clipfrac, approxkl, policykl, ratio (masked means, TRL's definitions).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = log_ratio.exp()  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses2 = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses2), mask)
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


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """0-dim `1 - var(R - V) / var(R)` over masked tokens: 1 for perfect values, <= 0 for useless ones.

    Biased variances: the Bessel factors cancel in the ratio, and this skips masked_var's sync.
    """
    return 1 - masked_var(returns - values, mask, unbiased=False) / masked_var(returns, mask, unbiased=False)


class AdaptiveKLController:
    """KL coefficient steered towards a target KL, Ziegler et al. 2019 (arXiv:1909.08593, section 2.2).

    `e = clip(kl / target - 1, -0.2, 0.2)`, then `value *= 1 + e * n_steps / horizon`.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Move the coefficient after a batch of n_steps samples whose mean KL was current_kl."""
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore the coefficient saved by state_dict."""
        self.value = state_dict["value"]


class FixedKLController:
    """Constant KL coefficient; `update` is a no-op so both controllers are interchangeable."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Restore the coefficient saved by state_dict."""
        self.value = state_dict["value"]
