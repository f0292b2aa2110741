"""The offline tiny assets load with the real loaders and behave like the notebook's models; the arithmetic
demo's parts, without its SFT: the chat tokenizer and the problems."""

from __future__ import annotations

import math
import random
import threading
from pathlib import Path

import pytest
import torch
from datasets import DatasetDict, load_from_disk
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lightning_ppo import tiny, tiny_arithmetic
from lightning_ppo.prompts import encode_prompt
from lightning_ppo.tiny import ensure_tiny_assets, resolve_source
from lightning_ppo.tiny_arithmetic import chat_prompt_ids, make_chat_tokenizer, make_problems
from tests.helpers import seeded


def test_assets_load_with_auto_classes(tiny_assets: Path) -> None:
    policy = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy")
    policy_tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_assets / "reward")
    reward_tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "reward")
    reviews = load_from_disk(str(tiny_assets / "reviews"))

    assert policy.config.model_type == "gpt2"
    assert policy.config.vocab_size == len(policy_tokenizer)
    assert policy.config.eos_token_id == policy_tokenizer.eos_token_id
    assert policy_tokenizer.eos_token == "<|endoftext|>"
    assert policy_tokenizer.pad_token is None  # as GPT-2: the trainer sets pad = eos

    assert reward.config.model_type == "distilbert"
    assert reward.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    assert reward.config.vocab_size == len(reward_tokenizer)
    ids = reward_tokenizer("the movie").input_ids
    assert ids[0] == reward_tokenizer.cls_token_id and ids[-1] == reward_tokenizer.sep_token_id
    assert reward_tokenizer.padding_side == "right" and reward_tokenizer.model_max_length == 128

    assert isinstance(reviews, DatasetDict) and set(reviews) == {"train", "test"}
    assert reviews["train"].column_names == ["text", "label"]
    assert len(reviews["train"]) == tiny.NUM_TRAIN_REVIEWS and len(reviews["test"]) == tiny.NUM_TEST_REVIEWS


def test_reviews_follow_the_recipe(tiny_assets: Path) -> None:
    train = load_from_disk(str(tiny_assets / "reviews"))["train"]
    lengths = [len(text) for text in train["text"]]
    assert 0 < sum(length <= 200 for length in lengths) < 0.1 * len(lengths)  # a few for the length filter
    for text, label in zip(train["text"], train["label"], strict=True):
        words = text.split()
        num_pos = sum(word in tiny.POSITIVE_WORDS for word in words)
        num_neg = sum(word in tiny.NEGATIVE_WORDS for word in words)
        assert label == int(num_pos > num_neg)
    assert 0.4 < sum(train["label"]) / len(train) < 0.6


def test_reviews_are_seeded() -> None:
    first, again = (
        tiny.make_reviews(20, random.Random(seeded(0))),
        tiny.make_reviews(20, random.Random(seeded(0))),
    )
    other = tiny.make_reviews(20, random.Random(seeded(1)))
    assert first == again
    assert first["text"] != other["text"]


def test_reward_prefers_positive_text(tiny_assets: Path) -> None:
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_assets / "reward")
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "reward")
    texts = [
        "the movie was great and wonderful and i loved the brilliant cast",
        "the movie was boring and awful and i hated the terrible cast",
    ]
    with torch.no_grad():
        logits = reward(**tokenizer(texts, padding=True, return_tensors="pt")).logits  # (2, 2)
    positive = reward.config.label2id["POSITIVE"]
    assert logits[0, positive] > 0 > logits[1, positive]


def test_policy_learned_the_review_vocabulary(tiny_assets: Path) -> None:
    """Pre-training beats a uniform guess over the vocabulary on held-out reviews."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy")
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "policy")
    text = load_from_disk(str(tiny_assets / "reviews"))["test"][0]["text"]
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = policy(input_ids=input_ids, labels=input_ids).loss
    assert loss < math.log(len(tokenizer)) - 0.5


def test_policy_tokenizer_round_trips_and_keeps_spaces(tiny_assets: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "policy")
    for text in load_from_disk(str(tiny_assets / "reviews"))["test"]["text"][:50]:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        # As with GPT-2's byte-level BPE, a response decoded on its own keeps its leading space.
        query, response = tokenizer.decode(ids[:3]), tokenizer.decode(ids[3:])
        assert response.startswith(" ") and query + response == text


def test_resolve_source_passes_other_sources_through() -> None:
    for source in ["gpt2", "lvwerra/distilbert-imdb", "/data/reviews", "tiny", "imdb"]:
        assert resolve_source(source) == source


def test_resolve_source_rejects_unknown_tiny_names() -> None:
    with pytest.raises(ValueError, match="tiny:policy, tiny:reward, tiny:reviews"):
        resolve_source("tiny:gpt2")


def test_resolve_source_gives_absolute_asset_folders(tiny_assets: Path) -> None:
    for name in ["policy", "reward", "reviews"]:
        path = Path(resolve_source(f"tiny:{name}"))
        assert path.is_absolute() and path == (tiny_assets / name).absolute() and path.is_dir()


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_PPO_CACHE", str(tmp_path))
    assert tiny.tiny_cache_dir() == tmp_path
    monkeypatch.delenv("LIGHTNING_PPO_CACHE")
    assert tiny.tiny_cache_dir() == Path.home() / ".cache" / "lightning_ppo"


def test_second_ensure_does_not_rebuild(tiny_assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = next((tiny_assets / "policy").glob("*.safetensors"))
    mtimes = (tiny_assets.stat().st_mtime_ns, weights.stat().st_mtime_ns)

    def fail(root: Path, seed: int = 0) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(tiny, "build_tiny_assets", fail)
    assert ensure_tiny_assets() == tiny_assets
    assert (tiny_assets.stat().st_mtime_ns, weights.stat().st_mtime_ns) == mtimes


def test_concurrent_callers_build_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two DDP ranks asking at once: one builds under the lock, the other waits and reuses it."""
    monkeypatch.setenv("LIGHTNING_PPO_CACHE", str(tmp_path))
    builds = []

    def slow_build(root: Path, seed: int = 0) -> None:
        builds.append(root)
        (root / "policy").mkdir()
        threading.Event().wait(0.2)  # long enough for the other caller to arrive

    monkeypatch.setattr(tiny, "build_tiny_assets", slow_build)
    roots = []
    callers = [threading.Thread(target=lambda: roots.append(ensure_tiny_assets())) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1
    assert roots == [tiny.tiny_assets_dir()] * 2 and (roots[0] / "policy").is_dir()
    built = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert built == [tiny.tiny_assets_dir().name]  # no staging left


def test_failed_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_PPO_CACHE", str(tmp_path))

    def broken_build(root: Path, seed: int = 0) -> None:
        (root / "policy").mkdir()
        raise RuntimeError("out of disk")

    monkeypatch.setattr(tiny, "build_tiny_assets", broken_build)
    with pytest.raises(RuntimeError, match="out of disk"):
        ensure_tiny_assets()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


# ------------------------------------------------------------------------------------------------
# The arithmetic demo's chat tokenizer and problems

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
