"""Two nodes for real: two `torchrun` launches on 127.0.0.1, and two plain processes under SLURM's variables.

Every run is 4 PPO steps of 8 prompts per rank on the tiny config (gloo, one CPU thread per process), with a
checkpoint after PPO step 2. The 2-node checkpoint is then resumed on 2 processes (one node, DDP: the same
world size, so the continuation must be exact) and on 1 process (it runs and continues the step count; the
prompts and the RNG streams cannot continue as on 2 ranks, see `test_a_resume_on_one_process_...`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import RANK_PROBE, cli_seed_args

ROOT = Path(__file__).parents[2]
PPO_STEPS, BATCH, OPT_STEPS_PER_PPO_STEP = 4, 8, 2  # 1 PPO epoch x (8 prompts / minibatches of 4)
MID = 2 * OPT_STEPS_PER_PPO_STEP  # the checkpoint after PPO step 2, which the resumes start from
COMPARED = ("env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "ppo/loss/total")
JOB_ID = "4243"
TIMEOUT = 240  # s for one run; a rank left waiting in a collective would otherwise hang the suite

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_args(probe_dir: Path, *args: str) -> list[str]:
    """`lightning_ppo fit` on the tiny config: 4 PPO steps, checkpoints after steps 2 and 4 (all kept)."""
    probe = {"class_path": RANK_PROBE, "init_args": {"out_dir": str(probe_dir)}}
    return [
        "-m", "lightning_ppo", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(PPO_STEPS),
        "--trainer.limit_val_batches", "0",
        "--trainer.callbacks.init_args.every_n_train_steps", str(MID),
        "--trainer.callbacks.init_args.save_top_k", "-1",
        f"--trainer.callbacks+={json.dumps(probe)}",
        "--data.batch_size", str(BATCH), "--model.ppo.mini_batch_size", "4", "--model.ppo.ppo_epochs", "1",
        "--model.log_samples_every_n_steps", "0",
        "--trainer.logger.init_args.save_dir", "runs",
        *args,
    ]  # fmt: skip


def base_env() -> dict[str, str]:
    launcher = ("SLURM_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE")  # the tests' own, not the caller's
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def run_together(processes: list[tuple[list[str], dict[str, str]]], cwd: Path) -> None:
    """Start every (command, env) at once in its own process group; all must exit 0 within TIMEOUT.

    On a failure or a timeout every group still running is killed, so no rank is left waiting.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    logs = [cwd / f"process{i}.log" for i in range(len(processes))]
    started = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
        for (command, env), log in zip(processes, logs, strict=True)
    ]  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in started):
            failed = [i for i, p in enumerate(started) if p.returncode not in (None, 0)]
            log = logs[(failed or [0])[0]]
            assert not failed and time.monotonic() < deadline, (failed, log.read_text()[-4000:])
            time.sleep(0.1)
        for process, log in zip(started, logs, strict=True):
            assert process.returncode == 0, log.read_text()[-4000:]
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def torchrun_two_nodes(work: Path, *args: str) -> None:
    """The two launches of docs/distributed.md: one node each, one process per node, on 127.0.0.1."""
    port = str(free_port())
    commands = [
        [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
            *fit_args(work / "probe", "--trainer.num_nodes", "2", "--trainer.devices", "1", *args),
        ]
        for node in (0, 1)
    ]  # fmt: skip
    run_together([(command, base_env()) for command in commands], work)


def slurm_two_nodes(work: Path) -> None:
    """What `srun` starts for slurm/multi_node.sbatch, 1 task per node: 2 processes, SLURM's variables."""
    port = str(free_port())
    run_dir = work / "runs" / "ppo-test" / f"version_{JOB_ID}"  # as the batch script names it
    args = fit_args(
        work / "probe", "--trainer.num_nodes", "2", "--trainer.devices", "1",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.name", "ppo-test", "--trainer.logger.init_args.version", JOB_ID,
    )  # fmt: skip
    job = {
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "ppo-test",  # Lightning ignores "bash" and "interactive"
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2",
        "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
    }  # fmt: skip
    tasks = [
        {**base_env(), **job, "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank)}
        for rank in (0, 1)
    ]
    run_together([([sys.executable, *args], env) for env in tasks], work)


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def probes(work: Path, world_size: int) -> list[dict]:
    return [json.loads((work / "probe" / f"rank{r}.json").read_text()) for r in range(world_size)]


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def two_nodes(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("torchrun")
    torchrun_two_nodes(work)
    return work


@pytest.fixture(scope="module")
def slurm(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("slurm")
    slurm_two_nodes(work)
    return work


def mid_checkpoint(two_nodes: Path) -> Path:
    return two_nodes / "runs" / "tiny" / "version_0" / "checkpoints" / f"epoch=0-step={MID}.ckpt"


def assert_global_metrics(log_dir: Path, ranks: list[dict]) -> None:
    """The logged reward statistics are those of both ranks' rows together (test_distributed.py's proof)."""
    logged = scalars(log_dir)
    pairs = zip(ranks[0]["train_scores"], ranks[1]["train_scores"], strict=True)
    both = [np.concatenate(pair) for pair in pairs]
    assert [len(rows) for rows in both] == [2 * BATCH] * PPO_STEPS
    np.testing.assert_allclose([logged["env/reward_mean"][s] for s in range(PPO_STEPS)],
                               [rows.mean() for rows in both], atol=1e-5)  # fmt: skip
    np.testing.assert_allclose([logged["env/reward_std"][s] for s in range(PPO_STEPS)],
                               [rows.std(ddof=1) for rows in both], atol=1e-5)  # fmt: skip
    rank0_only = [np.mean(rows) for rows in ranks[0]["train_scores"]]
    assert not np.allclose([logged["env/reward_mean"][s] for s in range(PPO_STEPS)], rank0_only, atol=1e-5)


def assert_one_set_of_files(work: Path, version: Path) -> None:
    """Only global rank 0 writes: one version folder, one config, one event file, one export."""
    assert sorted(p.name for p in work.iterdir() if not p.name.endswith(".log")) == ["probe", "runs"]
    assert [p for p in (work / "runs").rglob("version_*")] == [version]
    assert sorted(p.name for p in version.iterdir() if not p.name.startswith("events.")) == [
        "checkpoints", "config.yaml", "export", "hparams.yaml"
    ]  # fmt: skip
    assert len(list(version.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (version / "checkpoints").iterdir()) == [
        f"epoch=0-step={MID}.ckpt", f"epoch=0-step={2 * MID}.ckpt", "last.ckpt"
    ]  # fmt: skip
    assert len(list(work.rglob("config.yaml"))) == len(list(work.rglob("model.safetensors"))) == 1
    assert len(list(work.rglob("last.ckpt"))) == 1


def assert_two_ranks_trained_together(ranks: list[dict]) -> None:
    assert [(r["world_size"], r["global_rank"]) for r in ranks] == [(2, 0), (2, 1)]
    assert all(r["distributed_sampler"] for r in ranks)
    for queries0, queries1 in zip(ranks[0]["queries"], ranks[1]["queries"], strict=True):
        assert set(queries0).isdisjoint(queries1)  # a distributed sampler across the nodes
    assert ranks[0]["end_hash"] != ranks[0]["start_hash"], "the policy did not train"
    assert ranks[0]["end_hash"] == ranks[1]["end_hash"], "the nodes' policies diverged: no all-reduce"
    assert [r["global_step"] for r in ranks] == [PPO_STEPS * OPT_STEPS_PER_PPO_STEP] * 2


def test_two_torchrun_nodes_train_one_global_run(two_nodes: Path):
    ranks = probes(two_nodes, 2)
    assert_two_ranks_trained_together(ranks)
    version = two_nodes / "runs" / "tiny" / "version_0"
    assert_global_metrics(version, ranks)
    assert_one_set_of_files(two_nodes, version)
    assert global_step(version / "checkpoints" / "last.ckpt") == PPO_STEPS * OPT_STEPS_PER_PPO_STEP


def test_two_slurm_tasks_on_two_nodes_train_one_global_run(slurm: Path, two_nodes: Path):
    """Lightning's SLURMEnvironment reads the ranks from SLURM_PROCID/NODEID; the run is the torchrun one."""
    ranks = probes(slurm, 2)
    assert_two_ranks_trained_together(ranks)
    version = slurm / "runs" / "ppo-test" / f"version_{JOB_ID}"
    assert_global_metrics(version, ranks)
    assert_one_set_of_files(slurm, version)
    assert [r["cluster_environment"] for r in ranks] == ["SLURMEnvironment"] * 2
    assert [r["cluster_environment"] for r in probes(two_nodes, 2)] == ["TorchElasticEnvironment"] * 2
    # the same seed and world size: the same prompts, samples and updates as the torchrun launch, bit for bit
    expected, got = scalars(two_nodes / "runs" / "tiny" / "version_0"), scalars(version)
    for name in COMPARED:
        assert got[name] == expected[name], name
    same = ("queries", "train_scores", "kl_coef", "start_hash", "end_hash")
    assert [{k: r[k] for k in same} for r in ranks] == [{k: r[k] for k in same} for r in probes(two_nodes, 2)]


def test_a_resume_on_two_processes_continues_the_two_node_run_exactly(two_nodes: Path, tmp_path: Path):
    """From the 2-node checkpoint after PPO step 2 to one node of 2 processes: steps 3-4 as uninterrupted."""
    resume = ["--ckpt_path", str(mid_checkpoint(two_nodes))]
    args = fit_args(tmp_path / "probe", "--trainer.devices", "2", *resume)
    run_together([([sys.executable, *args], base_env())], tmp_path)  # Lightning starts the second rank
    whole, resumed = two_nodes / "runs" / "tiny" / "version_0", tmp_path / "runs" / "tiny" / "version_0"
    expected, got = scalars(whole), scalars(resumed)
    for name in COMPARED:
        assert sorted(got[name]) == [2, 3], name  # the resumed run logged PPO steps 3-4 only
        assert got[name] == {step: expected[name][step] for step in (2, 3)}, name  # bitwise
    both = probes(two_nodes, 2)
    for rank, record in enumerate(probes(tmp_path, 2)):
        assert record["queries"] == both[rank]["queries"][2:]  # each rank's own prompts, in order
        assert record["train_scores"] == both[rank]["train_scores"][2:]  # its own sampling noise
        assert record["end_hash"] == both[rank]["end_hash"]
    exported, uninterrupted = (
        load_file(resumed / "export" / "model.safetensors"),
        load_file(whole / "export" / "model.safetensors"),
    )
    assert exported.keys() == uninterrupted.keys()
    assert all(torch.equal(exported[name], uninterrupted[name]) for name in uninterrupted)


def test_a_resume_on_one_process_runs_and_continues_the_steps(two_nodes: Path, tmp_path: Path):
    """From the 2-node checkpoint to 1 process: the state goes on, but it is not the 2-rank run continued.

    Identical: the weights, optimizer and KL controller it starts from, and the step counters. Not: the
    prompts (8 per step instead of 16; the 1-rank sampler skips 2 x 8 of its own order, which on 2 ranks
    were the prompts of step 2, so it repeats those), and the sampling noise (only rank 0's RNG stream
    is restored; rank 1's is dropped, see SafeCheckpoints.load_state_dict).
    """
    resume = ["--ckpt_path", str(mid_checkpoint(two_nodes))]
    args = fit_args(tmp_path / "probe", "--trainer.devices", "1", *resume)
    run_together([([sys.executable, *args], base_env())], tmp_path)
    logged = scalars(tmp_path / "runs" / "tiny" / "version_0")
    for name in COMPARED:
        assert sorted(logged[name]) == [2, 3], name
        assert np.isfinite(list(logged[name].values())).all(), name
    (record,) = probes(tmp_path, 1)
    assert record["world_size"] == 1 and [len(s) for s in record["train_scores"]] == [BATCH, BATCH]
    assert record["global_step"] == PPO_STEPS * OPT_STEPS_PER_PPO_STEP
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert global_step(last) == PPO_STEPS * OPT_STEPS_PER_PPO_STEP
    both = probes(two_nodes, 2)
    seen_before = {q for rank in both for step in rank["queries"][:2] for q in step}
    assert set(record["queries"][0]) | set(record["queries"][1]) <= seen_before  # repeats, as documented
    expected = scalars(two_nodes / "runs" / "tiny" / "version_0")
    # the KL controller's state went on: step 3 uses the coefficient the 2-node run had reached
    assert logged["objective/kl_coef"][2] == expected["objective/kl_coef"][2]
