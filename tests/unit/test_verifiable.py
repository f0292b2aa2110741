"""Verifiable rewards: math answers checked by math-verify, and regular expressions, per prompt row."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lightning_ppo.errors import ConfigError
from lightning_ppo.verifiable import MathAnswerReward, RegexReward

pytest.importorskip("math_verify", reason="pip install 'lightning-ppo[math]'")

RESPONSES = ["The answer is 42.", "I think 41", "$\\frac{1}{2}$", "so \\boxed{7}", "no idea", "3+4=7"]
ANSWERS = ["42", "42", "0.5", "7", "7", "7"]


def score(reward, responses=RESPONSES, columns=None):
    return reward(responses, [""] * len(responses), responses, columns=columns).tolist()


def test_a_math_answer_scores_1_when_correct_in_any_notation_and_0_otherwise() -> None:
    assert score(MathAnswerReward(), columns={"answer": ANSWERS}) == [1, 0, 1, 1, 0, 1]


def test_the_format_bonus_goes_to_responses_matching_the_pattern() -> None:
    reward = MathAnswerReward(format_pattern=r"\\boxed\{[^}]+\}", format_bonus=0.25)
    assert score(reward, columns={"answer": ANSWERS}) == [1, 0, 1, 1.25, 0, 1]


def test_the_math_reward_runs_in_a_reward_servers_threads() -> None:
    """math-verify's time limits need the main thread; elsewhere they are off, not a crash."""
    reward = MathAnswerReward(answer_column="solution")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: score(reward, columns={"solution": ANSWERS}), range(2)))
    assert results == [[1, 0, 1, 1, 0, 1]] * 2


def test_a_missing_answer_column_or_an_unreadable_answer_is_named() -> None:
    missing = r"reads the prompt column 'answer', which the rows do not have; their columns: \['label'\]"
    with pytest.raises(ConfigError, match=missing):
        score(MathAnswerReward(), columns={"label": ANSWERS})
    with pytest.raises(ConfigError, match=r"reads the prompt column 'answer'.*columns: none"):
        score(MathAnswerReward())
    with pytest.raises(
        ConfigError, match=r"the 'answer' value 'blue' is not an answer math-verify can parse"
    ):
        score(MathAnswerReward(), ["42"], columns={"answer": ["blue"]})


def test_a_regex_scores_match_and_miss() -> None:
    reward = RegexReward(r"\b(great|good)\b", match=2.0, miss=-1.0)
    assert score(reward, ["a good film", "goodness", "great"]) == [2.0, -1.0, 2.0]
    full = RegexReward(r"^Review:", full_text=True)
    texts = ["Review: fine", "fine"]
    assert full(texts, ["Review: ", ""], ["fine", "fine"]).tolist() == [1.0, 0.0]


def test_a_regex_can_require_each_rows_column_value_taken_literally() -> None:
    reward = RegexReward(r"label: {value}(\s|$)", column="label")
    columns = {"label": ["c++", "pos", "neg"]}
    assert score(reward, ["label: c++ ok", "label: positive", "label: neg"], columns) == [1.0, 0.0, 1.0]


def test_bad_regex_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model.reward.init_args.pattern='\(' is not a regular expression"):
        RegexReward("(")
    with pytest.raises(ConfigError, match=r"must hold \{value\} where the 'label' value goes"):
        RegexReward("label", column="label")


def test_scores_are_float32_of_one_per_row() -> None:
    scores = MathAnswerReward()(["x"], [""], ["42"], columns={"answer": ["42"]})
    assert scores.dtype == torch.float32 and scores.shape == (1,)
