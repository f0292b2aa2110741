"""Prompt sources: how the rows of a dataset become token-id prompts. A new prompt format is a new source.

A source replaces a row's prompt column with `input_ids` and `query` (the decoded prompt); the row's other
columns stay, and reach the reward beside the row's samples (`rewards.SampleBatch.columns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_ppo.errors import ConfigError

# Columns the data module adds to a prompt row; a dataset column of the same name would be overwritten.
RESERVED_COLUMNS = ("input_ids", "query", "index", "prompt_messages")
OverlongPrompts = Literal["drop", "refuse", "truncate_left"]
OVERLONG_CHOICES = get_args(OverlongPrompts)


class PromptSource:
    """Turns dataset rows into prompts: adds `input_ids` and `query`, keeps the other columns."""

    column: str  # the column a prompt is made from
    key = "data.prompt_column"  # the setting that names it

    @property
    def settings(self) -> str:
        """The settings that decide which rows give a prompt, for error messages."""
        raise NotImplementedError

    hint = "add rows"  # what to do when too few rows give a prompt
    noun = "rows"  # what a row is, for error messages

    def __call__(self, rows: Dataset, tokenizer: PreTrainedTokenizerBase, split: str) -> Dataset:
        raise NotImplementedError


@dataclass
class TextOpenings(PromptSource):
    """The notebook's recipe: texts longer than `min_text_length` characters cut to their first k tokens,
    k drawn once per row, uniformly in [min_tokens, max_tokens], from `seed`."""

    column: str
    min_text_length: int
    min_tokens: int
    max_tokens: int
    seed: int
    key = "data.text_column"
    noun = "texts"
    hint = "add longer texts, lower data.min_text_length"

    @property
    def settings(self) -> str:
        return f"data.min_text_length={self.min_text_length}, data.text_column={self.column!r}"

    def __call__(self, rows: Dataset, tokenizer: PreTrainedTokenizerBase, split: str) -> Dataset:
        check_columns(rows, self.column, self.key)
        long_enough = rows.filter(
            lambda batch: [isinstance(t, str) and len(t) > self.min_text_length for t in batch[self.column]],
            batched=True,
            keep_in_memory=True,  # never write cache files into the dataset's folder
        )
        rng = np.random.default_rng(self.seed)
        lengths = rng.integers(self.min_tokens, self.max_tokens + 1, size=len(long_enough))
        return first_tokens(long_enough, self.column, lengths, tokenizer)


@dataclass
class PromptColumn(PromptSource):
    """A column of prompts, each a string or a list of chat messages (`{"role", "content"}`).

    Messages are rendered with the tokenizer's chat template (with the generation prompt); strings are
    taken as they are, or wrapped as one user message with `chat_template`. Prompts over `max_tokens` are
    dropped (a count printed), refused, or cut from the left, as `overlong` says.
    """

    column: str
    max_tokens: int
    chat_template: bool = False
    overlong: OverlongPrompts = "drop"
    limit_key: str = "data.prompt_max_tokens"
    hint = "add rows, or raise data.prompt_max_tokens"

    @property
    def settings(self) -> str:
        return f"data.prompt_column={self.column!r}, {self.limit_key}={self.max_tokens}"

    def __call__(self, rows: Dataset, tokenizer: PreTrainedTokenizerBase, split: str) -> Dataset:
        check_columns(rows, self.column, self.key)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            conversations = [self._conversation(value) for value in batch[self.column]]
            ids = [
                encode_prompt(tokenizer, value, messages)
                for value, messages in zip(batch[self.column], conversations, strict=True)
            ]
            return {"input_ids": ids, "prompt_messages": conversations}

        encoded = rows.map(encode, batched=True, remove_columns=[self.column], keep_in_memory=True)
        encoded = self._limit(encoded, split)
        return encoded.map(
            lambda batch: {"query": tokenizer.batch_decode(batch["input_ids"])},
            batched=True,
            keep_in_memory=True,
        )

    def _conversation(self, value: Any) -> list[dict[str, str]] | None:
        """The prompt as chat messages, or None for a string taken as it is."""
        if isinstance(value, str):
            return [{"role": "user", "content": value}] if self.chat_template else None
        if (
            isinstance(value, list)
            and value
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value
            )
        ):
            return [{"role": m["role"], "content": m["content"]} for m in value]
        raise ConfigError(
            f"data.prompt_column={self.column!r}: a value is {_short(value)}; each must be a string or a "
            'non-empty list of chat messages {"role": ..., "content": ...}'
        )

    def _limit(self, prompts: Dataset, split: str) -> Dataset:
        lengths = [len(ids) for ids in prompts["input_ids"]]
        over = sum(length > self.max_tokens for length in lengths)
        if not over:
            return prompts
        longest = max(lengths)
        what = (
            f"{over} of the {len(lengths)} prompts of split {split!r} are longer than "
            f"{self.limit_key}={self.max_tokens} tokens (the longest: {longest})"
        )
        if self.overlong == "refuse":
            raise ConfigError(
                f"{what}; raise {self.limit_key}, or set data.overlong_prompts to drop or truncate_left"
            )
        if self.overlong == "truncate_left":
            print(f"lightning-ppo: {what}: kept their last {self.max_tokens} tokens (data.overlong_prompts)")
            return prompts.map(
                lambda batch: {"input_ids": [ids[-self.max_tokens :] for ids in batch["input_ids"]]},
                batched=True,
                keep_in_memory=True,
            )
        if over == len(lengths):
            raise ConfigError(
                f"all {what}, so none is left; raise {self.limit_key} to at least {longest}, or set "
                "data.overlong_prompts: truncate_left"
            )
        print(f"lightning-ppo: dropped {what} (data.overlong_prompts: drop)")
        kept = [i for i, length in enumerate(lengths) if length <= self.max_tokens]
        return prompts.select(kept, keep_in_memory=True)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, value: str, messages: list[dict[str, str]] | None
) -> list[int]:
    """Token ids of one prompt: the chat template's rendering of `messages` (it holds its own special
    tokens, so none is added), else the string with the tokenizer's special tokens, never a BOS twice."""
    if messages is not None:
        if not tokenizer.chat_template:
            raise ConfigError(
                f"data.prompt_column holds chat messages (or data.chat_template is true), but the policy "
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; give plain-string prompts, "
                "or a policy whose tokenizer has a chat_template"
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(value)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:  # a template or text that begins
        ids = ids[1:]  # with BOS, and a tokenizer that adds one
    return ids


def first_tokens(
    rows: Dataset, column: str, lengths: np.ndarray, tokenizer: PreTrainedTokenizerBase
) -> Dataset:
    """Rows with `input_ids` (the first `lengths[i]` tokens of `column`) and `query` (their text); rows
    whose text gives no token are dropped."""

    def cut(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        encoded = tokenizer(batch[column], truncation=True, max_length=int(lengths.max()))
        input_ids = [ids[: lengths[i]] for ids, i in zip(encoded["input_ids"], indices, strict=True)]
        return {"input_ids": input_ids, "query": tokenizer.batch_decode(input_ids)}

    prompts = rows.map(cut, batched=True, with_indices=True, remove_columns=[column], keep_in_memory=True)
    return prompts.filter(
        lambda batch: [len(ids) > 0 for ids in batch["input_ids"]], batched=True, keep_in_memory=True
    )


def check_columns(rows: Dataset, column: str, key: str) -> None:
    """The prompt column exists and no column takes a name the data module adds."""
    if column not in rows.column_names:
        raise ConfigError(
            f"{key}={column!r} is not a column of the dataset; its columns are {rows.column_names}"
        )
    clashing = [name for name in RESERVED_COLUMNS if name in rows.column_names]
    if clashing:
        raise ConfigError(
            f"the dataset has column(s) {clashing}, names the data module gives to what it adds to each "
            f"prompt ({', '.join(RESERVED_COLUMNS)}); rename them in the dataset"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
