"""The decoding loop (`model.sampling.engine: loop`) against HF `generate` and a full forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from lightning_ppo.errors import ConfigError
from lightning_ppo.lora import LoraOptions, apply_lora
from lightning_ppo.models import load_causal_lm, position_ids_from_mask
from lightning_ppo.rollout import FiniteLogits, Rollout, SamplingConfig, sample_responses, sample_tokens
from tests.helpers import (
    FALSE_ALARM,
    assert_same_greedy_tokens,
    chi_square_goodness_of_fit,
    kept_tokens,
    seeded,
)

PAD, EOS, VOCAB = 0, 15, 64  # EOS: a token the random model below emits mid-response, greedy or sampled


def random_lm(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with random weights; an untied, wide-init head so greedy continuations vary."""
    torch.manual_seed(seeded(seed))
    config = GPT2Config(
        vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=PAD, eos_token_id=None,
        tie_word_embeddings=False, initializer_range=0.5,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def prompts(rows: int, seed: int = 0, width: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 1..width tokens, and response lengths drawn in [3, 12]."""
    generator = torch.Generator().manual_seed(seeded(seed))
    prompt_lengths = torch.randint(1, width + 1, (rows,), generator=generator)  # (B,)
    attention_mask = (torch.arange(width)[None, :] >= width - prompt_lengths[:, None]).long()  # (B, P)
    input_ids = torch.randint(1, VOCAB, (rows, width), generator=generator) * attention_mask  # (B, P)
    lengths = torch.randint(3, 13, (rows,), generator=generator)  # (B,)
    return input_ids, attention_mask, lengths


def sample(lm, input_ids, attention_mask, lengths, eos: int | None = EOS, **config) -> Rollout:
    return sample_responses(lm, input_ids, attention_mask, lengths, SamplingConfig(**config), PAD, eos)


def greedy_eos(rollout: Rollout) -> int:
    """The token that, as EOS, would cut the most rows but not all: the greedy continuations of a random
    model differ per draw of its weights, so a fixed EOS may never (or always) be emitted greedily."""
    tail = rollout.response_ids[:, 1:]  # (B, R-1) a cut needs at least one token before EOS
    in_rows = torch.stack([(tail == token).any(-1) for token in range(1, VOCAB)])  # (V-1, B)
    rows = in_rows.sum(-1)  # (V-1,)
    rows[rows == tail.shape[0]] = 0  # a token every row emits would leave no row uncut
    return int(rows.argmax()) + 1


def count_forward_rows(lm: torch.nn.Module) -> list[int]:
    """Rows of every forward of `lm` from now on (the hook stays: use a fresh model)."""
    rows: list[int] = []
    lm.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                             with_kwargs=True)  # fmt: skip
    return rows


def test_greedy_loop_equals_generate_one_prompt_at_a_time() -> None:
    """top_k=1 makes sampling greedy: every row must be `generate`'s greedy tokens for its prompt alone."""
    lm = random_lm()
    input_ids, attention_mask, lengths = prompts(32)
    eos = greedy_eos(sample(lm, input_ids, attention_mask, lengths, eos=None, top_k=1))
    rollout = sample(lm, input_ids, attention_mask, lengths, eos=eos, top_k=1)
    kept = rollout.response_mask.sum(-1).long()  # (B,)
    cut_by_eos = kept < lengths
    assert cut_by_eos.any() and (~cut_by_eos).any()  # both ways of stopping occur
    expected = []
    for row in range(32):
        prompt = input_ids[row, attention_mask[row].bool()][None]  # (1, p) no padding
        greedy = GenerationConfig(do_sample=False, max_new_tokens=int(lengths[row]), pad_token_id=PAD,
                                  eos_token_id=eos)  # fmt: skip
        alone = lm.generate(input_ids=prompt, generation_config=greedy, logits_processor=[FiniteLogits()])
        expected.append(alone[0, prompt.shape[1] :].tolist())  # stops after its EOS or at its length
    assert_same_greedy_tokens(lm, rollout, expected)  # batch and single prompt: other kernel shapes
    assert (rollout.response_ids[rollout.response_mask == 0] == PAD).all()


def test_sampled_tokens_log_probs_match_a_full_forward_after_rows_are_dropped() -> None:
    """The KV cache stays row-aligned as rows leave: the loop's per-step logits give the same log-probs of
    the sampled tokens as one no-grad forward of the final sequences."""
    lm = random_lm()
    input_ids, attention_mask, lengths = prompts(48, seed=1)
    step_logits: list[torch.Tensor] = []  # (b_t, V) per forward: the rows still running, in row order
    hook = lm.register_forward_hook(lambda module, args, out: step_logits.append(out.logits[:, -1]))
    temperature = 0.7
    torch.manual_seed(seeded(0))
    rollout = sample(lm, input_ids, attention_mask, lengths, temperature=temperature)
    hook.remove()
    kept = rollout.response_mask.sum(-1).long()  # (B,)
    assert len(set(kept.tolist())) > 5 and (kept < lengths).any()  # rows left at many steps, some at EOS
    with torch.no_grad():
        logits = lm(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids_from_mask(rollout.attention_mask),
        ).logits[:, rollout.response_start - 1 : -1]  # (B, R, V) the logits before each response token
    full = torch.log_softmax(logits / temperature, -1).gather(-1, rollout.response_ids[..., None])[..., 0]
    for step, step_row_logits in enumerate(step_logits):
        rows = (kept > step).nonzero().squeeze(1)  # (b_t,) the rows that decoded this step
        tokens = rollout.response_ids[rows, step]  # (b_t,)
        loop = torch.log_softmax(step_row_logits / temperature, -1).gather(-1, tokens[:, None])[:, 0]
        torch.testing.assert_close(loop, full[rows, step], rtol=0, atol=1e-5)
    assert len(step_logits) == int(kept.max())


def naive_two_level_draw(probs: list[float], u_block: float, u_token: float, block: int = 64) -> int:
    """`sample_tokens` for one row, walking Python floats: the first block whose running mass reaches
    u_block x the total, then the first token in it whose running mass reaches u_token x the block's."""
    blocks = [probs[i : i + block] for i in range(0, len(probs), block)]
    sums = [sum(b) for b in blocks]
    k = next(k for k in range(len(sums)) if sum(sums[: k + 1]) >= u_block * sum(sums))
    running = 0.0
    for j, p in enumerate(blocks[k]):
        running += p
        if running >= u_token * sums[k]:
            return k * block + j
    raise AssertionError("unreachable: u_token <= 1")


def sparse_distribution(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of a softmax with a heavy head, a long tail, and whole blocks and single tokens of zero mass."""
    generator = torch.Generator().manual_seed(seeded(seed))
    logits = torch.randn(rows, vocab, generator=generator) * 4  # (rows, V) spans ~1e-14 .. 0.5
    logits[:, 64:192] = -float("inf")  # two whole blocks of zero mass
    logits[torch.rand(rows, vocab, generator=generator) < 0.3] = -float("inf")  # scattered zeros
    return torch.softmax(logits, -1)


def test_sample_tokens_is_the_naive_two_level_walk() -> None:
    probs = sparse_distribution(rows=40, vocab=300, seed=0)  # 300: the last block is padded
    uniforms = 1 - torch.rand(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seeded(1)))
    tokens = sample_tokens(probs, uniforms)
    expected = [naive_two_level_draw(probs[i].tolist(), *uniforms[i].tolist()) for i in range(40)]
    assert tokens.tolist() == expected


def test_sample_tokens_never_draws_a_zero_probability_token_even_at_the_extreme_uniforms() -> None:
    probs = sparse_distribution(rows=6, vocab=300, seed=2)
    tiny = torch.finfo(torch.float64).tiny
    for u in ([1.0, 1.0], [tiny, tiny], [1.0, tiny], [tiny, 1.0]):
        tokens = sample_tokens(probs, torch.tensor([u] * 6, dtype=torch.float64))
        assert (probs.gather(1, tokens[:, None]) > 0).all(), u
    one_hot = torch.zeros(3, 300)
    one_hot[:, [0, 63, 299]] = torch.eye(3)  # a block's first and last token, the padded block's last
    assert sample_tokens(one_hot).tolist() == [0, 63, 299]


def test_sample_tokens_frequencies_match_the_probabilities() -> None:
    """Chi-square goodness of fit, false alarm 1e-4; tokens shifted by one or blocks weighed wrong give a
    statistic ~1e4 times its dof."""
    probs = sparse_distribution(rows=1, vocab=300, seed=3)[0]  # (V,)
    torch.manual_seed(seeded(0))
    draws = sample_tokens(probs.expand(200_000, -1))  # (N,)
    counts = torch.bincount(draws, minlength=300).double()
    assert counts[probs == 0].sum() == 0
    p_value, dof = chi_square_goodness_of_fit(counts, probs)
    assert dof > 30 and p_value > FALSE_ALARM, (p_value, dof)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_loop_draws_first_tokens_from_generates_processed_distribution(bf16: bool) -> None:
    """One prompt, 20,000 rows, one token each: the loop's token frequencies match the probabilities
    `generate` samples from (its processed scores: temperature, top-k, top-p; chi-square, false alarm
    1e-4), and it never draws a token that `generate` filtered out."""
    lm = random_lm()
    input_ids, attention_mask, _ = prompts(1, seed=2)
    options = dict(temperature=2.0, top_k=30, top_p=0.95)  # ~20 tokens left to sample
    config = GenerationConfig(do_sample=True, max_new_tokens=1, pad_token_id=PAD, eos_token_id=None,
                              output_scores=True, return_dict_in_generate=True, **options)  # fmt: skip
    rows = 20_000
    torch.manual_seed(seeded(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        scores = lm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             logits_processor=[FiniteLogits()]).scores[0][0]  # fmt: skip
        rollout = sample(lm, input_ids.expand(rows, -1), attention_mask.expand(rows, -1),
                         torch.ones(rows, dtype=torch.long), eos=None, **options)  # fmt: skip
    probs = torch.softmax(scores.double(), -1)  # (V,)
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=VOCAB).double()
    assert counts[probs == 0].sum() == 0 and (probs == 0).sum() >= VOCAB - 30  # filtered
    p_value, dof = chi_square_goodness_of_fit(counts, probs)
    assert dof > 10 and p_value > FALSE_ALARM, (p_value, dof)


def test_lora_policy_decodes_through_the_peft_model(tiny_assets: Path) -> None:
    lm = apply_lora(load_causal_lm("tiny:policy"), LoraOptions(r=4)).eval()
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    input_ids, attention_mask, lengths = prompts(12, seed=3)
    eos = 0  # the tiny policy's EOS
    rollout = sample(lm, input_ids, attention_mask, lengths, eos=eos, top_k=1)
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=int(lengths.max()), pad_token_id=PAD, eos_token_id=eos
    )
    sequences = lm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=greedy)
    # generate keeps every row in the batch, the loop drops finished ones: other kernel shapes
    responses = sequences[:, input_ids.shape[1] :]
    generated = Rollout.from_responses(input_ids, attention_mask, responses, lengths, PAD, eos)
    assert_same_greedy_tokens(lm, rollout, kept_tokens(generated))
    with lm.disable_adapter():
        base = sample(lm, input_ids, attention_mask, lengths, eos=eos, top_k=1)
    assert not torch.equal(base.input_ids, rollout.input_ids)  # the adapter was on in the loop


@pytest.mark.parametrize("batch_size", [None, 5])
def test_decoded_positions_are_the_forwarded_rows_and_all_useful(batch_size: int | None) -> None:
    lm = random_lm()
    forwarded = count_forward_rows(lm)
    input_ids, attention_mask, lengths = prompts(16, seed=4)
    torch.manual_seed(seeded(0))
    rollout = sample(lm, input_ids, attention_mask, lengths, batch_size=batch_size)
    per_row_steps = rollout.response_mask.sum(-1)  # (B,) a row decodes until its length or EOS
    assert rollout.decoded_positions == sum(forwarded) == int(per_row_steps.sum())
    assert rollout.useful_positions == rollout.decoded_positions
    assert len(forwarded) == sum(int(chunk.max()) for chunk in per_row_steps.split(batch_size or 16))


def test_generate_engine_decodes_every_row_to_the_longest_length() -> None:
    lm = random_lm()
    input_ids, attention_mask, lengths = prompts(16, seed=4)
    rollout = sample(lm, input_ids, attention_mask, lengths, eos=None, engine="generate")
    assert rollout.decoded_positions == 16 * int(lengths.max())
    assert rollout.useful_positions == int(lengths.sum())


def test_chunks_give_the_same_greedy_rollout_as_the_whole_batch() -> None:
    lm = random_lm()
    input_ids, attention_mask, lengths = prompts(16, seed=5)
    whole = sample(lm, input_ids, attention_mask, lengths, top_k=1)
    chunked = sample(lm, input_ids, attention_mask, lengths, top_k=1, batch_size=6)
    assert chunked.input_ids.shape[0] == 16
    assert_same_greedy_tokens(lm, whole, kept_tokens(chunked))  # chunks of 6 rows: other kernel shapes


def test_unknown_engine_names_the_key() -> None:
    with pytest.raises(ConfigError, match="model.sampling.engine must be one of loop, generate, vllm"):
        SamplingConfig(engine="beam")


def test_the_old_decoder_key_names_the_new_one() -> None:
    with pytest.raises(
        ConfigError, match="model.sampling.decoder was renamed model.sampling.engine.*engine: generate"
    ):
        SamplingConfig(decoder="generate")
