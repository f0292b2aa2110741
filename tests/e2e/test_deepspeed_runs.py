"""DeepSpeed ZeRO-2 and ZeRO-3 for real: 2 CPU processes (gloo) through the command line, no mocks.

For each stage: a fit of 4 PPO steps with a mid-epoch checkpoint, a resume from it, the end-of-fit export,
`test` on the final checkpoint, and the export command on the checkpoint folder. ZeRO-3 runs with
`stage3_param_persistence_threshold: 0`, or the tiny model would never be partitioned. Alone:
    python -m pytest -q tests/e2e/test_deepspeed_runs.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lightning_ppo.commands import export_command
from lightning_ppo.export import load_value_head
from tests.helpers import cli_seed_args

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
ZERO_PROBE = "tests.helpers.zero_probe.TestWeightsProbe"  # the weights `test` sees, rank 0
PPO_STEPS, OPT_STEPS_PER_PPO_STEP = 4, 2  # 1 PPO epoch x (8 prompts / minibatches of 4)
MID_EPOCH = 2 * OPT_STEPS_PER_PPO_STEP  # the checkpoint the resume starts from: after PPO step 2 of 4
COMPARED = ("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/loss/policy")

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
pytest.importorskip(
    "deepspeed", reason='DeepSpeed is not installed: bash scripts/install.sh, or pip install ".[deepspeed]"'
)


def strategy(stage: int) -> str:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter of the tiny model
    init_args = {"config": {"zero_optimization": zero}}
    return json.dumps({"class_path": "lightning_ppo.parallel.CPUDeepSpeedStrategy", "init_args": init_args})


def cli(verb: str, stage: int, work: Path, save_dir: str, *args: str) -> None:
    """`python -m lightning_ppo VERB` on 2 CPU processes under DeepSpeed ZeRO-`stage`, in `work`."""
    command = [
        sys.executable, "-m", "lightning_ppo", verb, "--config", TINY, *cli_seed_args(),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", strategy(stage),
        "--data.batch_size", "8", "--data.val_size", "8", "--data.test_size", "8",
        "--model.ppo.mini_batch_size", "4", "--model.ppo.ppo_epochs", "1",
        "--model.log_samples_every_n_steps", "0",
        "--trainer.logger.init_args.save_dir", save_dir,
        *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # Lightning splits the cores between the ranks by itself
    # a rank waiting in a collective the other skipped hangs: the timeout turns that into a failure
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def fit(stage: int, work: Path, save_dir: str, *args: str) -> Path:
    """4 PPO steps of 8 prompts, a checkpoint every 2 (all kept); returns the run's log folder."""
    cli(
        "fit", stage, work, save_dir,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(PPO_STEPS),
        "--trainer.limit_val_batches", "0",
        "--trainer.callbacks.init_args.every_n_train_steps", str(MID_EPOCH),
        "--trainer.callbacks.init_args.save_top_k", "-1",
        *args,
    )  # fmt: skip
    return work / save_dir / "tiny" / "version_0"


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def runs(request: pytest.FixtureRequest, tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    """One stage's runs: uninterrupted fit, resume from its mid-epoch checkpoint, `test` of the last one."""
    stage: int = request.param
    work = tmp_path_factory.mktemp(f"zero{stage}")
    whole = fit(stage, work, "whole")
    checkpoints = whole / "checkpoints"
    resumed = fit(stage, work, "resumed", "--ckpt_path", str(checkpoints / f"epoch=0-step={MID_EPOCH}.ckpt"))
    probe = {"class_path": ZERO_PROBE, "init_args": {"out_file": str(work / "tested.pt")}}
    cli(
        "test", stage, work, "tested", "--ckpt_path", str(checkpoints / "last.ckpt"),
        f"--trainer.callbacks+={json.dumps(probe)}",
    )  # fmt: skip
    return {"stage": stage, "work": work, "whole": whole, "resumed": resumed}


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def policy_weights(folder: Path) -> dict[str, torch.Tensor]:
    """An exported policy as the module names it: `lm.*` from the model folder, `v_head.*` beside it."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    head = load_value_head(folder)
    return {
        **{f"lm.{name}": tensor for name, tensor in model.state_dict().items()},
        **{f"v_head.{name}": tensor for name, tensor in head.state_dict().items()},
    }


def test_checkpoints_are_deepspeed_folders_with_a_mid_epoch_one(runs):
    names = sorted(p.name for p in (runs["whole"] / "checkpoints").iterdir())
    assert names == [f"epoch=0-step={MID_EPOCH}.ckpt", f"epoch=0-step={2 * MID_EPOCH}.ckpt", "last.ckpt"]
    shards = list((runs["whole"] / "checkpoints" / "last.ckpt" / "checkpoint").glob("*model_states.pt"))
    assert len(shards) == (2 if runs["stage"] == 3 else 1)  # ZeRO-3 saves one weight shard per rank


def test_a_resumed_fit_logs_what_an_uninterrupted_one_does(runs):
    expected, got = scalars(runs["whole"]), scalars(runs["resumed"])
    for name in COMPARED:
        assert sorted(got[name]) == [2, 3], name  # the resumed run logged PPO steps 3-4 only
        for step in (2, 3):
            assert got[name][step] == pytest.approx(expected[name][step], abs=1e-5), (name, step)


def test_token_budget_micro_batches_log_what_whole_minibatches_do(runs):
    """The fit again in forwards of at most 24 tokens (one or two rows): both ranks run as many forwards
    and backwards (as ZeRO needs), the ratio guard decided first (DeepSpeed keeps the
    gradients)."""
    if runs["stage"] == 3:
        pytest.skip("ZeRO-3 refuses the budget (tests/test_deepspeed.py)")
    cut = scalars(fit(runs["stage"], runs["work"], "cut", "--model.ppo.max_tokens_per_microbatch", "24"))
    assert min(cut["tokens/micro_batches"].values()) > 1
    expected = scalars(runs["whole"])
    for name in COMPARED:
        for step in range(PPO_STEPS):
            assert cut[name][step] == pytest.approx(expected[name][step], abs=1e-4), (name, step)


def test_the_end_of_fit_export_holds_whole_trained_weights(runs, tiny_assets: Path):
    folder = runs["whole"] / "export"
    saved = load_file(folder / "model.safetensors")
    start = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy").state_dict()
    start_saved = load_file(tiny_assets / "policy" / "model.safetensors")
    assert saved.keys() == start_saved.keys()  # no spurious keys (e.g. a tied lm_head.weight)
    exported = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert {name: w.shape for name, w in exported.items()} == {name: w.shape for name, w in start.items()}
    assert any(not torch.equal(exported[name], weight) for name, weight in start.items()), "not trained"
    head = load_value_head(folder)
    assert head.weight.shape == (1, start["transformer.wte.weight"].shape[1]) and head.weight.abs().sum() > 0


def test_test_runs_on_the_checkpoint_with_its_weights(runs):
    tested = torch.load(runs["work"] / "tested.pt")
    exported = policy_weights(runs["whole"] / "export")  # the same weights as last.ckpt
    assert tested.keys() == exported.keys()
    for name, weight in exported.items():
        torch.testing.assert_close(tested[name], weight, rtol=0, atol=0, msg=name)
    assert list((runs["work"] / "tested").glob("tiny/version_0/test_samples.csv"))


def test_the_export_command_consolidates_a_checkpoint_folder(runs, tmp_path: Path):
    folder = export_command(
        ["--ckpt_path", str(runs["whole"] / "checkpoints" / "last.ckpt"), "--output_dir", str(tmp_path)]
    )
    exported, expected = policy_weights(folder), policy_weights(runs["whole"] / "export")
    assert exported.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(exported[name], weight, rtol=0, atol=0, msg=name)


# Lightning's own names for DeepSpeed on CPU processes: mapped to CPUDeepSpeedStrategy with a one-line note.
# Each name: a 1-step fit with its end-of-fit export (stage 3 names on 2 ranks). `deepspeed_stage_3` also
# runs `test` from its ZeRO-3 folder (DeepSpeed #7272 without PPODeepSpeedStrategy); the class-path form
# maps to the same strategy, and stage 2's `test` takes DeepSpeed's own loading path either way.
LIGHTNING_NAMES = {
    "deepspeed": (["--trainer.strategy", "deepspeed"], 2),
    "deepspeed_stage_2": (["--trainer.strategy", "deepspeed_stage_2"], 2),
    "deepspeed_stage_3": (["--trainer.strategy", "deepspeed_stage_3"], 3),
    "DeepSpeedStrategy-stage-3": (
        [
            "--trainer.strategy",
            "lightning.pytorch.strategies.DeepSpeedStrategy",
            "--trainer.strategy.stage",
            "3",
        ],
        3,
    ),
}


def run_named(verb: str, name_args: list[str], work: Path, devices: int, *args: str) -> str:
    """`python -m lightning_ppo VERB` with one of Lightning's DeepSpeed names on CPU; returns its stderr."""
    command = [
        sys.executable, "-m", "lightning_ppo", verb, "--config", TINY, *cli_seed_args(),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), *name_args,
        "--data.batch_size", "4", "--data.val_size", "4", "--data.test_size", "4",
        "--model.ppo.mini_batch_size", "4", "--model.ppo.ppo_epochs", "1",
        "--model.log_samples_every_n_steps", "0", "--trainer.logger.init_args.save_dir", verb,
        *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("name", list(LIGHTNING_NAMES))
def test_lightnings_deepspeed_names_run_on_cpu_processes(name: str, tiny_assets: Path, tmp_path: Path):
    name_args, stage = LIGHTNING_NAMES[name]
    devices = 2 if stage == 3 else 1  # ZeRO-3's collectives (gather, synced generation) on 2 ranks
    output = run_named(
        "fit", name_args, tmp_path, devices,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
    )  # fmt: skip
    assert "CPUDeepSpeedStrategy" in output  # the note says what the name became
    run = tmp_path / "fit" / "tiny" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a DeepSpeed checkpoint folder
    shards = list((last / "checkpoint").glob("*model_states.pt"))
    assert len(shards) == (devices if stage == 3 else 1)
    exported = policy_weights(run / "export")
    if name == "deepspeed_stage_3":
        probe = {
            "class_path": ZERO_PROBE,
            "init_args": {"out_file": str(tmp_path / "t.pt")},
        }
        run_named("test", name_args, tmp_path, devices, "--ckpt_path", str(last),
                  f"--trainer.callbacks+={json.dumps(probe)}")  # fmt: skip
        tested = torch.load(tmp_path / "t.pt")
        assert tested.keys() == exported.keys()
        for weight_name, weight in exported.items():
            torch.testing.assert_close(tested[weight_name], weight, rtol=0, atol=0, msg=weight_name)
