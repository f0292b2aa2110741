"""Batched sampling: masks, layout, and that one `generate` call serves the whole batch."""

import torch
from transformers.generation.logits_process import InfNanRemoveLogitsProcessor

from lightning_ppo.rollout import FiniteLogits, SamplingConfig, response_mask_from_tokens, sample_responses


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
    rollout = sample_responses(
        model, input_ids, attention_mask, lengths, SamplingConfig(), pad_token_id=pad, eos_token_id=eos
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
        ScriptedLM(new_tokens), input_ids, attention_mask, lengths, SamplingConfig(), pad, eos
    )
    chunked_model = ChunkedScriptedLM(new_tokens)
    chunked = sample_responses(
        chunked_model, input_ids, attention_mask, lengths, SamplingConfig(batch_size=2), pad, eos
    )
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
