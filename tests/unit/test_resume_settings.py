"""Resuming with other settings: safe changes take effect and are printed, the others exit 2 naming them."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from lightning_ppo import cli
from lightning_ppo.config import PPOConfig
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import ConfigError
from lightning_ppo.lora import LoraOptions
from lightning_ppo.module import PPOModule
from lightning_ppo.resume import IGNORED, REFUSED, SAFE, compare_settings, resume_changes
from lightning_ppo.rollout import SamplingConfig
from lightning_ppo.shaping import ShapingConfig
from tests.helpers import cli_seed_args

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
SECTIONS = {"ppo": PPOConfig, "sampling": SamplingConfig, "shaping": ShapingConfig, "lora": LoraOptions}

# ------------------------------------------------------------------------------------------------
# The pure comparison


def leaf_keys(cls: type, sections: dict[str, type]) -> set[str]:
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "reward"}
    keys = {name for name in names if name not in sections}
    for name in names & sections.keys():
        keys |= {f"{name}.{f.name}" for f in fields(sections[name])}
    return keys


def test_every_setting_is_either_safe_refused_or_ignored():
    settings = {"model": leaf_keys(PPOModule, SECTIONS), "data": leaf_keys(PromptDataModule, {})}
    for section, keys in settings.items():
        known = SAFE[section] | REFUSED[section].keys() | IGNORED[section]
        assert keys <= known, (section, keys - known)
        assert not SAFE[section] & REFUSED[section].keys()


SAVED_MODEL = {
    "policy": "tiny:policy",
    "learning_rate": 1e-3,
    "ppo": {"cliprange": 0.2, "advantage_estimator": "gae", "init_kl_coef": 0.05},
    "sampling": {"response_max_length": 15},
    "shaping": None,
    "lora": None,
    "critic": None,
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
}


def test_safe_changes_are_listed_leaf_by_leaf_and_nothing_else():
    requested = {
        **SAVED_MODEL,
        "learning_rate": 5e-4,
        "ppo": {**SAVED_MODEL["ppo"], "cliprange": 0.1},
        "shaping": ShapingConfig(score_clip=3.0),  # a null section is its defaults
        "reward": object(),  # not saved in checkpoints: not compared
        "_instantiator": None,
    }
    changes = compare_settings(SAVED_MODEL, requested, "model")
    assert [(c.key, c.old, c.new, c.refused) for c in changes] == [
        ("model.learning_rate", 1e-3, 5e-4, None),
        ("model.ppo.cliprange", 0.2, 0.1, None),
        ("model.shaping.score_clip", None, 3.0, None),
    ]
    assert resume_changes(SAVED_MODEL, requested) == changes
    assert resume_changes(SAVED_MODEL, dict(SAVED_MODEL)) == []
    assert changes[0].describe() == "model.learning_rate: 0.001 -> 0.0005"


def test_unsafe_changes_are_refused_in_one_message_naming_each_key_and_both_values():
    requested = {
        **SAVED_MODEL,
        "learning_rate": 5e-4,  # safe: not in the message
        "ppo": {**SAVED_MODEL["ppo"], "advantage_estimator": "grpo"},
        "lora": LoraOptions(r=4),
    }
    saved_data = {"batch_size": 16, "seed": 0, "val_size": 8, "tokenizer": "tiny:policy"}
    data = {"batch_size": 8, "seed": 0, "val_size": 4, "tokenizer": "elsewhere"}
    with pytest.raises(ConfigError) as error:
        resume_changes(SAVED_MODEL, requested, saved_data, data, "fit")
    message = str(error.value)
    assert "\n" not in message
    assert 'model.ppo.advantage_estimator (checkpoint "gae", requested "grpo"' in message
    assert 'model.lora (checkpoint null, requested {"r": 4' in message
    assert "data.batch_size (checkpoint 16, requested 8" in message
    for not_refused in ("learning_rate", "val_size", "tokenizer", "seed"):
        assert not_refused not in message.split(". To resume")[0]
    assert "--model.policy <log_dir>/export" in message and "without --ckpt_path" in message

    lora = compare_settings({"lora": {"r": 8, "dropout": 0.0}}, {"lora": {"r": 4, "dropout": 0.1}}, "model")
    assert [(c.key, bool(c.refused)) for c in lora] == [("model.lora.r", True), ("model.lora.dropout", False)]
    with pytest.raises(ConfigError, match=r"To test this checkpoint, give the checkpoint's values"):
        resume_changes(SAVED_MODEL, {**SAVED_MODEL, "policy": "other"}, command="test")


# ------------------------------------------------------------------------------------------------
# Through the command line, from a tiny fit's checkpoint


def tiny_args(root: Path, *args: str) -> list[str]:
    """PPO steps of 8 prompts and 1 optimizer step each, no validation, no sample tables."""
    return [
        "--config", TINY, *cli_seed_args(),
        "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
        "--data.batch_size", "8", "--data.val_size", "8",
        "--model.ppo.mini_batch_size", "8", "--model.ppo.ppo_epochs", "1",
        "--model.log_samples_every_n_steps", "0",
        "--trainer.logger.init_args.save_dir", str(root),
        *args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log folder of a 2-step tiny fit (export/, and checkpoints/last.ckpt saved mid-epoch)."""
    root = tmp_path_factory.mktemp("fit")
    args = ["--trainer.max_steps", "2", "--trainer.callbacks.init_args.every_n_train_steps", "1"]
    done = cli.main(["fit", *tiny_args(root, *args)])
    return Path(done.trainer.log_dir)


@pytest.mark.slow
def test_changed_safe_settings_take_effect_and_are_printed(fitted: Path, tmp_path: Path, capsys):
    resumed = cli.main(
        [
            "fit", *tiny_args(tmp_path, "--trainer.max_steps", "3"),
            "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"),
            "--model.learning_rate", "5e-4",
            "--model.ppo.cliprange", "0.1",
            "--model.ppo.adap_kl_ctrl", "false", "--model.ppo.init_kl_coef", "0.3",
        ]
    )  # fmt: skip
    assert resumed.trainer.global_step == 3  # one more PPO step after the checkpoint's 2
    assert [group["lr"] for group in resumed.trainer.optimizers[0].param_groups] == [5e-4]
    assert resumed.model.ppo.cliprange == 0.1
    assert resumed.model.kl_ctl.value == 0.3  # fixed now, from the new coefficient
    saved = yaml.safe_load((Path(resumed.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["learning_rate"] == 5e-4
    assert saved["model"]["ppo"]["cliprange"] == 0.1
    out = capsys.readouterr().out
    for line in (
        "model.learning_rate: 0.001 -> 0.0005",
        "model.ppo.cliprange: 0.2 -> 0.1",
        "model.ppo.adap_kl_ctrl: true -> false",
        "model.ppo.init_kl_coef: 0.05 -> 0.3",
    ):
        assert line in out, out


REFUSED_RUNS = {
    "estimator": (
        ["--model.ppo.advantage_estimator", "reinforce_pp"],
        ['model.ppo.advantage_estimator (checkpoint "gae", requested "reinforce_pp"'],
    ),
    "lora": (["--model.lora.r", "8"], ['model.lora (checkpoint null, requested {"r": 8']),
    "batch_size": (["--data.batch_size", "16"], ["data.batch_size (checkpoint 8, requested 16"]),
    "two_keys": (
        ["--data.seed", "1", "--model.reward_label", "NEGATIVE"],
        [
            "data.seed (checkpoint 0, requested 1",
            'model.reward_label (checkpoint "POSITIVE", requested "NEGATIVE"',
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED_RUNS))
def test_a_change_that_cannot_take_effect_exits_2_naming_the_keys(fitted: Path, tmp_path: Path, capsys, case):
    args, expected = REFUSED_RUNS[case]
    checkpoint = str(fitted / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["fit", *tiny_args(tmp_path, *args), "--ckpt_path", checkpoint])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    paragraph = err[err.index("lightning-ppo: error: --ckpt_path") :].strip()
    assert "\n" not in paragraph, err
    for part in expected:
        assert part in paragraph, paragraph
    assert "--model.policy <log_dir>/export" in paragraph


@pytest.mark.slow
def test_another_policy_is_refused_by_test_too_and_the_documented_fresh_start_works(
    fitted: Path, tmp_path: Path, capsys
):
    export = fitted / "export"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(
            ["test", *tiny_args(tmp_path), "--model.policy", str(export), "--ckpt_path",
             str(fitted / "checkpoints" / "last.ckpt")]
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'model.policy (checkpoint "tiny:policy", requested "{export}"' in err
    assert "To test this checkpoint" in err

    # what the refusal advises: a new fit from the exported policy, with the refused settings changed
    fresh = cli.main(
        ["fit", *tiny_args(tmp_path, "--trainer.max_steps", "1"), "--model.policy", str(export),
         "--data.batch_size", "16", "--model.ppo.advantage_estimator", "reinforce_pp"]
    )  # fmt: skip
    assert fresh.trainer.global_step == 2  # one PPO step: 16 rows, 2 optimizer steps of 8
    tuned = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    start = PPOModule(policy=str(export), reward_model="tiny:reward").policy.lm.state_dict()
    for name, weight in start.items():  # the fresh fit started from the tuned weights
        torch.testing.assert_close(weight, tuned[f"policy.lm.{name}"], rtol=0, atol=0)


@pytest.mark.slow
def test_a_run_stopped_for_bad_steps_resumes_from_its_checkpoint_with_the_setting_changed(
    tiny_assets: Path, tmp_path: Path, capsys
):
    """The README's advice: a NaN-only reward stops the run; it resumes with a higher bad-step limit and
    the classifier reward (a changed model.reward is not compared: checkpoints do not save it)."""
    nan_reward = json.dumps(
        {
            "class_path": "lightning_ppo.rewards.FunctionReward",
            "init_args": {"function": "tests.reward_helpers:nan_score"},
        }
    )
    args = ["--trainer.limit_train_batches", "4"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(
            [
                "fit",
                *tiny_args(
                    tmp_path, *args, "--model.max_consecutive_bad_steps", "2", f"--model.reward={nan_reward}"
                ),
            ]
        )
    assert exit_info.value.code == 3
    (stopped,) = tmp_path.glob("tiny/version_0/checkpoints/bad-steps.ckpt")
    capsys.readouterr()

    resumed = cli.main(
        ["fit", *tiny_args(tmp_path, *args, "--model.max_consecutive_bad_steps", "5"),
         "--ckpt_path", str(stopped)]
    )  # fmt: skip
    assert resumed.model.bad_numbers.stop_checkpoint is None
    # the checkpoint was saved inside the last bad PPO step, so the resume does it again: steps 2-4, each
    # now with its optimizer step
    assert resumed.trainer.global_step == 3
    assert resumed.model.bad_numbers.max_consecutive_bad_steps == 5
    assert "model.max_consecutive_bad_steps: 2 -> 5" in capsys.readouterr().out
