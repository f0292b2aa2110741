"""Batched sampling of responses: a few `generate` calls per batch (rows grouped by drawn length), never
one prompt at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_ppo.core import generation_groups
from lightning_ppo.errors import ConfigError, check_number


@dataclass
class SamplingConfig:
    """How responses are sampled. Defaults are the notebook's.

    Args:
        response_min_length: Shortest response drawn, in new tokens (notebook: `LengthSampler(4, 16)` -> 4).
        response_max_length: Longest response drawn, inclusive (notebook: 15).
        temperature: Sampling temperature; every log-prob pass divides the logits by it too.
        top_k: Top-k filter; 0 disables it (notebook: 0).
        top_p: Nucleus filter; 1.0 disables it (notebook: 1.0).
        batch_size: Prompts per `generate` call; null samples the whole batch at once. Lower it when
            generation runs out of memory.
        cache_implementation: Key/value cache of `generate`: null (dynamic) or "static" (preallocated;
            on CUDA, transformers then compiles the decoding step with torch.compile).
        max_generate_calls: Most `generate` calls per batch (per `batch_size` chunk). Rows are grouped by
            drawn length so that a call decodes no row far past its length; 1 (the default, one call as
            before) decodes every row to the batch's longest length (about 37% wasted positions at lengths
            4-15, about 9% with 4 calls). Each call re-runs the prefill and per-token overhead: on this CPU
            the tiny model was fastest with 1, a 4-layer 192-wide model even to slightly faster with 3-4
            (benchmarks/padding_free.py, measured under load: not yet a default). Under ZeRO-3 it is 1.
        num_samples_per_prompt: Responses sampled per training prompt (k, the group of GRPO and RLOO), all
            in the same batched sampling; a batch of B prompts rolls out B x k rows. The k samples of a
            prompt share one drawn response length. Validation, test and predict sample one per prompt.
    """

    response_min_length: int = 4
    response_max_length: int = 15
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int | None = None
    cache_implementation: str | None = None
    max_generate_calls: int = 1
    num_samples_per_prompt: int = 1

    def __post_init__(self) -> None:
        check_number("model.sampling.response_min_length", self.response_min_length, 1, integer=True)
        check_number("model.sampling.response_max_length", self.response_max_length, 1, integer=True)
        if self.response_min_length > self.response_max_length:
            raise ConfigError(
                f"model.sampling.response_min_length ({self.response_min_length}) exceeds "
                f"model.sampling.response_max_length ({self.response_max_length}); raise the maximum or "
                "lower the minimum"
            )
        check_number("model.sampling.temperature", self.temperature, 0, open_low=True)
        check_number("model.sampling.top_k", self.top_k, 0, integer=True)
        check_number("model.sampling.top_p", self.top_p, 0, 1, open_low=True)
        check_number("model.sampling.batch_size", self.batch_size, 1, integer=True, optional=True)
        check_number("model.sampling.max_generate_calls", self.max_generate_calls, 1, integer=True)
        check_number("model.sampling.num_samples_per_prompt", self.num_samples_per_prompt, 1, integer=True)


@dataclass
class Rollout:
    """Prompts and sampled responses, laid out as one (B, P + R) tensor per field.

    The prompt is left-padded and occupies columns [0, P); the response is right-padded and occupies
    columns [P, P + R). Tokens after the first EOS or past the drawn length are masked out.
    `decoded_positions` and `useful_positions` count the sampling's work (0 when the rollout was not
    sampled here, or is a part of one): `1 - useful / decoded` is the decode waste.
    """

    input_ids: Tensor  # (B, P + R) prompt then response token ids
    attention_mask: Tensor  # (B, P + R) 1 on real prompt and response tokens
    response_start: int  # P
    response_mask: Tensor  # (B, R) float32, 1 on the response tokens that count (EOS included)
    decoded_positions: int = 0  # row x new-token positions `generate` computed, over all its calls
    useful_positions: int = 0  # of those, the response tokens that count (response_mask.sum())

    @property
    def response_ids(self) -> Tensor:  # (B, R)
        return self.input_ids[:, self.response_start :]

    @property
    def query_ids(self) -> Tensor:  # (B, P)
        return self.input_ids[:, : self.response_start]

    def split(self, rows: int) -> list[Rollout]:
        """Consecutive groups of `rows` rows, keeping the layout."""
        return [
            Rollout(ids, mask, self.response_start, response_mask)
            for ids, mask, response_mask in zip(
                self.input_ids.split(rows),
                self.attention_mask.split(rows),
                self.response_mask.split(rows),
                strict=True,
            )
        ]


def rollout_from_token_lists(
    queries: list[Tensor], responses: list[Tensor], pad_token_id: int, device: torch.device
) -> Rollout:
    """The rollout layout of given 1-D query and response token ids (TRL's `step` inputs).

    Queries are left-padded, responses right-padded; every given response token counts (no EOS cut).
    """
    if any(q.ndim != 1 or len(q) == 0 for q in queries) or any(r.ndim != 1 or len(r) == 0 for r in responses):
        raise ValueError("queries and responses must be non-empty 1-D tensors of token ids")
    P, R = max(len(q) for q in queries), max(len(r) for r in responses)
    input_ids = torch.full((len(queries), P + R), pad_token_id, dtype=torch.long)  # (B, P + R)
    attention_mask = torch.zeros_like(input_ids)  # (B, P + R)
    for row, (query, response) in enumerate(zip(queries, responses, strict=True)):
        input_ids[row, P - len(query) : P] = query
        input_ids[row, P : P + len(response)] = response
        attention_mask[row, P - len(query) : P + len(response)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return Rollout(input_ids, attention_mask, P, attention_mask[:, P:].float())


def decode_rows(tokenizer: PreTrainedTokenizerBase, ids: Tensor, mask: Tensor) -> list[str]:
    """The text of each row's kept tokens (mask 1), special tokens dropped. (B, L) -> B strings."""
    rows = [row[keep] for row, keep in zip(ids, mask.bool(), strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


class FiniteLogits(LogitsProcessor):
    """NaN -> 0 and +/-inf -> the dtype's extremes, in place, so sampling never crashes on bad logits.

    What `generate(remove_invalid_values=True)` does (the notebook's "probability tensor contains inf,
    nan" crash), in one fused pass instead of three masked copies of the (B, V) scores per token.
    """

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        info = torch.finfo(scores.dtype)
        return torch.nan_to_num_(scores, nan=0.0, posinf=info.max, neginf=info.min)


def draw_response_lengths(batch_size: int, config: SamplingConfig, device: torch.device) -> Tensor:
    """Response length per sample, uniform in [min, max] (TRL's `LengthSampler`). (B,) long."""
    lengths = torch.randint(config.response_min_length, config.response_max_length + 1, (batch_size,))
    return lengths.to(device)


def response_mask_from_tokens(response_ids: Tensor, lengths: Tensor, eos_token_id: int | None) -> Tensor:
    """1 up to and including the first EOS, and only within each sample's drawn length. (B, R) float32."""
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = positions[None, :] < lengths[:, None]
    if eos_token_id is not None:
        is_eos = (response_ids == eos_token_id).long()
        eos_before = (is_eos.cumsum(-1) - is_eos) > 0
        mask &= ~eos_before
    return mask.float()


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    lengths: Tensor,
    config: SamplingConfig,
    pad_token_id: int,
    eos_token_id: int | None,
    synced_gpus: bool = False,
) -> Rollout:
    """Sample a response for every left-padded prompt, `config.batch_size` prompts per chunk.

    Each chunk's rows are grouped by drawn length into at most `config.max_generate_calls` `generate`
    calls (`core.generation_groups`); a call generates up to its longest drawn length and each row is then
    cut to its own length, which is the same distribution as stopping it there (sampling is
    autoregressive and rows are independent). Rows come back in their original order.
    `synced_gpus` keeps every rank stepping until all are done, for weights sharded across ranks (ZeRO-3).
    """
    chunk = config.batch_size or input_ids.shape[0]
    # Under synced_gpus every rank must make the same number of `generate` calls (each decoding step
    # all-reduces a "finished" flag), but the groups depend on this rank's drawn lengths: one call per
    # chunk keeps the count equal (max_new_tokens may differ: synced_gpus steps the shorter rank along).
    max_calls = 1 if synced_gpus else config.max_generate_calls
    parts = []
    for ids, mask, chunk_lengths in zip(
        input_ids.split(chunk), attention_mask.split(chunk), lengths.split(chunk), strict=True
    ):
        groups, _, _ = generation_groups(chunk_lengths, max_calls)
        sampled = [
            _sample_call(model, ids[rows], mask[rows], chunk_lengths[rows], config, pad_token_id,
                         eos_token_id, synced_gpus)
            for rows in groups
        ]  # fmt: skip
        order = torch.cat(groups).to(ids.device)  # (b,) original row of each sampled row
        parts.append(_reorder(concat_rollouts(sampled, pad_token_id), torch.argsort(order)))
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, pad_token_id)


def _reorder(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rollout's rows taken in the order `rows`, its counts kept."""
    return Rollout(
        input_ids=rollout.input_ids[rows],
        attention_mask=rollout.attention_mask[rows],
        response_start=rollout.response_start,
        response_mask=rollout.response_mask[rows],
        decoded_positions=rollout.decoded_positions,
        useful_positions=rollout.useful_positions,
    )


def _sample_call(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    lengths: Tensor,
    config: SamplingConfig,
    pad_token_id: int,
    eos_token_id: int | None,
    synced_gpus: bool,
) -> Rollout:
    """One `generate` call up to the longest of `lengths`, each row then cut to its own length."""
    generation_config = GenerationConfig(
        do_sample=True,
        top_k=config.top_k,
        top_p=config.top_p,
        temperature=config.temperature,
        max_new_tokens=int(lengths.max()),
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        cache_implementation=config.cache_implementation,
    )
    sequences = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config,
        logits_processor=LogitsProcessorList([FiniteLogits()]),
        **({"synced_gpus": True} if synced_gpus else {}),  # else transformers' own default
    )  # (B, P + R')
    prompt_width = input_ids.shape[1]
    response_ids = sequences[:, prompt_width:]
    response_mask = response_mask_from_tokens(response_ids, lengths, eos_token_id)
    response_ids = response_ids.masked_fill(response_mask == 0, pad_token_id)
    return Rollout(
        input_ids=torch.cat([input_ids, response_ids], dim=1),
        attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
        response_start=prompt_width,
        response_mask=response_mask,
        decoded_positions=response_ids.numel(),  # generate stops early once every row has hit EOS
        useful_positions=int(response_mask.sum()),
    )


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts that share the prompt width, right-padding responses to the longest; counts add up."""
    width = max(part.response_mask.shape[1] for part in parts)

    def pad_right(part: Rollout, x: Tensor, value: float) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - part.response_mask.shape[1]), value=value)

    return Rollout(
        input_ids=torch.cat([pad_right(p, p.input_ids, pad_token_id) for p in parts]),
        attention_mask=torch.cat([pad_right(p, p.attention_mask, 0) for p in parts]),
        response_start=parts[0].response_start,
        response_mask=torch.cat([pad_right(p, p.response_mask, 0.0) for p in parts]),
        decoded_positions=sum(p.decoded_positions for p in parts),
        useful_positions=sum(p.useful_positions for p in parts),
    )
