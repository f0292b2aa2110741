"""`ClassifierReward` as a preference reward model: one output logit, and its own chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from lightning_ppo.rewards import ClassifierReward, SampleBatch, call_reward
from lightning_ppo.tiny import make_reward_tokenizer

WORDS = ["what", "is", "two", "plus", "three", "five", "user", "assistant", "says", ":"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} says : {{ m['content'] }} {% endfor %}"


def save_reward_model(folder: Path, num_labels: int, chat_template: str | None = None) -> Path:
    torch.manual_seed(0)
    tokenizer = make_reward_tokenizer(WORDS)
    tokenizer.chat_template = chat_template
    config = DistilBertConfig(
        vocab_size=len(tokenizer), dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logit(folder: Path, text: str, add_special_tokens: bool = True) -> float:
    reward = ClassifierReward(str(folder))
    encoded = reward.tokenizer([text], return_tensors="pt", add_special_tokens=add_special_tokens)
    return float(reward.model(**encoded).logits[0, 0])


def samples(messages: list | None) -> SampleBatch:
    return SampleBatch(
        prompts=["what is two plus three"],
        responses=[" five"],
        texts=["what is two plus three five"],
        prompt_ids=[],
        response_ids=[],
        prompt_messages=messages,
    )


def test_a_reward_model_with_one_logit_gives_that_logit_whatever_the_label(tmp_path: Path) -> None:
    folder = save_reward_model(tmp_path / "rm", num_labels=1)
    reward = ClassifierReward(str(folder), label="POSITIVE")  # no such label: a single logit needs none
    score = call_reward(reward, samples(None))
    assert score.shape == (1,)
    assert torch.isclose(score[0], torch.tensor(logit(folder, "what is two plus three five")), atol=1e-6)


def test_a_reward_model_with_a_chat_template_reads_the_conversation_in_it(tmp_path: Path) -> None:
    folder = save_reward_model(tmp_path / "rm", num_labels=1, chat_template=TEMPLATE)
    reward = ClassifierReward(str(folder))
    messages = [[{"role": "user", "content": "what is two plus three"}]]
    conversation = "user says : what is two plus three assistant says : five "
    assert (
        reward.tokenizer.apply_chat_template(
            [*messages[0], {"role": "assistant", "content": "five"}], tokenize=False
        )
        == conversation
    )
    score = float(call_reward(reward, samples(messages))[0])
    # the template's text, without the tokenizer's own [CLS]/[SEP] added on top
    assert abs(score - logit(folder, conversation, add_special_tokens=False)) < 1e-6
    assert abs(score - logit(folder, "what is two plus three five")) > 1e-6  # not the plain text
    plain = float(call_reward(reward, samples(None))[0])  # string prompts: the plain text
    assert abs(plain - logit(folder, "what is two plus three five")) < 1e-6
