"""Reward functions for the tests, importable by dotted path as `tests.helpers.rewards:<name>`."""

from __future__ import annotations

WORD = "great"


def count_word(texts: list[str], queries: list[str], responses: list[str]) -> list[float]:
    """How often WORD appears in each response: a reward the policy can only raise by saying it."""
    return [float(response.split().count(WORD)) for response in responses]


def response_length(texts: list[str], queries: list[str], responses: list[str]) -> list[float]:
    return [float(len(response.split())) for response in responses]


def nan_score(texts: list[str], queries: list[str], responses: list[str]) -> list[float]:
    """A broken reward model: every score is NaN, so every PPO batch is skipped."""
    return [float("nan")] * len(texts)


def huge_score(texts: list[str], queries: list[str], responses: list[str]) -> list[float]:
    """A finite but huge constant score (1e30): beyond the ±1e20 of TensorBoard's default histogram bins."""
    return [1e30] * len(texts)


def labels(texts: list[str], queries: list[str], responses: list[str]) -> list[str]:
    """A broken reward: labels instead of scores (was `ValueError: too many dimensions 'str'`)."""
    return ["POSITIVE"] * len(texts)


def nothing_for_the_last(texts: list[str], queries: list[str], responses: list[str]) -> list[float | None]:
    """A broken reward: None for one text (was `TypeError: must be real number, not NoneType`)."""
    return [1.0] * (len(texts) - 1) + [None]


def one_short(texts: list[str], queries: list[str], responses: list[str]) -> list[float]:
    """A broken reward: a score too few."""
    return [1.0] * (len(texts) - 1)


def says_the_row_word(
    texts: list[str], queries: list[str], responses: list[str], columns: dict[str, list]
) -> list[float]:
    """1 when the response holds the row's `word` column; each row's `prompt` column must be its prompt."""
    for query, prompt in zip(queries, columns["prompt_copy"], strict=True):
        if query.strip() != prompt.strip():
            raise AssertionError(f"the columns of prompt {prompt!r} reached the reward with prompt {query!r}")
    return [
        float(word in response.split()) for word, response in zip(columns["word"], responses, strict=True)
    ]
