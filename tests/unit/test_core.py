"""Tier 1: lightning_ppo.core against naive references written as python loops over samples and tokens.

The references follow TRL 0.11's formulas (see /work/shared/FIELD_NOTES.md) and read only real tokens;
padding is filled with 1e6 so any leak through the mask shows up.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_ppo import core
from tests.helpers import seeded

PAD = 1e6
LENGTHS = (7, 1, 4, 7, 2, 5)  # right-padded rows of a (6, 7) batch, incl. a length-1 row
T = max(LENGTHS)


def right_padded_mask(lengths: tuple[int, ...], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    return mask


def padded(x: torch.Tensor, mask: torch.Tensor, fill: float = PAD) -> torch.Tensor:
    """x with every masked-out position overwritten by fill (works for (B, T) and (B, T, V))."""
    m = mask.bool() if x.ndim == 2 else mask.bool().unsqueeze(-1).expand_as(x)
    return x.masked_fill(~m, fill)


def real_entries(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t] == 1]


def naive_mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def naive_var(xs: list[float], unbiased: bool) -> float:
    mean = naive_mean(xs)
    return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1 if unbiased else len(xs))


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


@pytest.fixture
def mask() -> torch.Tensor:
    return right_padded_mask(LENGTHS, T).double()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(seeded(0))


# ---------------------------------------------------------------- log-probs and entropy


def test_logprobs_from_logits_matches_log_softmax_loop() -> None:
    logits = torch.randn(3, 5, 11, dtype=torch.float64) * 3
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.empty(3, 5, dtype=torch.float64)
    for b in range(3):
        for t in range(5):
            row = logits[b, t]
            log_norm = math.log(sum(math.exp(float(v)) for v in row))
            expected[b, t] = float(row[tokens[b, t]]) - log_norm
    out = core.logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float64  # float64 logits (precision 64-true) stay float64
    assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_logprobs_from_bf16_logits_are_float32_and_exact_for_the_upcast_logits() -> None:
    logits = (torch.randn(2, 4, 50) * 5).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 4))
    out = core.logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32
    upcast = logits.float()
    for b in range(2):
        for t in range(4):
            expected = torch.log_softmax(upcast[b, t].double(), dim=0)[tokens[b, t]]
            assert_close(out[b, t].double(), expected, rtol=1e-6, atol=1e-6)


def test_entropy_matches_loop() -> None:
    logits = torch.randn(3, 4, 9, dtype=torch.float64) * 2
    _, out = core.logprobs_and_entropy(logits, torch.zeros(3, 4, dtype=torch.long))
    assert out.dtype == torch.float64  # float64 logits (precision 64-true) stay float64
    for b in range(3):
        for t in range(4):
            weights = [math.exp(float(v)) for v in logits[b, t]]
            probs = [w / sum(weights) for w in weights]
            expected = -sum(p * math.log(p) for p in probs)
            assert_close(out[b, t].double(), scalar(expected), rtol=1e-6, atol=1e-6)


def test_entropy_of_bf16_logits_is_float32() -> None:
    _, entropy = core.logprobs_and_entropy(
        torch.randn(2, 3, 7).to(torch.bfloat16), torch.zeros(2, 3, dtype=torch.long)
    )
    assert entropy.dtype == torch.float32


# ---------------------------------------------------------------- masked statistics


def test_masked_sum_and_mean_read_only_real_tokens(mask: torch.Tensor) -> None:
    x = padded(torch.randn(mask.shape, dtype=torch.float64), mask)
    xs = real_entries(x, mask)
    assert_close(core.masked_sum(x, mask), scalar(sum(xs)))
    assert_close(core.masked_mean(x, mask), scalar(naive_mean(xs)))


def test_masked_sum_and_mean_along_dim(mask: torch.Tensor) -> None:
    x = padded(torch.randn(mask.shape, dtype=torch.float64), mask)
    row_sums = [sum(float(x[b, t]) for t in range(n)) for b, n in enumerate(LENGTHS)]
    assert_close(core.masked_sum(x, mask, dim=1), torch.tensor(row_sums, dtype=torch.float64))
    assert_close(
        core.masked_mean(x, mask, dim=1),
        torch.tensor([s / n for s, n in zip(row_sums, LENGTHS, strict=True)], dtype=torch.float64),
    )
    column_means = []
    for t in range(T):
        column = [float(x[b, t]) for b in range(len(LENGTHS)) if mask[b, t] == 1]
        column_means.append(naive_mean(column))
    assert_close(core.masked_mean(x, mask, dim=0), torch.tensor(column_means, dtype=torch.float64))


def test_masked_stats_accept_bool_masks(mask: torch.Tensor) -> None:
    x = padded(torch.randn(mask.shape, dtype=torch.float64), mask, fill=float("inf"))
    xs = real_entries(x, mask)
    assert_close(core.masked_mean(x, mask.bool()), scalar(naive_mean(xs)))
    assert_close(core.masked_var(x, mask.bool()), scalar(naive_var(xs, unbiased=True)))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(mask: torch.Tensor, unbiased: bool) -> None:
    x = padded(torch.randn(mask.shape, dtype=torch.float64) * 2 + 1, mask)
    expected = naive_var(real_entries(x, mask), unbiased)
    assert_close(core.masked_var(x, mask, unbiased=unbiased), scalar(expected))


@pytest.mark.parametrize("n_real", [0, 1])
def test_unbiased_masked_var_needs_two_entries(n_real: int) -> None:
    mask = torch.zeros(2, 3)
    mask[0, :n_real] = 1
    with pytest.raises(ValueError, match="at least 2"):
        core.masked_var(torch.randn(2, 3), mask)


def test_masked_whiten_matches_loop_and_normalises(mask: torch.Tensor) -> None:
    x = padded(torch.randn(mask.shape, dtype=torch.float64) * 3 + 2, mask)
    xs = real_entries(x, mask)
    mean, var = naive_mean(xs), naive_var(xs, unbiased=True)
    out = core.masked_whiten(x, mask)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):  # padding is transformed too, as in TRL
            expected = (float(x[b, t]) - mean) / math.sqrt(var + 1e-8)
            assert_close(out[b, t], scalar(expected))
    whitened = real_entries(out, mask)
    assert abs(naive_mean(whitened)) < 1e-12
    assert abs(naive_var(whitened, unbiased=True) - 1) < 1e-8


def test_masked_whiten_without_shift_keeps_the_mean(mask: torch.Tensor) -> None:
    x = padded(torch.randn(mask.shape, dtype=torch.float64) * 3 + 2, mask)
    xs = real_entries(x, mask)
    kept = real_entries(core.masked_whiten(x, mask, shift_mean=False), mask)
    assert_close(scalar(naive_mean(kept)), scalar(naive_mean(xs)))
    assert abs(naive_var(kept, unbiased=True) - 1) < 1e-8


# ---------------------------------------------------------------- KL penalties


def naive_token_kl(logp: float, ref_logp: float, kind: str) -> float:
    if kind == "kl":
        return logp - ref_logp
    if kind == "abs":
        return abs(logp - ref_logp)
    if kind == "mse":
        return 0.5 * (logp - ref_logp) ** 2
    assert kind == "k3"
    ratio = math.exp(ref_logp) / math.exp(logp)  # pi_ref / pi
    return ratio - 1 - math.log(ratio)


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "k3"])
def test_token_kl_penalties_match_loop(kind: str) -> None:
    logp = -torch.rand(4, 6, dtype=torch.float64) * 5
    ref_logp = -torch.rand(4, 6, dtype=torch.float64) * 5
    out = core.kl_penalty(logp, ref_logp, kind)
    for b in range(4):
        for t in range(6):
            expected = naive_token_kl(float(logp[b, t]), float(ref_logp[b, t]), kind)
            assert_close(out[b, t], scalar(expected))


def test_k3_is_non_negative_and_zero_when_equal() -> None:
    logp = -torch.rand(3, 5, dtype=torch.float64) * 4
    assert (core.kl_penalty(logp, -torch.rand(3, 5, dtype=torch.float64) * 4, "k3") >= 0).all()
    assert_close(core.kl_penalty(logp, logp, "k3"), torch.zeros_like(logp))


def test_full_kl_matches_double_loop_over_vocabulary() -> None:
    logp = torch.log_softmax(torch.randn(3, 4, 8, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(torch.randn(3, 4, 8, dtype=torch.float64), -1)
    out = core.kl_penalty(logp, ref_logp, "full")
    assert out.shape == (3, 4)
    for b in range(3):
        for t in range(4):
            expected = 0.0
            for v in range(8):
                p = math.exp(float(logp[b, t, v]))
                expected += p * (float(logp[b, t, v]) - float(ref_logp[b, t, v]))
            assert_close(out[b, t], scalar(expected))
    assert (out > 0).all()


def test_full_kl_explains_the_shape_it_needs() -> None:
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        core.kl_penalty(torch.randn(2, 3), torch.randn(2, 3), "full")


def test_unknown_kl_kind_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="kl, abs, mse, full, k3"):
        core.kl_penalty(torch.randn(2, 3), torch.randn(2, 3), "forward")
    assert core.KL_PENALTIES == ("kl", "abs", "mse", "full", "k3")


# ---------------------------------------------------------------- per-token rewards


def naive_rewards(scores, logp, ref_logp, mask, kl_coef, kind):
    B, width = mask.shape
    rewards = [[0.0] * width for _ in range(B)]
    non_score = [[0.0] * width for _ in range(B)]
    kls = [[0.0] * width for _ in range(B)]
    for b in range(B):
        last = None
        for t in range(width):
            if mask[b, t] != 1:
                continue
            if kind == "full":
                kl = sum(
                    math.exp(float(logp[b, t, v])) * (float(logp[b, t, v]) - float(ref_logp[b, t, v]))
                    for v in range(logp.shape[-1])
                )
            else:
                kl = naive_token_kl(float(logp[b, t]), float(ref_logp[b, t]), kind)
            kls[b][t] = kl
            non_score[b][t] = rewards[b][t] = -kl_coef * kl
            last = t
        if last is not None:
            rewards[b][last] += float(scores[b])
    return tuple(torch.tensor(rows, dtype=torch.float64) for rows in (rewards, non_score, kls))


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "k3"])
@pytest.mark.parametrize("tensor_coef", [False, True])
def test_compute_rewards_matches_loop(mask: torch.Tensor, kind: str, tensor_coef: bool) -> None:
    scores = torch.randn(mask.shape[0], dtype=torch.float64) * 3
    logp = padded(-torch.rand(mask.shape, dtype=torch.float64) * 5, mask)
    ref_logp = padded(-torch.rand(mask.shape, dtype=torch.float64) * 5, mask, fill=-PAD)
    kl_coef = torch.tensor(0.2, dtype=torch.float64) if tensor_coef else 0.2
    out = core.compute_rewards(scores, logp, ref_logp, mask, kl_coef, kl_penalty=kind)
    for got, expected in zip(out, naive_rewards(scores, logp, ref_logp, mask, 0.2, kind), strict=True):
        assert_close(got, expected)


def test_compute_rewards_full_kl_takes_log_distributions(mask: torch.Tensor) -> None:
    scores = torch.randn(mask.shape[0], dtype=torch.float64)
    logp = torch.log_softmax(torch.randn(*mask.shape, 5, dtype=torch.float64), -1)
    ref_logp = torch.log_softmax(torch.randn(*mask.shape, 5, dtype=torch.float64), -1)
    out = core.compute_rewards(scores, logp, ref_logp, mask, 0.1, kl_penalty="full")
    for got, expected in zip(out, naive_rewards(scores, logp, ref_logp, mask, 0.1, "full"), strict=True):
        assert_close(got, expected)


def test_score_lands_on_the_last_real_token_only(mask: torch.Tensor) -> None:
    scores = torch.arange(1.0, mask.shape[0] + 1, dtype=torch.float64) * 10
    logp = torch.zeros(mask.shape, dtype=torch.float64)  # zero KL: rewards are the scores alone
    rewards, non_score, kl = core.compute_rewards(scores, logp, logp, mask, 0.2)
    assert not non_score.any() and not kl.any()
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            assert rewards[b, t] == (scores[b] if t == n - 1 else 0.0)


def test_empty_row_gets_no_score_and_no_penalty() -> None:
    mask = right_padded_mask((3, 0, 1), 4)
    scores = torch.tensor([1.0, 5.0, -2.0])
    logp, ref_logp = -torch.rand(3, 4), -torch.rand(3, 4)
    rewards, non_score, kl = core.compute_rewards(scores, logp, ref_logp, mask, 0.5)
    assert not rewards[1].any() and not non_score[1].any() and not kl[1].any()
    assert (non_score * (1 - mask) == 0).all() and (rewards * (1 - mask) == 0).all()
    assert_close(rewards[2, 0], non_score[2, 0] - 2.0)
    assert_close(rewards[0, 2], non_score[0, 2] + 1.0)


# ---------------------------------------------------------------- GAE


def naive_gae(values, rewards, mask, gamma, lam):
    """TRL's compute_advantages without whitening, one sample at a time, in python floats."""
    B, width = values.shape
    advantages = torch.zeros(B, width, dtype=torch.float64)
    returns = torch.zeros(B, width, dtype=torch.float64)
    for b in range(B):
        v = [float(values[b, t]) if mask[b, t] == 1 else 0.0 for t in range(width)]
        r = [float(rewards[b, t]) if mask[b, t] == 1 else 0.0 for t in range(width)]
        last_gae = 0.0
        for t in reversed(range(width)):
            next_value = v[t + 1] if t < width - 1 else 0.0
            delta = r[t] + gamma * next_value - v[t]
            last_gae = delta + gamma * lam * last_gae
            advantages[b, t] = last_gae
            returns[b, t] = last_gae + v[t]
    return advantages, returns


def gae(values, rewards, mask, gamma, lam):
    """Unwhitened GAE advantages and returns of `core.compute_advantages`: returns minus masked values."""
    _, returns = core.compute_advantages(values, rewards, mask, gamma, lam)
    return returns - torch.where(mask.bool(), values, 0.0), returns


def random_rollout(lengths: tuple[int, ...], width: int, dtype: torch.dtype):
    mask = right_padded_mask(lengths, width).to(dtype)
    values = padded(torch.randn(mask.shape, dtype=dtype), mask)
    rewards = padded(torch.randn(mask.shape, dtype=dtype) * 0.1, mask)
    return values, rewards, mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_trl_loop(gamma: float, lam: float) -> None:
    values, rewards, mask = random_rollout(LENGTHS, T, torch.float64)
    advantages, returns = gae(values, rewards, mask, gamma, lam)
    expected_advantages, expected_returns = naive_gae(values, rewards, mask, gamma, lam)
    assert_close(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    assert_close(returns, expected_returns, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [200, 512])  # the matrix form and the column loop beyond 256
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (1.0, 1.0)])
def test_gae_long_responses_float32(width: int, gamma: float, lam: float) -> None:
    values, rewards, mask = random_rollout((width, 1, width // 2, width - 3), width, torch.float32)
    advantages, returns = gae(values, rewards, mask, gamma, lam)
    assert advantages.dtype == returns.dtype == torch.float32
    expected_advantages, expected_returns = naive_gae(values, rewards, mask, gamma, lam)
    assert_close(advantages.double(), expected_advantages, rtol=1e-5, atol=2e-5)
    assert_close(returns.double(), expected_returns, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("width", [200, 512])
def test_gae_long_responses_float64_are_exact(width: int) -> None:
    values, rewards, mask = random_rollout((width, 1, width // 2), width, torch.float64)
    advantages, returns = gae(values, rewards, mask, 1.0, 0.95)
    expected_advantages, expected_returns = naive_gae(values, rewards, mask, 1.0, 0.95)
    assert_close(advantages, expected_advantages, rtol=1e-10, atol=1e-10)
    assert_close(returns, expected_returns, rtol=1e-10, atol=1e-10)


def test_advantages_are_the_whitened_gae() -> None:
    values, rewards, mask = random_rollout(LENGTHS, T, torch.float64)
    advantages, _ = core.compute_advantages(values, rewards, mask, 1.0, 0.95)
    expected_advantages, _ = naive_gae(values, rewards, mask, 1.0, 0.95)
    assert_close(advantages, core.masked_whiten(expected_advantages, mask), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- PPO losses


def naive_policy_loss(logp, old_logp, advantages, mask, cliprange):
    losses, clipped, approxkl, policykl, ratios = [], [], [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] != 1:
                continue
            a, log_ratio = float(advantages[b, t]), float(logp[b, t]) - float(old_logp[b, t])
            ratio = math.exp(log_ratio)
            unclipped_loss = -a * ratio
            clipped_loss = -a * min(max(ratio, 1 - cliprange), 1 + cliprange)
            losses.append(max(unclipped_loss, clipped_loss))
            clipped.append(1.0 if clipped_loss > unclipped_loss else 0.0)
            approxkl.append(0.5 * log_ratio**2)
            policykl.append(-log_ratio)
            ratios.append(ratio)
    stats = {
        "clipfrac": naive_mean(clipped),
        "approxkl": naive_mean(approxkl),
        "policykl": naive_mean(policykl),
        "ratio": naive_mean(ratios),
    }
    return naive_mean(losses), stats


def policy_batch(mask: torch.Tensor, spread: float):
    old_logp = -torch.rand(mask.shape, dtype=torch.float64) * 4
    logp = old_logp + torch.randn(mask.shape, dtype=torch.float64) * spread
    advantages = torch.randn(mask.shape, dtype=torch.float64)
    return padded(logp, mask), padded(old_logp, mask), padded(advantages, mask)


@pytest.mark.parametrize("spread", [0.05, 0.5])
def test_policy_loss_and_stats_match_loop(mask: torch.Tensor, spread: float) -> None:
    logp, old_logp, advantages = policy_batch(mask, spread)
    loss, stats = core.policy_loss(logp, old_logp, advantages, mask, cliprange=0.2)
    expected_loss, expected_stats = naive_policy_loss(logp, old_logp, advantages, mask, 0.2)
    assert_close(loss, scalar(expected_loss))
    assert stats.keys() == expected_stats.keys()
    for name, value in stats.items():
        assert value.ndim == 0 and not value.requires_grad
        assert_close(value, scalar(expected_stats[name]), msg=name)
    if spread == 0.5:
        assert stats["clipfrac"] > 0


def test_policy_loss_at_ratio_one_is_minus_mean_advantage(mask: torch.Tensor) -> None:
    old_logp, _, advantages = policy_batch(mask, 0.0)
    loss, stats = core.policy_loss(old_logp.clone(), old_logp, advantages, mask, cliprange=0.2)
    assert_close(loss, scalar(-naive_mean(real_entries(advantages, mask))))
    assert stats["clipfrac"] == 0 and stats["approxkl"] == 0 and stats["policykl"] == 0
    assert stats["ratio"] == 1


def test_policy_gradient_is_zero_on_clipped_tokens(mask: torch.Tensor) -> None:
    logp, old_logp, advantages = policy_batch(mask, 0.5)
    logp, old_logp, advantages = (x * mask for x in (logp, old_logp, advantages))  # finite padding
    logp.requires_grad_(True)
    loss, _ = core.policy_loss(logp, old_logp, advantages, mask, cliprange=0.2)
    loss.backward()
    n_real = int(mask.sum())
    n_clipped = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            grad = float(logp.grad[b, t])
            if mask[b, t] != 1:
                assert grad == 0
                continue
            a = float(advantages[b, t])
            ratio = math.exp(float(logp.detach()[b, t]) - float(old_logp[b, t]))
            clipped = -a * min(max(ratio, 0.8), 1.2) > -a * ratio
            n_clipped += clipped
            # d/dlogp of -A * ratio / n is -A * ratio / n on unclipped tokens; nothing flows when clipped
            assert_close(grad, 0.0 if clipped else -a * ratio / n_real, rtol=1e-9, atol=1e-12)
    assert n_clipped > 0


def naive_value_loss(values, old_values, returns, mask, cliprange_value):
    losses, clipped, vpreds, errors = [], [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] != 1:
                continue
            v, old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            v_clipped = min(max(v, old - cliprange_value), old + cliprange_value)
            unclipped_loss, clipped_loss = (v - ret) ** 2, (v_clipped - ret) ** 2
            losses.append(max(unclipped_loss, clipped_loss))
            clipped.append(1.0 if clipped_loss > unclipped_loss else 0.0)
            vpreds.append(v)
            errors.append(unclipped_loss)
    stats = {"clipfrac": naive_mean(clipped), "vpred": naive_mean(vpreds), "error": naive_mean(errors)}
    return 0.5 * naive_mean(losses), stats


@pytest.mark.parametrize("spread", [0.05, 1.0])
def test_value_loss_and_stats_match_loop(mask: torch.Tensor, spread: float) -> None:
    old_values = torch.randn(mask.shape, dtype=torch.float64)
    values = padded(old_values + torch.randn(mask.shape, dtype=torch.float64) * spread, mask)
    returns = padded(torch.randn(mask.shape, dtype=torch.float64), mask)
    old_values = padded(old_values, mask, fill=-PAD)
    loss, stats = core.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    expected_loss, expected_stats = naive_value_loss(values, old_values, returns, mask, 0.2)
    assert_close(loss, scalar(expected_loss))
    assert stats.keys() == expected_stats.keys()
    for name, value in stats.items():
        assert value.ndim == 0 and not value.requires_grad
        assert_close(value, scalar(expected_stats[name]), msg=name)
    if spread == 1.0:
        assert stats["clipfrac"] > 0


def test_value_loss_without_change_is_half_the_error(mask: torch.Tensor) -> None:
    values = torch.randn(mask.shape, dtype=torch.float64)
    returns = torch.randn(mask.shape, dtype=torch.float64)
    loss, stats = core.value_loss(values, values.clone(), returns, mask, cliprange_value=0.2)
    errors = [
        (float(values[b, t]) - float(returns[b, t])) ** 2 for b, n in enumerate(LENGTHS) for t in range(n)
    ]
    assert_close(loss, scalar(0.5 * naive_mean(errors)))
    assert stats["clipfrac"] == 0


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_follows_ziegler_formula() -> None:
    controller = core.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    expected = 0.2
    for kl, error in [(7.0, 7 / 6 - 1), (5.0, 5 / 6 - 1), (100.0, 0.2), (0.0, -0.2), (6.0, 0.0)]:
        previous = controller.value
        controller.update(kl, n_steps=128)
        expected *= 1 + error * 128 / 10000
        assert controller.value == pytest.approx(expected, rel=1e-12)
        assert (controller.value > previous) == (kl > 6.0) and (controller.value < previous) == (kl < 6.0)


def test_adaptive_kl_controller_clips_the_error_at_20_percent() -> None:
    up = core.AdaptiveKLController(0.1, target=1.0, horizon=100)
    up.update(50.0, n_steps=10)
    assert up.value == pytest.approx(0.1 * 1.02, rel=1e-12)
    down = core.AdaptiveKLController(0.1, target=1.0, horizon=100)
    down.update(-3.0, n_steps=10)  # negative KL estimates happen with the "kl" penalty
    assert down.value == pytest.approx(0.1 * 0.98, rel=1e-12)


def test_adaptive_kl_controller_accepts_a_tensor_kl() -> None:
    controller = core.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(torch.tensor(6.6), n_steps=256)
    assert isinstance(controller.value, float)
    assert controller.value == pytest.approx(0.2 * (1 + (6.6 / 6 - 1) * 256 / 10000), rel=1e-6)


def test_fixed_kl_controller_never_changes() -> None:
    controller = core.FixedKLController(0.05)
    for kl in (0.0, 1e3, -5.0, torch.tensor(2.0)):
        controller.update(kl, n_steps=64)
        assert controller.value == 0.05


@pytest.mark.parametrize(
    "make", [lambda: core.AdaptiveKLController(0.2, 6.0, 10000), lambda: core.FixedKLController(0.2)]
)
def test_kl_controller_state_dict_round_trip(make) -> None:
    saved = make()
    saved.value = 0.123
    restored = make()
    assert restored.value == 0.2
    restored.load_state_dict(saved.state_dict())
    assert restored.value == 0.123
    restored.update(7.0, n_steps=128)
    saved.update(7.0, n_steps=128)
    assert restored.value == saved.value


# ---------------------------------------------------------------- truncated importance sampling


def naive_tis_policy_loss(logp, old_logp, sampling_logp, advantages, mask, cliprange, cap):
    """Each real token's clipped loss times min(exp(old - sampling), cap), averaged over the real tokens."""
    losses, weights = [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] != 1:
                continue
            a = float(advantages[b, t])
            ratio = math.exp(float(logp[b, t]) - float(old_logp[b, t]))
            w = min(math.exp(float(old_logp[b, t]) - float(sampling_logp[b, t])), cap)
            losses.append(w * max(-a * ratio, -a * min(max(ratio, 1 - cliprange), 1 + cliprange)))
            weights.append(w)
    return naive_mean(losses), weights


def tis_batch(mask: torch.Tensor):
    logp, old_logp, advantages = policy_batch(mask, 0.3)
    sampling_logp = padded(old_logp + torch.randn(mask.shape, dtype=torch.float64) * 0.8, mask)
    return logp, old_logp, sampling_logp, advantages


def test_tis_weighted_policy_loss_matches_loop(mask: torch.Tensor) -> None:
    logp, old_logp, sampling_logp, advantages = tis_batch(mask)
    weights = core.tis_weights(old_logp, sampling_logp, mask, cap=2.0)
    loss, _ = core.policy_loss(logp, old_logp, advantages, mask, 0.2, weights)
    expected_loss, expected_weights = naive_tis_policy_loss(
        logp, old_logp, sampling_logp, advantages, mask, 0.2, 2.0
    )
    assert_close(loss, scalar(expected_loss))
    real = weights[mask.bool()]
    assert_close(real, torch.tensor(expected_weights, dtype=real.dtype), rtol=1e-6, atol=1e-6)
    assert float(real.max()) <= 2.0 + 1e-6 and (real > 2.0 - 1e-6).any()  # the cap bites on this batch
    assert (weights[~mask.bool()] == 1).all()  # padding: w = 1, finite


def test_tis_weights_of_one_give_exactly_the_unweighted_loss(mask: torch.Tensor) -> None:
    logp, old_logp, advantages = policy_batch(mask, 0.5)
    weights = core.tis_weights(old_logp, old_logp.clone(), mask, cap=2.0)
    assert (weights == 1).all()
    plain, plain_stats = core.policy_loss(logp, old_logp, advantages, mask, 0.2)
    weighted, weighted_stats = core.policy_loss(logp, old_logp, advantages, mask, 0.2, weights)
    assert torch.equal(plain, weighted)
    for name, value in plain_stats.items():
        assert torch.equal(value, weighted_stats[name]), name


def test_no_gradient_flows_through_the_tis_weights(mask: torch.Tensor) -> None:
    logp, old_logp, sampling_logp, advantages = tis_batch(mask)
    logp, old_logp, sampling_logp, advantages = (
        x * mask for x in (logp, old_logp, sampling_logp, advantages)
    )
    old_logp.requires_grad_(True)
    sampling_logp.requires_grad_(True)
    weights = core.tis_weights(old_logp, sampling_logp, mask, cap=2.0)
    assert not weights.requires_grad
    logp.requires_grad_(True)
    loss, _ = core.policy_loss(logp, old_logp.detach(), advantages, mask, 0.2, weights)
    loss.backward()
    assert sampling_logp.grad is None and old_logp.grad is None
    # d loss / d logp on an unclipped token is w * (-A * ratio) / n_real: the weight scales the gradient
    n_real = float(mask.sum())
    ratio = (logp - old_logp).exp().detach()
    unclipped = mask.bool() & ((ratio - 1).abs() < 0.2 - 1e-9)
    expected = (weights * -advantages * ratio / n_real)[unclipped]
    assert_close(logp.grad[unclipped], expected)


@pytest.mark.parametrize("cap", [0, -1.0, float("inf"), float("nan")])
def test_tis_cap_must_be_a_positive_number(cap: float) -> None:
    from lightning_ppo.config import PPOConfig
    from lightning_ppo.errors import ConfigError

    with pytest.raises(ConfigError, match="model.ppo.tis_cap"):
        PPOConfig(tis_cap=cap)
    assert PPOConfig().tis_cap is None and PPOConfig(tis_cap=2.0).tis_cap == 2.0
