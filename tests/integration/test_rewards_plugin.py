"""Pluggable rewards: a function by dotted path, a weighted sum, and a function reward chosen in YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ppo.cli import main
from lightning_ppo.rewards import ClassifierReward, FunctionReward, WeightedSumReward
from tests.helpers import TINY, assert_reward_rose, cli_seed_args, scalars

TEXTS = ["a great great film", "a dull film"]
QUERIES = ["a", "a"]
RESPONSES = ["great great film", "dull film"]


def test_function_reward_imports_the_function_and_checks_its_output():
    reward = FunctionReward("tests.helpers.rewards:count_word")
    torch.testing.assert_close(reward(TEXTS, QUERIES, RESPONSES), torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="package.module:function"):
        FunctionReward("tests.helpers.rewards.count_word")


def test_weighted_sum_adds_weighted_rewards():
    count = FunctionReward("tests.helpers.rewards:count_word")
    length = FunctionReward("tests.helpers.rewards:response_length")
    total = WeightedSumReward([count, length], [2.0, -0.5])
    torch.testing.assert_close(total(TEXTS, QUERIES, RESPONSES), torch.tensor([2 * 2 - 0.5 * 3, -0.5 * 2]))
    with pytest.raises(ValueError, match="weights"):
        WeightedSumReward([count], [1.0, 2.0])


def test_default_reward_is_the_classifier_built_from_the_old_keys(tiny_assets: Path):
    from lightning_ppo.module import PPOModule

    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward")
    assert isinstance(module.reward, ClassifierReward) and module.reward.source == "tiny:reward"


@pytest.mark.slow
def test_a_function_reward_from_yaml_rises_during_fit(tiny_assets: Path, tmp_path: Path):
    config = tmp_path / "function_reward.yaml"
    config.write_text(
        "model:\n"
        "  reward:\n"
        "    class_path: lightning_ppo.rewards.FunctionReward\n"
        "    init_args:\n"
        "      function: tests.helpers.rewards:count_word\n"
    )
    cli = main(
        [
            "fit", "--config", TINY, *cli_seed_args(), "--config", str(config), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "24", "--trainer.val_check_interval", "24",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert isinstance(cli.model.reward, FunctionReward)
    assert_reward_rose(scalars(Path(cli.trainer.log_dir)))
