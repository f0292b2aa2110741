"""End to end through the command line, on the offline tiny config: fit, test, predict, every YAML."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lightning_ppo.cli import main
from tests.helpers import TINY, assert_reward_rose, cli_seed_args, scalars

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
PPO_STEPS = 16

pytestmark = pytest.mark.slow


def run_cli(*args: str):
    """Run the CLI in-process, as `python -m lightning_ppo ARGS`, and return the LightningCLI object."""
    return main(list(args))


@pytest.fixture(scope="module")
def fitted(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    """One tiny PPO run of PPO_STEPS steps, shared by the tests below."""
    root = tmp_path_factory.mktemp("fit")
    start = time.perf_counter()
    cli = run_cli(
        "fit",
        "--config", TINY, *cli_seed_args(),
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(PPO_STEPS),
        "--trainer.val_check_interval", "8",
        "--trainer.logger.init_args.save_dir", str(root),
    )  # fmt: skip
    cli.fit_seconds = time.perf_counter() - start  # for the time/* accounting test
    return cli, Path(cli.trainer.log_dir)


def test_fit_writes_checkpoint_config_and_the_expected_metrics(fitted):
    cli, log_dir = fitted
    assert (log_dir / "config.yaml").is_file()
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    logged = scalars(log_dir)
    expected = {
        "env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
        "ppo/mean_scores", "ppo/mean_non_score_reward", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
        "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac",
        "ppo/policy/advantages_mean", "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error",
        "ppo/val/clipfrac", "ppo/val/var_explained", "tokens/queries_len_mean", "tokens/responses_len_mean",
        "time/rollout", "time/reward", "time/forward", "time/optimize", "time/other", "time/step",
        "tokens/decode_waste", "tokens/update_waste", "val/reward_mean", "val/kl",
    }  # fmt: skip
    assert expected <= set(logged), expected - set(logged)
    assert len(logged["env/reward_mean"]) == PPO_STEPS  # one point per PPO step
    assert len(logged["val/reward_mean"]) == 2  # every 8 steps
    # 4 PPO epochs x (64 / 32) minibatches = 8 optimizer steps per PPO step
    assert cli.trainer.global_step == PPO_STEPS * 8


def test_the_phases_add_up_to_the_steps_and_the_steps_to_the_fit(fitted):
    cli, log_dir = fitted
    logged = scalars(log_dir)
    phases = ("time/rollout", "time/reward", "time/forward", "time/optimize", "time/other")
    for step in range(PPO_STEPS):
        assert logged["time/other"][step] >= 0
        total = sum(logged[phase][step] for phase in phases)
        assert total == pytest.approx(logged["time/step"][step], abs=1e-5)
    # the steps tile the training time: together no longer than the whole fit (which also loads models)
    assert 0.5 * cli.fit_seconds < sum(logged["time/step"]) < cli.fit_seconds


def test_fit_raises_the_reward_and_moves_only_the_policy(fitted, tiny_assets: Path):
    cli, log_dir = fitted
    assert_reward_rose(scalars(log_dir))

    start_policy = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy").state_dict()
    start_reward = AutoModelForSequenceClassification.from_pretrained(tiny_assets / "reward").state_dict()
    model = cli.model
    tuned = model.policy.lm.state_dict()
    assert any(not torch.equal(tuned[k], v) for k, v in start_policy.items()), "policy did not change"
    for name, weight in model.ref_policy.state_dict().items():
        torch.testing.assert_close(weight, start_policy[name], rtol=0, atol=0)
    for name, weight in model.reward.model.state_dict().items():
        torch.testing.assert_close(weight, start_reward[name], rtol=0, atol=0)


def test_checkpoint_holds_the_policy_but_not_the_frozen_models(fitted):
    _, log_dir = fitted
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("policy.lm.") for k in keys) and "policy.v_head.weight" in keys
    assert not [k for k in keys if k.startswith(("ref_policy.", "reward."))]
    assert checkpoint["kl_controller"]["value"] > 0


def test_test_compares_reference_and_policy_and_writes_the_table(fitted, tmp_path: Path):
    _, log_dir = fitted
    cli = run_cli(
        "test",
        "--config", TINY, *cli_seed_args(),
        "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    for name in ("reward_ref_mean", "reward_ref_median", "reward_policy_mean", "reward_policy_median", "kl"):
        assert f"test/{name}" in metrics
    # the tuned policy beats the reference it started from on held-out prompts
    assert metrics["test/reward_policy_mean"] > metrics["test/reward_ref_mean"]
    table = Path(cli.trainer.log_dir) / "test_samples.csv"
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16
    assert set(rows[0]) == {
        "query",
        "response (before)",
        "response (after)",
        "rewards (before)",
        "rewards (after)",
        "label",  # the review's other column, kept beside its prompt
    }
    mean_after = sum(float(r["rewards (after)"]) for r in rows) / len(rows)
    assert mean_after == pytest.approx(float(metrics["test/reward_policy_mean"]), abs=1e-4)


def test_predict_writes_json_lines(fitted, tmp_path: Path):
    _, log_dir = fitted
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\nthis film\n")
    cli = run_cli(
        "predict",
        "--config", TINY, *cli_seed_args(),
        "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"),
        "--data.predict_file", str(prompts),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    )  # fmt: skip
    lines = (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in rows] == ["the movie was", "this film"]
    assert all(r["response"] and isinstance(r["reward"], float) for r in rows)


def test_progress_bars_can_be_turned_off(fitted, tmp_path: Path):
    _, log_dir = fitted
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\n")
    cli = run_cli(
        "predict",
        "--config", TINY, *cli_seed_args(),
        "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"),
        "--data.predict_file", str(prompts), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    )  # fmt: skip
    assert cli.trainer.progress_bar_callback is None
    assert (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text()


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(config), "--print_config")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def test_the_documented_overrides_are_accepted(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        run_cli(
            "fit", "--config", TINY, *cli_seed_args(),
            "--model.policy", "some/policy", "--model.reward_model", "some/reward",
            "--data.dataset", "some/dataset", "--data.batch_size", "8",
            "--trainer.limit_train_batches", "20", "--print_config",
        )  # fmt: skip
    printed = capsys.readouterr().out
    assert "policy: some/policy" in printed  # (data.tokenizer is linked to it: not printed)
    assert "reward_model: some/reward" in printed and "dataset: some/dataset" in printed
    assert "batch_size: 8" in printed and "limit_train_batches: 20" in printed
