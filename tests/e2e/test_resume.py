"""Resume through the command line: 3 PPO steps, stop, resume for 3 more == 6 steps uninterrupted; and
resuming with other settings: safe changes take effect and are printed, the others exit 2 naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ppo import cli
from lightning_ppo.checkpointing import AtomicCheckpointIO
from lightning_ppo.cli import main
from lightning_ppo.module import PPOModule
from tests.helpers import TINY, cli_seed_args

OPT_STEPS_PER_PPO_STEP = 8  # 4 PPO epochs x (16 / 8) minibatches
COMPARED = ("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/loss/policy")


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def fit(root: Path, *args: str):
    """A tiny fit of at most 6 PPO steps of 16 prompts, checkpointing after every PPO step."""
    return main(
        [
            "fit", "--config", TINY, *cli_seed_args(),
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "6",
            "--trainer.val_check_interval", "3",  # runs right after the checkpoint the resume starts from
            "--data.val_size", "8",
            "--data.batch_size", "16",
            "--model.ppo.mini_batch_size", "8",
            "--model.log_samples_every_n_steps", "0",
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.callbacks.init_args.every_n_train_steps", str(OPT_STEPS_PER_PPO_STEP),
            *args,
        ]
    )  # fmt: skip


def critic_free(estimator: str, kl_in: str = "reward") -> list[str]:
    """The same 16 rows per PPO step as 8 prompts x 2 samples."""
    return [
        "--model.ppo.advantage_estimator", estimator, "--model.ppo.kl_in", kl_in,
        "--data.batch_size", "8", "--model.sampling.num_samples_per_prompt", "2",
    ]  # fmt: skip


ESTIMATORS = {
    "gae": [],
    "grpo": critic_free("grpo", kl_in="loss"),
    "rloo": critic_free("rloo"),
    "reinforce_pp": critic_free("reinforce_pp"),
}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_resumed_fit_logs_what_an_uninterrupted_one_does(tiny_assets: Path, tmp_path: Path, estimator: str):
    args = ESTIMATORS[estimator]
    whole = fit(tmp_path / "whole", *args)
    first = fit(tmp_path / "resumed", *args, "--trainer.max_steps", str(3 * OPT_STEPS_PER_PPO_STEP))
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3 * OPT_STEPS_PER_PPO_STEP
    resumed = fit(tmp_path / "resumed", *args, "--ckpt_path", str(last))

    assert resumed.trainer.global_step == whole.trainer.global_step == 6 * OPT_STEPS_PER_PPO_STEP
    assert isinstance(resumed.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # installed by default
    expected, got = scalars(Path(whole.trainer.log_dir)), scalars(Path(resumed.trainer.log_dir))
    for name in COMPARED:
        assert sorted(got[name]) == [3, 4, 5], name  # the resumed run logged PPO steps 4-6 only
        for step in (3, 4, 5):
            assert got[name][step] == pytest.approx(expected[name][step], abs=1e-6), (name, step)
    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    for key, weight in whole_state.items():
        torch.testing.assert_close(resumed_state[key], weight, rtol=0, atol=1e-6)


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
            "init_args": {"function": "tests.helpers.rewards:nan_score"},
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
