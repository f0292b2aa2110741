"""Prompt datasets (`data.prompt_column`): strings and chat messages, the chat template without a doubled
BOS, overlong prompts, and the rows' other columns reaching the reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from lightning_ppo.data import PromptDataModule, repeat_prompts
from lightning_ppo.errors import ConfigError
from lightning_ppo.evaluation import row_columns
from lightning_ppo.prompts import PromptColumn, encode_prompt
from lightning_ppo.rewards import FunctionReward, SampleBatch, call_reward

WORDS = ["what", "is", "two", "plus", "three", "five", "four", "one", "system", "be", "brief", "?"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def chat_tokenizer(adds_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that adds BOS itself and has a chat template that writes BOS too."""
    specials = ["<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 0)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is two plus three ?"},
]


def test_messages_are_rendered_with_the_chat_template_and_one_bos() -> None:
    tokenizer = chat_tokenizer()
    ids = encode_prompt(tokenizer, MESSAGES, MESSAGES)
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<bos>", "<|system|>", "be", "brief", "<|user|>", "what", "is", "two", "plus", "three", "?",
        "<|assistant|>",
    ]  # fmt: skip


def test_a_string_gets_the_tokenizers_special_tokens_once() -> None:
    tokenizer = chat_tokenizer()
    assert tokenizer.convert_ids_to_tokens(encode_prompt(tokenizer, "two plus one", None)) == [
        "<bos>", "two", "plus", "one",
    ]  # fmt: skip
    already = encode_prompt(tokenizer, "<bos> two plus one", None)  # a text that starts with BOS itself
    assert tokenizer.convert_ids_to_tokens(already) == ["<bos>", "two", "plus", "one"]


def rows(prompts: list) -> Dataset:
    return Dataset.from_dict({"prompt": prompts, "answer": [str(i) for i in range(len(prompts))]})


def test_a_string_column_wrapped_as_a_user_message() -> None:
    tokenizer = chat_tokenizer()
    prompts = PromptColumn("prompt", max_tokens=20, chat_template=True)(
        rows(["two plus one"]), tokenizer, "t"
    )
    assert tokenizer.convert_ids_to_tokens(prompts[0]["input_ids"]) == [
        "<bos>", "<|user|>", "two", "plus", "one", "<|assistant|>",
    ]  # fmt: skip
    assert prompts[0]["prompt_messages"] == [{"role": "user", "content": "two plus one"}]
    assert prompts[0]["answer"] == "0" and "prompt" not in prompts.column_names


def test_overlong_prompts_are_dropped_with_a_count_refused_or_cut_from_the_left(capsys) -> None:
    tokenizer = chat_tokenizer()
    data = rows(["one", "two plus one", "what is two plus three ?"])  # 2, 4 and 7 tokens with BOS
    kept = PromptColumn("prompt", max_tokens=4)(data, tokenizer, "train")
    assert kept["answer"] == ["0", "1"]
    assert "dropped 1 of the 3 prompts of split 'train'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"1 of the 3 prompts .* longer than data.prompt_max_tokens=4"):
        PromptColumn("prompt", max_tokens=4, overlong="refuse")(data, tokenizer, "train")
    cut = PromptColumn("prompt", max_tokens=4, overlong="truncate_left")(data, tokenizer, "train")
    assert tokenizer.convert_ids_to_tokens(cut[2]["input_ids"]) == ["two", "plus", "three", "?"]
    assert cut[2]["query"] == "two plus three ?"
    with pytest.raises(
        ConfigError, match=r"all 3 of the 3 prompts.*raise data.prompt_max_tokens to at least 7"
    ):
        PromptColumn("prompt", max_tokens=1)(data, tokenizer, "train")


def test_bad_prompt_values_and_a_tokenizer_without_template_are_named() -> None:
    tokenizer = chat_tokenizer()
    with pytest.raises(ConfigError, match=r"data.prompt_column='prompt': a value is \[\{'role': 'user'\}\]"):
        PromptColumn("prompt", max_tokens=9)(rows([[{"role": "user"}]]), tokenizer, "train")
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        PromptColumn("prompt", max_tokens=9)(rows([MESSAGES]), tokenizer, "train")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_the_data_module_batches_carry_the_other_columns_and_the_messages(tmp_path: Path) -> None:
    tokenizer_dir = tmp_path / "tokenizer"
    chat_tokenizer().save_pretrained(tokenizer_dir)
    questions = [
        [{"role": "user", "content": f"what is {w} plus one ?"}] for w in ["two", "three", "four"] * 4
    ]
    records = [{"prompt": q, "answer": str(i), "source": "arith"} for i, q in enumerate(questions)]
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    module = PromptDataModule(
        dataset=str(data), tokenizer=str(tokenizer_dir), prompt_column="prompt", prompt_max_tokens=16,
        batch_size=4, eval_fraction=0.25, val_size=3,
    )  # fmt: skip
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert set(batch["columns"]) == {"answer", "source"}
    for query, answer, messages in zip(
        batch["query"], batch["columns"]["answer"], batch["prompt_messages"], strict=True
    ):
        assert messages == questions[int(answer)]  # each row's columns stay with its prompt
        assert query.startswith("<bos> <|user|>") and query.endswith("<|assistant|>")
    grouped = repeat_prompts(batch, 2)
    assert grouped["columns"]["answer"] == [a for a in batch["columns"]["answer"] for _ in range(2)]
    assert grouped["input_ids"].shape[0] == 8
    rows_ = row_columns(batch)
    assert rows_[1] == {"answer": batch["columns"]["answer"][1], "source": "arith"}


def test_a_column_named_as_what_the_data_module_adds_is_refused(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer()
    clashing = Dataset.from_dict({"prompt": ["one"], "query": ["x"]})
    with pytest.raises(ConfigError, match=r"column\(s\) \['query'\].*rename them"):
        PromptColumn("prompt", max_tokens=9)(clashing, tokenizer, "train")


def reward_with_columns(texts, queries, responses, columns):
    return [float(answer) for answer in columns["answer"]]


def reward_without_columns(texts, queries, responses):
    return [1.0] * len(texts)


def test_a_function_reward_gets_the_columns_when_it_takes_them() -> None:
    samples = SampleBatch(["a", "b"], ["x", "y"], ["ax", "by"], [], [], {"answer": ["3", "4"]})
    with_columns = FunctionReward(f"{__name__}:reward_with_columns")
    torch.testing.assert_close(call_reward(with_columns, samples), torch.tensor([3.0, 4.0]))
    without = FunctionReward(f"{__name__}:reward_without_columns")  # the three-argument form keeps working
    torch.testing.assert_close(call_reward(without, samples), torch.tensor([1.0, 1.0]))
