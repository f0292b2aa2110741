"""The PPO epochs (step 6 of a PPO iteration): shuffled minibatches, the clipped losses, one optimizer step
per backward batch, TRL's skipped minibatches and early stop.

Plain functions over explicit models, an `Experience`, and `UpdateContext`: how the update reaches the
optimizer and the other ranks (backward, DDP's no-sync, a checked optimizer step, a mean over ranks).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ppo.config import PPOConfig
from lightning_ppo.core import (
    kl_penalty,
    logprobs_and_entropy,
    masked_mean,
    masked_var,
    policy_loss,
    value_loss,
)
from lightning_ppo.experience import Experience
from lightning_ppo.models import PPOModels
from lightning_ppo.packing import (
    PackedRows,
    TokenBudget,
    bucketed,
    on_response_tokens,
    pad_responses,
    response_inputs,
)


@dataclass
class UpdateContext:
    """What the PPO epochs ask of the trainer; the module builds it from Lightning's manual optimisation."""

    backward: Callable[[Tensor], None]  # `manual_backward`
    no_sync: Callable[[bool], AbstractContextManager]  # skip DDP's all-reduce unless on the last minibatch
    optimizer_step: Callable[[Tensor], None]  # given the step's summed loss: check, clip, step, zero_grad
    mean_over_ranks: Callable[[Tensor], Tensor]
    max_over_ranks: Callable[[int], int] = int
    # the optimizer's local gradients, or None where the strategy keeps them (DeepSpeed's partitions)
    gradients: Callable[[], list[Tensor]] | None = None


def ppo_epochs(
    models: PPOModels, experience: Experience, config: PPOConfig, context: UpdateContext
) -> dict[str, Tensor]:
    """`ppo_epochs` passes over shuffled backward batches, one optimizer step each; mean statistics.

    As TRL 0.11: a backward batch is `gradient_accumulation_steps` minibatches, each loss divided by it."""
    batch_size = experience.input_ids.shape[0]
    stats: dict[str, list[Tensor]] = defaultdict(list)
    epochs = 0
    while epochs < config.ppo_epochs:
        epochs += 1
        for backward_rows in torch.randperm(batch_size).split(config.backward_batch_size):
            step_loss = torch.zeros((), device=experience.input_ids.device)
            minibatches = backward_rows.split(config.mini_batch_size)
            for i, rows in enumerate(minibatches):
                # DDP all-reduces the gradients once per optimizer step, on its last minibatch
                last = i == len(minibatches) - 1
                loss, minibatch_stats = minibatch_backward(
                    models, experience.select(rows), config, context, sync=last, first=i == 0
                )
                step_loss += loss.detach()
                for name, value in minibatch_stats.items():
                    stats[name].append(value)
            context.optimizer_step(step_loss)
        if config.early_stopping and kl_too_high(stats["ppo/policy/policykl"][-1], config, context):
            break
    means = {name: torch.stack(values).float().mean() for name, values in stats.items()}
    if "ppo/val/error" in means:  # TRL's definition, from the minibatch means; critic-free: no values
        means["ppo/val/var_explained"] = 1 - means["ppo/val/error"] / means["ppo/returns/var"]
    means["ppo/skipped_minibatches"] = torch.stack(stats["ppo/skipped_minibatches"]).float().sum()
    means["ppo/epochs"] = torch.tensor(float(epochs))  # fewer than ppo_epochs after an early stop
    return means


def kl_too_high(policykl: Tensor, config: PPOConfig, context: UpdateContext) -> bool:
    """TRL's `_early_stop`: the last minibatch's policy KL, averaged over ranks, above 1.5 x target_kl."""
    policykl = context.mean_over_ranks(policykl.detach().clone())
    return bool(policykl > 1.5 * config.target_kl)  # the same decision on every rank


def minibatch_backward(
    models: PPOModels, batch: Experience, config: PPOConfig, context: UpdateContext, sync: bool, first: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward of one minibatch's loss; returns the loss and its statistics. `sync`: the step's last.

    With `max_tokens_per_microbatch` it runs in micro-batches, each loss weighted by its share of the
    minibatch's response tokens: the gradient, the statistics and TRL's ratio guard are the uncut ones."""
    parts = _micro_batches(batch, config, context)
    if len(parts) == 1:
        with context.no_sync(sync):
            loss, stats = ppo_loss(models, batch, config)
            context.backward(loss / config.gradient_accumulation_steps)
    else:
        loss, stats = _cut_backward(models, batch, parts, config, context, sync, first)
    if config.max_tokens_per_microbatch is not None:
        stats["tokens/micro_batches"] = torch.tensor(float(len(parts)), device=loss.device)
    return loss, stats


def _cut_backward(
    models: PPOModels,
    batch: Experience,
    parts: list[Tensor],
    config: PPOConfig,
    context: UpdateContext,
    sync: bool,
    first: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`minibatch_backward` in the given micro-batches (row positions)."""
    micro_batches = [batch.select(rows) for rows in parts]
    # The guard reads the whole minibatch, known only after its last forward. Gradients of this minibatch
    # alone are dropped then, in place; gradients to keep (accumulated minibatches, DeepSpeed's) need the
    # decision first, from a no-grad pass.
    drop_after = first and context.gradients is not None
    keep = None if drop_after else _guard_first(models, batch, micro_batches, parts, config)
    tokens = batch.response_mask.sum()
    outputs = []
    for j, micro in enumerate(micro_batches):
        with context.no_sync(sync and j == len(parts) - 1):
            forward = _forward(models, micro, config, buckets=1)
            loss = minibatch_loss(micro, *forward, config)[0]
            outputs.append(forward)
            if j == len(parts) - 1:
                total, stats = minibatch_loss(batch, *_stitch(outputs, parts, batch), config)
                if keep is None:
                    keep = 1 - stats["ppo/skipped_minibatches"]
                    for gradient in context.gradients():
                        gradient.mul_(keep)
            share = micro.response_mask.sum() / tokens / config.gradient_accumulation_steps
            context.backward(loss * (share if keep is None else share * keep))
    return total * keep, stats


def _micro_batches(batch: Experience, config: PPOConfig, context: UpdateContext) -> list[Tensor]:
    """Row positions of the minibatch's micro-batches under `max_tokens_per_microbatch` (one: uncut)."""
    budget = TokenBudget.at_most(config.max_tokens_per_microbatch, context.max_over_ranks)
    if budget is None:
        return [torch.arange(batch.input_ids.shape[0])]
    prompt_len = batch.response_start - batch.prompt_pad  # (b,)
    return budget.cut(prompt_len, batch.response_len, padded=not config.packing)


def _guard_first(
    models: PPOModels,
    batch: Experience,
    micro_batches: list[Experience],
    parts: list[Tensor],
    config: PPOConfig,
) -> Tensor:
    """TRL's ratio guard over the whole minibatch from a no-grad pass: 1 to keep its gradient, else 0."""
    with torch.no_grad():
        outputs = [_forward(models, micro, config, buckets=1) for micro in micro_batches]
        logprobs = _stitch(outputs, parts, batch)[0]
        _, stats = policy_loss(
            logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, config.cliprange
        )
    return (stats["ratio"] <= config.ratio_threshold).to(logprobs.dtype)  # as minibatch_loss decides


def _stitch(outputs: list[tuple], parts: list[Tensor], batch: Experience) -> tuple:
    """The micro-batches' detached forwards as the minibatch's: (b, R) each in its row order, the sum."""
    width = batch.response_mask.shape[1]
    order = torch.argsort(torch.cat(parts)).to(batch.input_ids.device)
    columns = []
    for column in list(zip(*[output[:3] for output in outputs], strict=True)):
        if column[0] is None:  # no value model
            columns.append(None)
        else:
            columns.append(torch.cat([pad_responses(x.detach(), width) for x in column])[order])
    return (*columns, sum(output[3] for output in outputs))


def ppo_loss(models: PPOModels, batch: Experience, config: PPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy loss + vf_coef * clipped value loss on one minibatch, with TRL's statistics.

    Packed and padded forwards give the same masked means. Critic-free estimators have no value loss; kl_in
    "loss" adds kl_loss_coef x the k3 KL to the reference (DeepSeekMath's GRPO, arXiv:2402.03300, eq. 4).
    TRL's guard: a minibatch whose mean ratio exceeds ratio_threshold contributes nothing."""
    loss, stats = minibatch_loss(batch, *_forward(models, batch, config), config)
    return loss * (1 - stats["ppo/skipped_minibatches"]), stats


def minibatch_loss(
    batch: Experience,
    logprobs: Tensor,
    entropy: Tensor,
    values: Tensor | None,
    computed: int,
    config: PPOConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`ppo_loss` from the minibatch's forward, without the guard's zeroing (its statistics have it)."""
    mask = batch.response_mask
    useful = int(batch.lengths.totals(batch.response_start).sum())
    pg_loss, pg_stats = policy_loss(
        logprobs, batch.old_logprobs, batch.advantages, mask, config.cliprange, batch.tis_weights
    )
    loss = pg_loss
    # TRL's guard: a minibatch whose mean ratio explodes contributes nothing (no host sync needed)
    ratio_ok = (pg_stats["ratio"] <= config.ratio_threshold).to(loss.dtype)
    tokens = mask.sum()
    bessel = tokens / (tokens - 1)  # TRL's unbiased masked_var, without its host sync
    stats = {
        "ppo/loss/policy": pg_loss.detach() * ratio_ok,  # TRL zeroes the losses of a skipped minibatch
        "ppo/policy/entropy": masked_mean(entropy, mask),
        "ppo/policy/approxkl": pg_stats["approxkl"],
        "ppo/policy/policykl": pg_stats["policykl"],
        "ppo/policy/clipfrac": pg_stats["clipfrac"],
        "ppo/policy/advantages_mean": masked_mean(batch.advantages, mask),
        "ppo/policy/ratio": pg_stats["ratio"],
        "ppo/skipped_minibatches": 1 - ratio_ok,
        "tokens/update_waste": torch.tensor(1 - useful / computed, device=mask.device),
    }
    if batch.tis_weights is not None:  # model.ppo.tis_cap with an engine's log-probs
        stats["ppo/tis_weight_mean"] = masked_mean(batch.tis_weights, mask)
        capped = batch.tis_weights >= config.tis_cap * (1 - 1e-6)  # exp(log(cap)) may round below cap
        stats["ppo/tis_capped_frac"] = masked_mean(capped.to(mask.dtype), mask)
    if batch.returns is not None:  # a value function to fit (gae)
        vf_loss, vf_stats = value_loss(values, batch.old_values, batch.returns, mask, config.cliprange_value)
        loss = loss + config.vf_coef * vf_loss
        stats |= {
            "ppo/loss/value": vf_loss.detach() * ratio_ok,
            "ppo/returns/mean": masked_mean(batch.returns, mask),
            "ppo/returns/var": masked_var(batch.returns, mask, unbiased=False) * bessel,
            "ppo/val/vpred": vf_stats["vpred"],
            "ppo/val/error": vf_stats["error"],
            "ppo/val/clipfrac": vf_stats["clipfrac"],
            "ppo/val/mean": masked_mean(batch.old_values, mask),
            "ppo/val/var": masked_var(batch.old_values, mask, unbiased=False) * bessel,
        }
    if config.kl_in == "loss":
        # padding takes the reference's log-probs: k3 = 0 there, and exp never overflows into the gradient
        on_response = torch.where(mask.bool(), logprobs, batch.ref_logprobs)  # (B, R)
        kl_loss = masked_mean(kl_penalty(on_response, batch.ref_logprobs, "k3"), mask)
        loss = loss + config.kl_loss_coef * kl_loss
        stats["ppo/policy/kl_loss"] = kl_loss.detach()
    stats["ppo/loss/total"] = loss.detach() * ratio_ok
    return loss, stats


def _forward(
    models: PPOModels, batch: Experience, config: PPOConfig, buckets: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Log-probs (with gradient), entropies and values, (B, R) each, and the token positions computed;
    packed in `buckets` forwards (default `config.length_buckets`)."""
    if not config.packing:  # one forward over the minibatch's padded layout
        logits, values = models.logits_and_values(batch.input_ids, batch.attention_mask, batch.response_start)
        logprobs, entropy = logprobs_and_entropy(logits, batch.response_ids)
        return logprobs, entropy, values, batch.input_ids.numel()

    def forward(rows: PackedRows) -> tuple[Tensor, ...]:
        # logits (n, V): the head only on the n real tokens
        logits, values = models.logits_and_values(*response_inputs(rows, rows.response_mask))
        outputs = on_response_tokens(logprobs_and_entropy, logits, rows.response_ids, rows.response_mask)
        return outputs if values is None else (*outputs, values)

    all_rows = torch.arange(batch.input_ids.shape[0])
    outputs, computed = bucketed(
        forward,
        batch.input_ids,
        batch.response_start,
        batch.lengths,
        all_rows,
        buckets or config.length_buckets,
    )
    values = outputs[2] if len(outputs) > 2 else None  # no value model: no values
    return outputs[0], outputs[1], values, computed
