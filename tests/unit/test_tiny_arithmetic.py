"""The arithmetic demo's parts, without the SFT: the chat tokenizer and the problems (fast)."""

from __future__ import annotations

import random
from pathlib import Path

from transformers import AutoTokenizer

from lightning_ppo import tiny_arithmetic
from lightning_ppo.prompts import encode_prompt
from lightning_ppo.tiny_arithmetic import chat_prompt_ids, make_chat_tokenizer, make_problems
from tests.helpers import seeded

MESSAGES = [{"role": "user", "content": "What is 23 + 58?"}]


def test_the_chat_template_renders_chatml_with_one_bos(tmp_path: Path) -> None:
    make_chat_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)  # the template survives a save, as the asset's
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|im_start|>user\nWhat is 23 + 58?<|im_end|>\n<|im_start|>assistant\n"
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert encode_prompt(tokenizer, MESSAGES[0]["content"], MESSAGES) == ids  # the data module's path
    assert tokenizer.unk_token_id not in ids
    assert tokenizer(text).input_ids[:2] == [tokenizer.bos_token_id] * 2  # the trap a plain encode falls in


def test_answers_decode_exactly_and_end_at_the_turns_end() -> None:
    tokenizer = make_chat_tokenizer()
    assert tokenizer.eos_token == "<|im_end|>"  # a sampled answer stops at the end of its turn
    assert tokenizer.pad_token is None  # the trainer pads with EOS
    answer = tokenizer("81", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(answer) == ["8", "1"]  # one token per digit
    assert tokenizer.decode([*answer, tokenizer.eos_token_id], skip_special_tokens=True) == "81"


def test_problems_are_right_and_the_splits_share_no_pair() -> None:
    problems = make_problems(random.Random(seeded(0)))
    pairs = {}
    for split, rows in problems.items():
        pairs[split] = set()
        for messages, answer in zip(rows["prompt"], rows["answer"], strict=True):
            assert len(messages) == 1 and messages[0]["role"] == "user"
            a, b = (
                int(n) for n in messages[0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
            )
            assert answer == str(a + b)
            pairs[split].add(frozenset((a, b)))
    assert not pairs["train"] & pairs["test"]
    total = (tiny_arithmetic.MAX_OPERAND + 1) ** 2
    assert len(problems["train"]["answer"]) + len(problems["test"]["answer"]) == total  # every a + b once
    assert len(problems["test"]["answer"]) > 900  # enough for a test report's interval of about +-0.04


def test_problems_are_seeded() -> None:
    assert make_problems(random.Random(seeded(0))) == make_problems(random.Random(seeded(0)))
    assert make_problems(random.Random(seeded(0))) != make_problems(random.Random(seeded(1)))
