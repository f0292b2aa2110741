"""Verifiable rewards: a checked math answer (Hugging Face's `math-verify`) and a regular expression."""

from __future__ import annotations

import re
import threading
from typing import Any

import torch
from torch import Tensor

from lightning_ppo.errors import ConfigError
from lightning_ppo.rewards import RewardModel


def column_of(columns: dict[str, list[Any]] | None, name: str, rows: int, reward: str) -> list[Any]:
    """The values of prompt column `name`, one per row; a `ConfigError` naming the columns there are."""
    if not columns or name not in columns:
        there = sorted(columns or {}) or "none (set data.prompt_column and keep the column in the dataset)"
        raise ConfigError(
            f"model.reward: {reward} reads the prompt column {name!r}, which the rows do not have; "
            f"their columns: {there}. Set the reward's column option to one of them."
        )
    values = columns[name]
    if len(values) != rows:
        raise ValueError(f"column {name!r} has {len(values)} values for {rows} rows")
    return values


class MathAnswerReward(RewardModel):
    """1 when the response's final answer equals the row's `answer_column` (math-verify), else 0.

    `format_bonus` is added to responses that match `format_pattern` (e.g. a `\\boxed{}` answer).
    """

    def __init__(
        self, answer_column: str = "answer", format_pattern: str | None = None, format_bonus: float = 0.0
    ) -> None:
        super().__init__()
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ConfigError(
                "model.reward MathAnswerReward needs math-verify: pip install 'lightning-ppo[math]'"
            ) from None
        self.answer_column, self.format_bonus = answer_column, format_bonus
        self.format = _compile(format_pattern, "format_pattern") if format_pattern else None

    def forward(
        self,
        texts: list[str],
        queries: list[str],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
    ) -> Tensor:
        answers = column_of(columns, self.answer_column, len(responses), "MathAnswerReward")
        scores = [
            self._score(str(answer), response) for answer, response in zip(answers, responses, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32)

    def _score(self, answer: str, response: str) -> float:
        from math_verify import parse, verify

        # math-verify's time limits use SIGALRM, which only the main thread may set (a reward server is not)
        limit = 5 if threading.current_thread() is threading.main_thread() else None
        gold = parse(answer, parsing_timeout=limit)
        if not gold:  # a reference answer math-verify cannot read is the dataset's fault, not the policy's
            raise ConfigError(
                f"model.reward MathAnswerReward: the {self.answer_column!r} value {answer!r} is not an "
                "answer math-verify can parse; fix the dataset or use another reward."
            )
        correct = verify(gold, parse(response, parsing_timeout=limit), timeout_seconds=limit)
        bonus = self.format_bonus if self.format is not None and self.format.search(response) else 0.0
        return float(correct) + bonus


class RegexReward(RewardModel):
    """`match` for responses in which `pattern` is found (`re.search`), `miss` for the others.

    With `column`, `{value}` in the pattern stands for that row's column value (escaped), so a row's
    label or keyword can be what the response must contain.
    """

    def __init__(
        self,
        pattern: str,
        match: float = 1.0,
        miss: float = 0.0,
        column: str | None = None,
        full_text: bool = False,
    ) -> None:
        super().__init__()
        self.pattern, self.match, self.miss, self.column, self.full_text = (
            pattern,
            match,
            miss,
            column,
            full_text,
        )
        if column is None:
            self.compiled = _compile(pattern, "pattern")
        elif "{value}" not in pattern:
            raise ConfigError(
                f"model.reward.init_args.pattern={pattern!r} must hold {{value}} where the {column!r} "
                "value goes"
            )

    def forward(
        self,
        texts: list[str],
        queries: list[str],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
    ) -> Tensor:
        read = texts if self.full_text else responses
        if self.column is None:
            patterns = [self.compiled] * len(read)
        else:
            values = column_of(columns, self.column, len(read), "RegexReward")
            patterns = [
                _compile(self.pattern.replace("{value}", re.escape(str(v))), "pattern") for v in values
            ]
        found = [p.search(text) is not None for p, text in zip(patterns, read, strict=True)]
        return torch.tensor([self.match if hit else self.miss for hit in found], dtype=torch.float32)


def _compile(pattern: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(
            f"model.reward.init_args.{key}={pattern!r} is not a regular expression: {error}"
        ) from None
