"""Batched sampling: masks, layout, and rows grouped by drawn length into a few `generate` calls."""

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import InfNanRemoveLogitsProcessor

from lightning_ppo.models import load_causal_lm, load_tokenizer
from lightning_ppo.rollout import (
    FiniteLogits,
    SamplingConfig,
    draw_response_lengths,
    response_mask_from_tokens,
    sample_responses,
)


def naive_response_mask(response_ids: torch.Tensor, lengths: torch.Tensor, eos: int) -> torch.Tensor:
    mask = torch.zeros(response_ids.shape)
    for b in range(response_ids.shape[0]):
        for t in range(min(int(lengths[b]), response_ids.shape[1])):
            mask[b, t] = 1.0
            if response_ids[b, t] == eos:
                break
    return mask


def test_response_mask_matches_loop_reference():
    torch.manual_seed(0)
    eos = 3
    response_ids = torch.randint(0, 6, (64, 12))
    lengths = torch.randint(1, 13, (64,))
    expected = naive_response_mask(response_ids, lengths, eos)
    torch.testing.assert_close(response_mask_from_tokens(response_ids, lengths, eos), expected)


def test_response_that_starts_with_eos_keeps_only_the_eos():
    response_ids = torch.tensor([[7, 5, 5], [5, 9, 9]])
    mask = response_mask_from_tokens(response_ids, torch.tensor([3, 3]), eos_token_id=5)
    assert mask.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


class ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends fixed tokens and counts its calls."""

    def __init__(self, new_tokens: torch.Tensor) -> None:
        super().__init__()
        self.new_tokens = new_tokens
        self.calls = 0

    def generate(self, input_ids, attention_mask, generation_config, logits_processor):
        self.calls += 1
        assert generation_config.do_sample and generation_config.top_k == 0
        assert any(isinstance(p, FiniteLogits) for p in logits_processor)
        new = self.new_tokens[:, : generation_config.max_new_tokens]
        return torch.cat([input_ids, new], dim=1)


def test_sample_responses_layout_and_single_generate_call():
    pad = eos = 0
    input_ids = torch.tensor([[pad, pad, 11, 12], [21, 22, 23, 24]])  # left-padded prompts
    attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    new_tokens = torch.tensor([[31, 32, eos, 34, 35], [41, 42, 43, 44, 45]])
    model = ScriptedLM(new_tokens)
    lengths = torch.tensor([5, 3])
    one_call = SamplingConfig(max_generate_calls=1)
    rollout = sample_responses(
        model, input_ids, attention_mask, lengths, one_call, pad_token_id=pad, eos_token_id=eos
    )
    assert model.calls == 1
    assert rollout.response_start == 4
    assert rollout.query_ids.tolist() == input_ids.tolist()
    # row 0 stops at its EOS (kept), row 1 at its drawn length 3; the rest is padding
    assert rollout.response_ids.tolist() == [[31, 32, eos, pad, pad], [41, 42, 43, pad, pad]]
    assert rollout.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert rollout.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0]]


def test_rollout_micro_batches_give_the_same_layout_as_one_call():
    pad = eos = 0
    input_ids = torch.tensor([[pad, 11, 12], [21, 22, 23], [pad, pad, 31]])
    attention_mask = (input_ids != pad).long()
    new_tokens = torch.tensor([[41, eos, 43, 44], [51, 52, 53, 54], [61, 62, 63, 64]])
    lengths = torch.tensor([4, 2, 3])
    whole = sample_responses(
        ScriptedLM(new_tokens),
        input_ids,
        attention_mask,
        lengths,
        SamplingConfig(max_generate_calls=1),
        pad,
        eos,
    )
    chunked_model = ChunkedScriptedLM(new_tokens)
    chunked_config = SamplingConfig(batch_size=2, max_generate_calls=1)
    chunked = sample_responses(chunked_model, input_ids, attention_mask, lengths, chunked_config, pad, eos)
    assert chunked_model.calls == 2
    assert chunked.input_ids.tolist() == whole.input_ids.tolist()
    assert chunked.attention_mask.tolist() == whole.attention_mask.tolist()
    assert chunked.response_mask.tolist() == whole.response_mask.tolist()


class ChunkedScriptedLM(ScriptedLM):
    """Serves successive row chunks of `new_tokens`, one chunk per `generate` call."""

    def __init__(self, new_tokens: torch.Tensor) -> None:
        super().__init__(new_tokens)
        self.next_row = 0

    def generate(self, input_ids, attention_mask, generation_config, logits_processor):
        self.calls += 1
        rows = slice(self.next_row, self.next_row + input_ids.shape[0])
        self.next_row = rows.stop
        return torch.cat([input_ids, self.new_tokens[rows, : generation_config.max_new_tokens]], dim=1)


def test_finite_logits_match_transformers_remove_invalid_values():
    scores = torch.randn(4, 10)
    scores[0, 1], scores[1, 2], scores[2, 3] = float("nan"), float("inf"), float("-inf")
    expected = InfNanRemoveLogitsProcessor()(None, scores.clone())
    torch.testing.assert_close(FiniteLogits()(None, scores.clone()), expected, rtol=0, atol=0)


class PromptEchoLM(torch.nn.Module):
    """`generate` appends `100 * last prompt token + t` at new position t; records each call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []  # (rows, max_new_tokens) per call

    def generate(self, input_ids, attention_mask, generation_config, logits_processor):
        steps = generation_config.max_new_tokens
        self.calls.append((input_ids.shape[0], steps))
        new = 100 * input_ids[:, -1:] + torch.arange(steps)  # (b, steps)
        return torch.cat([input_ids, new], dim=1)


def echo_batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts whose last token is the row number + 1, and lengths drawn in [4, 15]."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(1, 5, (rows,), generator=generator)  # (b,)
    attention_mask = (torch.arange(4)[None, :] >= 4 - prompt_lengths[:, None]).long()  # (b, 4)
    input_ids = (torch.arange(rows)[:, None] + 1) * attention_mask  # (b, 4) pad = 0
    lengths = torch.randint(4, 16, (rows,), generator=generator)  # (b,)
    return input_ids, attention_mask, lengths


@pytest.mark.parametrize("batch_size", [None, 48])
def test_grouped_calls_return_each_row_in_order_with_its_own_prompt(batch_size: int | None) -> None:
    input_ids, attention_mask, lengths = echo_batch(128, seed=0)
    model = PromptEchoLM()
    config = SamplingConfig(batch_size=batch_size, max_generate_calls=3)
    rollout = sample_responses(
        model, input_ids, attention_mask, lengths, config, pad_token_id=0, eos_token_id=None
    )
    chunks = 1 if batch_size is None else 3
    assert 1 < len(model.calls) <= 3 * chunks
    assert sum(rows for rows, _ in model.calls) == 128
    assert rollout.query_ids.tolist() == input_ids.tolist()
    assert rollout.response_ids.shape[1] == int(lengths.max())
    for row in range(128):
        drawn = int(lengths[row])
        expected = [100 * (row + 1) + t for t in range(drawn)]
        assert rollout.response_ids[row, :drawn].tolist() == expected
        assert (rollout.response_ids[row, drawn:] == 0).all()
        assert rollout.response_mask[row].sum() == drawn
        assert rollout.attention_mask[row].sum() == attention_mask[row].sum() + drawn
    decoded = sum(rows * steps for rows, steps in model.calls)
    assert rollout.decoded_positions == decoded
    assert rollout.useful_positions == int(lengths.sum())


def test_grouping_keeps_decode_waste_below_15_percent_at_batch_128() -> None:
    for seed in range(5):
        input_ids, attention_mask, lengths = echo_batch(128, seed)
        waste = {}
        for calls in (1, 4):
            config = SamplingConfig(max_generate_calls=calls)
            rollout = sample_responses(PromptEchoLM(), input_ids, attention_mask, lengths, config, 0, None)
            waste[calls] = 1 - rollout.useful_positions / rollout.decoded_positions
        assert waste[1] > 0.3  # one call decodes every row to the longest length (about 37% waste)
        assert waste[4] < 0.15


def test_synced_gpus_makes_one_call_per_chunk() -> None:
    """Under ZeRO-3 every rank must make the same number of calls, whatever lengths it drew."""
    input_ids, attention_mask, lengths = echo_batch(32, seed=0)
    model = PromptEchoLM()
    model.generate = lambda synced_gpus, **kwargs: PromptEchoLM.generate(model, **kwargs)
    config = SamplingConfig(batch_size=16, max_generate_calls=4)
    rollout = sample_responses(model, input_ids, attention_mask, lengths, config, 0, None, synced_gpus=True)
    assert [rows for rows, _ in model.calls] == [16, 16]
    assert rollout.query_ids.tolist() == input_ids.tolist()


def tiny_lm_and_prompts(tiny_assets: Path, rows: int) -> tuple:
    lm = load_causal_lm(str(tiny_assets / "policy")).eval()
    tokenizer = load_tokenizer(str(tiny_assets / "policy"))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    texts = ["the movie was", "a", "this film was really quite", "the plot"]
    prompts = tokenizer([texts[i % 4] for i in range(rows)], return_tensors="pt", padding=True)
    return lm, tokenizer, prompts["input_ids"], prompts["attention_mask"]


def test_one_call_equals_todays_single_generate_for_the_same_seed(tiny_assets: Path) -> None:
    lm, tokenizer, input_ids, attention_mask = tiny_lm_and_prompts(tiny_assets, 16)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = SamplingConfig(max_generate_calls=1)
    torch.manual_seed(3)
    lengths = draw_response_lengths(16, config, torch.device("cpu"))
    rollout = sample_responses(lm, input_ids, attention_mask, lengths, config, pad, eos)
    torch.manual_seed(3)
    lengths = draw_response_lengths(16, config, torch.device("cpu"))
    today = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=int(lengths.max()),
        pad_token_id=pad, eos_token_id=eos,
    )  # fmt: skip
    sequences = lm.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=today,
        logits_processor=[FiniteLogits()],
    )  # fmt: skip
    response_mask = response_mask_from_tokens(sequences[:, input_ids.shape[1] :], lengths, eos)
    assert torch.equal(rollout.response_mask, response_mask)
    assert torch.equal(
        rollout.response_ids, sequences[:, input_ids.shape[1] :].masked_fill(response_mask == 0, pad)
    )


def test_grouped_greedy_rollout_equals_one_call_on_a_real_model(tiny_assets: Path) -> None:
    """Greedy decoding makes sampling deterministic: grouping must then change no token of any row."""
    lm, tokenizer, input_ids, attention_mask = tiny_lm_and_prompts(tiny_assets, 64)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    head = lm.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[eos] = -1e4  # greedy, the tiny model would emit EOS at once and every call stop there
    lengths = torch.randint(4, 16, (64,), generator=torch.Generator().manual_seed(0))
    one = sample_responses(
        lm, input_ids, attention_mask, lengths, SamplingConfig(top_k=1, max_generate_calls=1), pad, eos
    )
    grouped_config = SamplingConfig(top_k=1, max_generate_calls=4)
    grouped = sample_responses(lm, input_ids, attention_mask, lengths, grouped_config, pad, eos)
    assert torch.equal(grouped.input_ids, one.input_ids)
    assert torch.equal(grouped.response_mask, one.response_mask)
    assert grouped.decoded_positions < one.decoded_positions
    assert grouped.useful_positions == one.useful_positions


def test_grouped_sampling_keeps_lengths_and_statistics(tiny_assets: Path) -> None:
    """Same seed: same drawn lengths; the sampled tokens' distribution matches one call's."""
    lm, tokenizer, input_ids, attention_mask = tiny_lm_and_prompts(tiny_assets, 256)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    counts, kept = {}, {}
    for calls in (1, 3):
        config = SamplingConfig(max_generate_calls=calls)
        torch.manual_seed(0)
        lengths = draw_response_lengths(256, config, torch.device("cpu"))
        rollout = sample_responses(lm, input_ids, attention_mask, lengths, config, pad, eos)
        kept[calls] = rollout.response_mask.sum(-1)  # (B,)
        assert (kept[calls] >= 1).all() and (kept[calls] <= lengths).all()
        tokens = rollout.response_ids[rollout.response_mask.bool()]
        counts[calls] = torch.bincount(tokens, minlength=len(tokenizer)).float()
    # mean kept length differs only through EOS cuts; the token histograms agree within sampling noise
    assert abs(kept[1].mean() - kept[3].mean()) < 0.5
    p, q = counts[1] / counts[1].sum(), counts[3] / counts[3].sum()
    assert 0.5 * (p - q).abs().sum() < 0.15
