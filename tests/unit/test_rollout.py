"""Batched sampling: masks, layout, the `generate` decoder and where it is kept (the loop: test_decode.py)."""

from pathlib import Path

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
from tests.helpers import (
    FALSE_ALARM,
    assert_same_greedy_tokens,
    chi_square_homogeneity,
    kept_tokens,
    normal_quantile,
    paired_z,
    seeded,
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
    torch.manual_seed(seeded(0))
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
    one_call = SamplingConfig(engine="generate")
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
        SamplingConfig(engine="generate"),
        pad,
        eos,
    )
    chunked_model = ChunkedScriptedLM(new_tokens)
    chunked_config = SamplingConfig(batch_size=2, engine="generate")
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
    generator = torch.Generator().manual_seed(seeded(seed))
    prompt_lengths = torch.randint(1, 5, (rows,), generator=generator)  # (b,)
    attention_mask = (torch.arange(4)[None, :] >= 4 - prompt_lengths[:, None]).long()  # (b, 4)
    input_ids = (torch.arange(rows)[:, None] + 1) * attention_mask  # (b, 4) pad = 0
    lengths = torch.randint(4, 16, (rows,), generator=generator)  # (b,)
    return input_ids, attention_mask, lengths


def test_synced_gpus_samples_with_one_generate_call_per_chunk() -> None:
    """Under ZeRO-3 every rank must step together until all are done: `generate(synced_gpus=True)`, not the
    loop, whose forwards stop on each rank's own lengths. PromptEchoLM has no forward to loop on."""
    input_ids, attention_mask, lengths = echo_batch(32, seed=0)
    model = PromptEchoLM()
    model.generate = lambda synced_gpus, **kwargs: PromptEchoLM.generate(model, **kwargs)
    config = SamplingConfig(batch_size=16)
    assert config.engine == "loop"
    rollout = sample_responses(model, input_ids, attention_mask, lengths, config, 0, None, synced_gpus=True)
    assert [rows for rows, _ in model.calls] == [16, 16]
    assert rollout.query_ids.tolist() == input_ids.tolist()
    for row in range(32):
        drawn = int(lengths[row])
        assert rollout.response_ids[row, :drawn].tolist() == [100 * (row + 1) + t for t in range(drawn)]


def test_static_cache_samples_with_generate() -> None:
    """A preallocated cache cannot drop rows: `cache_implementation="static"` keeps `generate`."""
    input_ids, attention_mask, lengths = echo_batch(8, seed=1)
    model = PromptEchoLM()
    config = SamplingConfig(cache_implementation="static")
    sample_responses(model, input_ids, attention_mask, lengths, config, 0, None)
    assert model.calls == [(8, int(lengths.max()))]


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
    config = SamplingConfig(engine="generate")
    torch.manual_seed(seeded(3))
    lengths = draw_response_lengths(16, config, torch.device("cpu"))
    rollout = sample_responses(lm, input_ids, attention_mask, lengths, config, pad, eos)
    torch.manual_seed(seeded(3))
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


def test_greedy_loop_equals_one_generate_call_on_a_real_model(tiny_assets: Path) -> None:
    """Greedy decoding makes sampling deterministic: the loop must then change no token of any row (up to
    near-ties)."""
    lm, tokenizer, input_ids, attention_mask = tiny_lm_and_prompts(tiny_assets, 64)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    head = lm.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[eos] = -1e4  # greedy, the tiny model would emit EOS at once and every call stop there
    lengths = torch.randint(4, 16, (64,), generator=torch.Generator().manual_seed(seeded(0)))
    one = sample_responses(
        lm, input_ids, attention_mask, lengths, SamplingConfig(top_k=1, engine="generate"), pad, eos
    )
    loop = sample_responses(lm, input_ids, attention_mask, lengths, SamplingConfig(top_k=1), pad, eos)
    assert_same_greedy_tokens(lm, one, kept_tokens(loop))  # the loop drops rows: other kernel shapes
    assert loop.decoded_positions == loop.useful_positions == one.useful_positions < one.decoded_positions


def test_loop_sampling_keeps_lengths_and_statistics(tiny_assets: Path) -> None:
    """Same seed: same drawn lengths; kept lengths and the tokens at each of the first positions follow the
    same distribution as one `generate` call's. Rows are independent draws: a paired z-test of the kept
    lengths and a chi-square homogeneity test per position (an "ended" cell for rows already done), with a
    false alarm of 1e-4 for the whole test (Bonferroni over its 5 assertions)."""
    rows, positions = 4096, 4  # enough rows that a 1.3x sharper distribution fails (z ~ 7)
    lm, tokenizer, input_ids, attention_mask = tiny_lm_and_prompts(tiny_assets, rows)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    drawn, kept, histograms = {}, {}, {}
    for decoder in ("generate", "loop"):
        config = SamplingConfig(engine=decoder)
        torch.manual_seed(seeded(0))
        drawn[decoder] = draw_response_lengths(rows, config, torch.device("cpu"))
        rollout = sample_responses(lm, input_ids, attention_mask, drawn[decoder], config, pad, eos)
        kept[decoder] = rollout.response_mask.sum(-1)  # (B,)
        assert (kept[decoder] >= 1).all() and (kept[decoder] <= drawn[decoder]).all()
        ended = len(tokenizer)  # one more cell: the row has no token at this position
        tokens = rollout.response_ids.masked_fill(rollout.response_mask == 0, ended)[:, :positions]
        histograms[decoder] = [torch.bincount(tokens[:, t], minlength=ended + 1) for t in range(positions)]
    assert torch.equal(drawn["generate"], drawn["loop"])
    alpha = FALSE_ALARM / (positions + 1)
    z = paired_z(kept["generate"] - kept["loop"])
    assert abs(z) < normal_quantile(1 - alpha / 2), z
    for t in range(positions):
        p_value, dof = chi_square_homogeneity(histograms["generate"][t], histograms["loop"][t])
        assert dof >= 10 and p_value > alpha, (t, p_value, dof)
