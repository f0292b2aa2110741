"""Forward passes without padding compute: rows bucketed by length, each bucket laid out without gaps.

A bucket's rows run prompt-then-response from column 0; outputs come back in the rollout's (N, R) layout
and row order, so that losses and statistics are those of the padded batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class PackedRows:
    """Some rows of a rollout, prompt then response from column 0, right-padded to the longest row."""

    input_ids: Tensor  # (b, L) L = longest prompt + response among the rows
    attention_mask: Tensor  # (b, L) 1 on the real tokens, a prefix of each row
    response_start: Tensor  # (b,) long: column of each row's first response token (its prompt length)
    response_ids: Tensor  # (b, R) R = longest response among the rows, right-padded
    response_mask: Tensor  # (b, R) bool: the response tokens that count, a prefix of each row

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class RowLengths:
    """Where each row's real tokens sit in the rollout layout: columns [prompt_pad, P + response_len)."""

    prompt_pad: Tensor  # (N,) long, on CPU: left padding before the prompt
    response_len: Tensor  # (N,) long, on CPU: response tokens that count

    @classmethod
    def of(cls, attention_mask: Tensor, response_start: int, response_mask: Tensor) -> RowLengths:
        prompt_tokens = attention_mask[:, :response_start].sum(-1)
        return cls((response_start - prompt_tokens).cpu(), response_mask.sum(-1).long().cpu())

    def totals(self, response_start: int) -> Tensor:
        """(N,) real prompt + response tokens of each row."""
        return response_start - self.prompt_pad + self.response_len


def pack_rows(input_ids: Tensor, response_start: int, lengths: RowLengths, rows: Tensor) -> PackedRows:
    """The given rows of a rollout-layout batch (`input_ids` (N, P + R)), each shifted left past its
    prompt padding. A row's real tokens must be contiguous (they are: the left-padded prompt runs into
    the response, and only tokens after the response's end are masked)."""
    pad, response_len = lengths.prompt_pad[rows], lengths.response_len[rows]  # (b,), (b,)
    total = response_start - pad + response_len  # (b,)
    width, response_width = int(total.max()), int(response_len.max())
    device = input_ids.device
    columns = (pad[:, None] + torch.arange(width)).clamp(max=input_ids.shape[1] - 1)  # (b, L)
    on_device = rows.to(device)
    return PackedRows(
        input_ids=input_ids[on_device].gather(1, columns.to(device)),
        attention_mask=(torch.arange(width)[None, :] < total[:, None]).long().to(device),
        response_start=(response_start - pad).to(device),
        response_ids=input_ids[on_device, response_start : response_start + response_width],
        response_mask=(torch.arange(response_width)[None, :] < response_len[:, None]).to(device),
    )


def bucketed(
    forward: Callable[[PackedRows], tuple[Tensor, ...]],
    input_ids: Tensor,
    response_start: int,
    lengths: RowLengths,
    rows: Tensor,
    max_buckets: int,
    max_rows: int | None = None,
    budget: TokenBudget | None = None,
) -> tuple[tuple[Tensor, ...], int]:
    """`forward` on `rows` in at most `max_buckets` length buckets of at most `max_rows` rows (or a token
    budget's micro-batches); its per-token outputs stitched back to (len(rows), R), zeros past each
    response, and the positions computed."""
    buckets = plan_buckets(lengths.totals(response_start)[rows], max_buckets, max_rows, budget)
    width = int(lengths.response_len[rows].max())
    parts, computed = [], 0
    for bucket in buckets:
        packed = pack_rows(input_ids, response_start, lengths, rows[bucket])
        parts.append([pad_responses(out, width) for out in forward(packed)])
        computed += packed.computed_tokens
    order = torch.argsort(torch.cat(buckets)).to(input_ids.device)  # (n,) bucket-major -> original order
    outputs = tuple(torch.cat(column)[order] for column in zip(*parts, strict=True))
    return outputs, computed


def plan_buckets(
    totals: Tensor, max_buckets: int, max_rows: int | None = None, budget: TokenBudget | None = None
) -> list[Tensor]:
    """Row indices of each forward: `min(max_buckets, rows)` length buckets per chunk of `max_rows` rows, or
    with a token `budget` its micro-batches.

    The count depends only on the number of rows, so every rank runs as many forwards (ZeRO-3 would hang)."""
    if budget is not None:
        return budget.cut(totals, torch.zeros_like(totals))
    order = torch.argsort(totals, stable=True)  # (n,)
    chunks = 1 if max_rows is None else -(-len(order) // max_rows)
    buckets = []
    for chunk in order.tensor_split(chunks):
        parts = [chunk[bucket] for bucket in length_buckets(totals[chunk], max_buckets)[0]]
        while len(parts) < min(max_buckets, len(chunk)):
            largest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[largest : largest + 1] = list(parts[largest].tensor_split(2))
        buckets += parts
    return buckets


@dataclass
class TokenBudget:
    """At most `max_tokens` positions per forward (`model.ppo.max_tokens_per_microbatch`); `agree` maps this
    rank's count of micro-batches to the largest over ranks, as DeepSpeed needs as many forwards and
    backwards on every rank."""

    max_tokens: int
    agree: Callable[[int], int] = int

    @classmethod
    def at_most(cls, max_tokens: int | None, agree: Callable[[int], int] = int) -> TokenBudget | None:
        """The budget of `model.ppo.max_tokens_per_microbatch`, None when it is null."""
        return None if max_tokens is None else cls(max_tokens, agree)

    def cut(self, prompt_len: Tensor, response_len: Tensor, padded: bool = False) -> list[Tensor]:
        """Row indices of micro-batches, each one forward of rows x its widest row (padded: the longest prompt
        plus the longest response; else each row's own total): rows shortest first, as few micro-batches as
        the budget allows (a row wider than it alone), or the agreed count, as even as that count allows."""
        order = torch.argsort(prompt_len + response_len, stable=True).tolist()
        prompts, responses = prompt_len.tolist(), response_len.tolist()

        def greedy(cap: int) -> list[list[int]]:
            parts: list[list[int]] = []
            longest = (0, 0, 0)  # prompt, response, total of the current micro-batch
            for row in order:
                own = (prompts[row], responses[row], prompts[row] + responses[row])
                grown = tuple(max(a, b) for a, b in zip(longest, own, strict=True))
                width = grown[0] + grown[1] if padded else grown[2]
                if not parts or (len(parts[-1]) + 1) * width > cap:
                    parts.append([])
                    grown = own
                parts[-1].append(row)
                longest = grown
            return parts

        count = self.agree(len(greedy(self.max_tokens)))
        low, high = 1, self.max_tokens  # the smallest cap cut into at most `count`: the most even cut
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if len(greedy(middle)) <= count else (middle + 1, high)
        parts = greedy(high)
        while len(parts) < count:  # halving keeps each within the budget
            largest = max(range(len(parts)), key=lambda i: len(parts[i]))
            if len(parts[largest]) < 2:
                raise ValueError(f"cannot cut {len(order)} rows into {count} micro-batches")
            half = len(parts[largest]) // 2
            parts[largest : largest + 1] = [parts[largest][:half], parts[largest][half:]]
        return [torch.tensor(part, dtype=torch.long) for part in parts]


def length_buckets(lengths: Tensor, max_buckets: int) -> tuple[list[Tensor], int, int]:
    """Rows in at most `max_buckets` buckets minimising the sum of rows x longest length (a padded forward or
    `generate` call per bucket), by a DP over the sorted distinct lengths; ties go to fewer buckets. Returns
    (row indices per bucket, shortest first; computed positions; useful positions)."""
    if max_buckets < 1:
        raise ValueError(f"length_buckets needs max_buckets >= 1, got {max_buckets}")
    values, counts = torch.unique(lengths, return_counts=True)  # (m,) ascending, (m,)
    values, counts = values.tolist(), counts.tolist()
    m = len(values)
    rows_before = [0]
    for count in counts:
        rows_before.append(rows_before[-1] + count)
    # best[g][j]: cheapest cover of the j shortest distinct lengths with g buckets; cut[g][j]: its last start.
    best = [[0] + [math.inf] * m] + [[math.inf] * (m + 1) for _ in range(max_buckets)]
    cut = [[0] * (m + 1) for _ in range(max_buckets + 1)]
    for g in range(1, max_buckets + 1):
        for j in range(1, m + 1):
            for i in range(j):
                cost = best[g - 1][i] + (rows_before[j] - rows_before[i]) * values[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    buckets = min(range(max_buckets + 1), key=lambda g: (best[g][m], g))
    bounds, j = [], m
    for g in range(buckets, 0, -1):
        bounds.append((cut[g][j], j))
        j = cut[g][j]
    groups = [
        torch.nonzero((lengths >= values[i]) & (lengths <= values[j - 1])).squeeze(1) for i, j in bounds[::-1]
    ]
    return groups, int(best[buckets][m]), int(lengths.sum())


def response_inputs(rows: Any, token_mask: Tensor | None = None) -> tuple:
    """`PPOModels.logits_and_values`/`reference_logits` arguments for the responses of `rows` (a rollout,
    an experience or packed rows); with `token_mask` (b, R) the LM heads run only at its True positions."""
    return (rows.input_ids, rows.attention_mask, rows.response_start, rows.response_ids.shape[1], token_mask)


def on_response_tokens(
    per_token: Callable[[Tensor, Tensor], Tensor | tuple[Tensor, ...]],
    logits: Tensor,
    response_ids: Tensor,
    token_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """`per_token(logits, tokens)` laid out (b, R): (b, R, V) logits, or with `token_mask` the (n, V) ones
    of its True positions, each output spread back with zeros elsewhere."""
    if token_mask is None:
        return per_token(logits, response_ids)
    outputs = per_token(logits, response_ids[token_mask])  # (n,) each
    if isinstance(outputs, Tensor):
        return spread(outputs, token_mask)
    return tuple(spread(x, token_mask) for x in outputs)


def spread(values: Tensor, mask: Tensor) -> Tensor:
    """Values of the True positions of `mask` (b, R), (n, ...) in row-major order, laid out (b, R, ...)
    with zeros elsewhere; differentiable in `values`. The inverse of `x[mask]`."""
    out = values.new_zeros(*mask.shape, *values.shape[1:])
    out[mask] = values
    return out


def pad_responses(x: Tensor, width: int) -> Tensor:
    """Per-token outputs (b, r, ...) right-padded with zeros to (b, width, ...)."""
    pad = [0, 0] * (x.ndim - 2) + [0, width - x.shape[1]]
    return torch.nn.functional.pad(x, pad)
