"""A real 2-process DDP fit on CPU (gloo) through the command line, checked rank by rank.

Each rank records what it saw with `tests.helpers.probes.RankProbe`; the test compares the two records
with each other and with what rank 0 logged to TensorBoard.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import RANK_PROBE, cli_seed_args, scalars

ROOT = Path(__file__).parents[2]
STEPS, BATCH, MINI_BATCH, ACCUMULATION, EPOCHS, VAL_SIZE = 3, 16, 8, 2, 2, 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_run(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    """`python -m lightning_ppo fit` with `--trainer.strategy ddp --trainer.devices 2` in a temp folder."""
    work = tmp_path_factory.mktemp("ddp")
    probe = {"class_path": RANK_PROBE, "init_args": {"out_dir": str(work / "probe")}}
    command = [
        sys.executable, "-m", "lightning_ppo", "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(STEPS), "--trainer.val_check_interval", str(STEPS),
        "--trainer.logger.init_args.save_dir", "runs",
        f"--trainer.callbacks+={json.dumps(probe)}",
        "--data.batch_size", str(BATCH), "--data.val_size", str(VAL_SIZE),
        "--model.ppo.mini_batch_size", str(MINI_BATCH),
        "--model.ppo.gradient_accumulation_steps", str(ACCUMULATION),
        "--model.ppo.ppo_epochs", str(EPOCHS),
    ]  # fmt: skip
    run_on_two_ranks(command, work)
    ranks = [json.loads((work / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return work, ranks


def run_on_two_ranks(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # Lightning must split the cores between the ranks by itself
    # a rank waiting in a collective the other skipped hangs: the timeout turns that into a failure
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_test_run(ddp_run) -> Path:
    """`python -m lightning_ppo test` of the DDP checkpoint, on 2 ranks."""
    work, _ = ddp_run
    command = [
        sys.executable, "-m", "lightning_ppo", "test",
        "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1",
        "--trainer.logger.init_args.save_dir", "test_runs",
        "--ckpt_path", str(work / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"),
    ]  # fmt: skip
    run_on_two_ranks(command, work)
    return work / "test_runs"


def test_ranks_roll_out_different_prompts(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["distributed_sampler"] and rank1["distributed_sampler"], rank0["sampler"]
    assert len(rank0["queries"]) == len(rank1["queries"]) == STEPS
    for queries0, queries1 in zip(rank0["queries"], rank1["queries"], strict=True):
        assert len(queries0) == len(queries1) == BATCH
        assert queries0 != queries1


def test_ranks_draw_their_own_random_numbers(ddp_run):
    """seed_everything gives every rank one seed; sampling must still differ per rank (lengths, tokens)."""
    _, (rank0, rank1) = ddp_run
    assert rank0["response_lengths"] and len(rank0["response_lengths"]) == len(rank1["response_lengths"])
    assert rank0["response_lengths"] != rank1["response_lengths"]


def test_policy_weights_stay_identical_across_ranks(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["start_hash"] == rank1["start_hash"]
    assert rank0["end_hash"] != rank0["start_hash"], "the policy did not train"
    assert rank0["end_hash"] == rank1["end_hash"], "policies diverged: no all-reduce"


def test_gradients_are_all_reduced_once_per_optimizer_step(ddp_run):
    """TRL's accumulation: one step per MINI_BATCH x ACCUMULATION rows; `no_sync` on all but the last."""
    _, (rank0, rank1) = ddp_run
    optimizer_steps = STEPS * EPOCHS * BATCH // (MINI_BATCH * ACCUMULATION)
    assert rank0["global_step"] == rank1["global_step"] == optimizer_steps
    assert rank0["allreduces"] == rank1["allreduces"] == optimizer_steps  # not ACCUMULATION times as many


def test_kl_coefficient_is_identical_on_every_rank(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["kl_coef"] == rank1["kl_coef"]
    assert len(set(rank0["kl_coef"])) == STEPS  # the adaptive controller moved it every step


def test_logged_metrics_are_global(ddp_run):
    work, (rank0, rank1) = ddp_run
    logged = scalars(next((work / "runs" / "tiny").iterdir()))
    both_ranks = [
        np.concatenate([s0, s1]) for s0, s1 in zip(rank0["train_scores"], rank1["train_scores"], strict=True)
    ]
    np.testing.assert_allclose(logged["env/reward_mean"], [s.mean() for s in both_ranks], atol=1e-5)
    np.testing.assert_allclose(logged["env/reward_std"], [s.std(ddof=1) for s in both_ranks], atol=1e-5)
    np.testing.assert_allclose(logged["ppo/mean_scores"], [s.mean() for s in both_ranks], atol=1e-5)
    rank0_only = [np.mean(s) for s in rank0["train_scores"]]
    assert not np.allclose(logged["env/reward_mean"], rank0_only, atol=1e-5)
    np.testing.assert_allclose(logged["objective/kl_coef"], rank0["kl_coef"], rtol=1e-6)
    val_scores = np.concatenate(rank0["val_scores"] + rank1["val_scores"])
    assert len(val_scores) == VAL_SIZE  # each rank scored half of the held-out prompts
    np.testing.assert_allclose(logged["val/reward_mean"], [val_scores.mean()], atol=1e-5)


def test_only_rank_zero_writes_files(ddp_run):
    work, _ = ddp_run
    assert {"probe", "runs"} <= {p.name for p in work.iterdir()} <= {"probe", "runs", "test_runs"}
    assert [p.name for p in (work / "runs").iterdir()] == ["tiny"]
    versions = list((work / "runs" / "tiny").iterdir())
    assert [v.name for v in versions] == ["version_0"]
    assert len(list(versions[0].glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (versions[0] / "checkpoints").iterdir()] == ["last.ckpt"]


def test_each_rank_runs_on_its_share_of_the_cores(ddp_run):
    _, ranks = ddp_run
    for rank in ranks:
        assert rank["num_threads"] * 2 <= max(os.cpu_count() or 1, 2)


def test_test_gathers_every_rank_into_one_table(ddp_test_run: Path):
    versions = list((ddp_test_run / "tiny").iterdir())
    assert [v.name for v in versions] == ["version_0"]
    with (versions[0] / "test_samples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16  # data.test_size: 8 prompts from each rank
    logged = scalars(versions[0])
    mean_after = np.mean([float(row["rewards (after)"]) for row in rows])
    np.testing.assert_allclose(logged["test/reward_policy_mean"], [mean_after], atol=1e-5)


def test_uneven_held_out_prompts_count_once_on_two_ranks(tiny_assets: Path, tmp_path: Path):
    """5 test prompts on 2 ranks: ranks take 3 and 3 (one repeated); the table and means hold each once."""
    test_size = 5
    command = [
        sys.executable, "-m", "lightning_ppo", "test",
        "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", "runs",
        "--data.test_size", str(test_size), "--data.eval_batch_size", "2",
    ]  # fmt: skip
    run_on_two_ranks(command, tmp_path)
    (version,) = (tmp_path / "runs" / "tiny").iterdir()
    with (version / "test_samples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == test_size
    assert len({row["query"] for row in rows}) == test_size
    logged = scalars(version)
    means = {"rewards (before)": "test/reward_ref_mean", "rewards (after)": "test/reward_policy_mean"}
    for column, tag in means.items():
        np.testing.assert_allclose(logged[tag], [np.mean([float(row[column]) for row in rows])], atol=1e-5)


@pytest.mark.parametrize(
    ("estimator", "kl_in"), [("grpo", "loss"), ("rloo", "reward"), ("reinforce_pp", "reward")]
)
def test_critic_free_estimators_train_in_step_on_two_ranks(
    estimator: str, kl_in: str, tiny_assets: Path, tmp_path: Path
):
    """2 PPO steps of 4 prompts x 2 samples per rank (reinforce_pp all-reduces its whitening statistics)."""
    probe = {"class_path": RANK_PROBE, "init_args": {"out_dir": str(tmp_path / "probe")}}
    command = [
        sys.executable, "-m", "lightning_ppo", "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", "runs", f"--trainer.callbacks+={json.dumps(probe)}",
        "--data.batch_size", "4", "--model.sampling.num_samples_per_prompt", "2",
        "--model.ppo.mini_batch_size", "8", "--model.ppo.ppo_epochs", "2",
        "--model.ppo.advantage_estimator", estimator, "--model.ppo.kl_in", kl_in,
    ]  # fmt: skip
    run_on_two_ranks(command, tmp_path)
    rank0, rank1 = (json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1))
    for record in (rank0, rank1):
        assert [len(scores) for scores in record["train_scores"]] == [8, 8]  # 4 prompts x 2 samples
        for queries in record["queries"]:
            assert len(queries) == 4
    assert rank0["queries"] != rank1["queries"]
    assert rank0["end_hash"] != rank0["start_hash"], "the policy did not train"
    assert rank0["end_hash"] == rank1["end_hash"], "policies diverged"
    assert rank0["global_step"] == rank1["global_step"] == 2 * 2  # 2 PPO steps x 2 epochs x 1 minibatch
    logged = scalars(tmp_path / "runs" / "tiny" / "version_0")
    assert not [tag for tag in logged if tag.startswith(("ppo/val/", "ppo/returns/"))]
    assert all(np.isfinite(values).all() for values in logged.values())
