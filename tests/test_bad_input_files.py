"""Issue 24: faults that gave a library traceback or a silent non-result now end in a clear outcome.

Each test names the fault and what was seen before, and checks the one paragraph (or the working result)
that replaces it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_ppo import cli, report
from lightning_ppo.errors import ConfigError
from lightning_ppo.rewards import FunctionReward, RewardModel, WeightedSumReward, as_scores, call_reward
from tests.helpers import cli_seed_args

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TEXTS = ["a great film", "a dull film", "a film"]


# ------------------------------------------------------------------------------------------------
# 1. Huge finite rewards are logged


@pytest.mark.parametrize(
    "reward",
    [[1e30] * 8, [1e20] * 4, [-3e38] * 3, [3.0] * 4, [1e30, -1e30, 2.0], [1e30, 1e30, 1.0]],
    ids=["1e30", "1e20", "-3e38", "constant-3", "huge-spread", "huge-and-small"],
)
def test_training_histograms_of_huge_or_constant_rewards(tmp_path: Path, reward: list[float]) -> None:
    """Was `ValueError: The histogram is empty` from 1e20 up: TensorBoard's default bins end near 1e20."""
    values = torch.tensor(reward)
    writer = SummaryWriter(tmp_path)
    report.log_training_histograms(writer, 0, values, torch.zeros(len(reward)))
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    (logged,) = events.Histograms("histograms/reward")
    histogram = logged.histogram_value
    assert histogram.num == len(reward) and sum(histogram.bucket) == len(reward)  # every value binned
    assert (histogram.min, histogram.max) == (float(values.min()), float(values.max()))


@pytest.mark.parametrize("value", [1e30, 1e20, 3.0])
def test_the_test_picture_of_constant_rewards(value: float) -> None:
    """Was numpy's `Too many bins for data range` for a constant 1e30 reward in `test`."""
    reference, tuned = torch.full((16,), value), torch.full((16,), value)
    figure = report.reward_histogram(reference, tuned, report.compare_rewards(reference, tuned))
    assert [int(patch.get_data().values.sum()) for patch in figure.axes[0].patches] == [16, 16]


# ------------------------------------------------------------------------------------------------
# 2. A reward that returns no scores is named


def function_reward(function: str) -> str:
    reward = {"class_path": "lightning_ppo.rewards.FunctionReward", "init_args": {"function": function}}
    return json.dumps(reward)


def run_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str, *args: str
) -> tuple[int, str]:
    """`lightning-ppo COMMAND --config configs/tiny.yaml ARGS` in-process: exit code, last line of stderr."""
    argv = ["lightning-ppo", command, "--config", TINY, *cli_seed_args(), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_info.value.code, err.splitlines()[-1]


def short_fit(tmp_path: Path) -> list[str]:
    """Arguments of a fit of one PPO step of 8 prompts, without validation, logging under `tmp_path`."""
    return [
        "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.batch_size", "8", "--model.ppo.mini_batch_size", "4",
    ]  # fmt: skip


def test_a_reward_function_returning_strings_exits_2_naming_it(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was `ValueError: too many dimensions 'str'` from torch.as_tensor, naming no reward."""
    reward = f"--model.reward={function_reward('tests.reward_helpers:labels')}"
    code, line = run_cli(capsys, monkeypatch, "fit", *short_fit(tmp_path), reward)
    assert code == 2
    assert line == (
        "lightning-ppo: error: model.reward: the reward function tests.reward_helpers.labels returned a list "
        "of 8 element(s) for 8 texts (element 0 is str: 'POSITIVE'); it must return one finite float per "
        "text (a list of 8 floats or a float tensor of shape (8,)). Fix the reward."
    )


class ListReward(RewardModel):
    """A reward class that returns a plain list (not the tensor `RewardModel` promises): that is fine."""

    def forward(self, texts: list[str], queries: list[str], responses: list[str]) -> list[float]:
        return [0.5] * len(texts)


class TextReward(RewardModel):
    def forward(self, texts: list[str], queries: list[str], responses: list[str]) -> list[str]:
        return list(texts)


@pytest.mark.parametrize(
    ("function", "named"),
    [
        ("nothing_for_the_last", "a list of 3 element(s) for 3 texts (element 2 is NoneType: None)"),
        ("one_short", "a list of 2 element(s) for 3 texts;"),
    ],
)
def test_a_reward_function_returning_none_or_too_few_scores_is_named(function: str, named: str) -> None:
    """Was `TypeError: must be real number, not NoneType`; too few scores a ValueError naming no key."""
    with pytest.raises(ConfigError) as error:
        FunctionReward(f"tests.reward_helpers:{function}")(TEXTS, TEXTS, TEXTS)
    message = str(error.value)
    assert f"model.reward: the reward function tests.reward_helpers.{function} returned {named}" in message
    assert "one finite float per text" in message


def test_a_reward_class_returning_texts_is_named_also_inside_a_weighted_sum() -> None:
    torch.testing.assert_close(call_reward(ListReward(), TEXTS, TEXTS, TEXTS), torch.full((3,), 0.5))
    summed = WeightedSumReward([ListReward(), TextReward()], [1.0, 1.0])
    with pytest.raises(ConfigError, match=rf"the reward {__name__}\.TextReward returned a list of 3 element"):
        summed(TEXTS, TEXTS, TEXTS)
    with pytest.raises(ConfigError, match=r"returned a Tensor of dtype torch.float32 and shape \(3, 1\)"):
        as_scores(torch.zeros(3, 1), 3, "R")
