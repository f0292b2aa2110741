"""Reward functions for the tests, importable by dotted path as `tests.reward_helpers:<name>`."""

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
