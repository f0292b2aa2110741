"""Issue 24: faults that gave a library traceback or a silent non-result now end in a clear outcome.

Each test names the fault and what was seen before, and checks the one paragraph (or the working result)
that replaces it.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_ppo import cli, report
from lightning_ppo.checkpointing import AtomicCheckpointIO, read_checkpoint
from lightning_ppo.commands import export_command
from lightning_ppo.config import PPOConfig
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import ConfigError
from lightning_ppo.rewards import (
    FunctionReward,
    RewardModel,
    SampleBatch,
    WeightedSumReward,
    as_scores,
    call_reward,
)
from lightning_ppo.shaping import ShapingConfig
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
    samples = SampleBatch(TEXTS, TEXTS, TEXTS, [], [])
    torch.testing.assert_close(call_reward(ListReward(), samples), torch.full((3,), 0.5))
    summed = WeightedSumReward([ListReward(), TextReward()], [1.0, 1.0])
    with pytest.raises(ConfigError, match=rf"the reward {__name__}\.TextReward returned a list of 3 element"):
        summed(TEXTS, TEXTS, TEXTS)
    with pytest.raises(ConfigError, match=r"returned a Tensor of dtype torch.float32 and shape \(3, 1\)"):
        as_scores(torch.zeros(3, 1), 3, "R")


# ------------------------------------------------------------------------------------------------
# 3. Checkpoints load weights-only; a damaged one is named with the checkpoint to use instead


@pytest.fixture(scope="module")
def checkpoint(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last.ckpt of a one-step fit: what this project writes (RNG states, loops, KL controller...)."""
    root = tmp_path_factory.mktemp("fit")
    cli.main(["fit", "--config", TINY, *cli_seed_args(), *short_fit(root)])
    (path,) = root.glob("tiny/version_0/checkpoints/last.ckpt")
    return path


def test_a_real_checkpoint_resumes_and_exports_weights_only(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[object] = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: asked.append(k.get("weights_only")) or load(*a, **k))
    resumed = cli.main(
        ["fit", "--config", TINY, *cli_seed_args(), *short_fit(tmp_path), "--ckpt_path", str(checkpoint),
         "--trainer.limit_train_batches", "2"]
    )  # fmt: skip
    assert resumed.trainer.global_step > 0 and resumed.config.fit.weights_only is True
    assert len(asked) >= 3 and set(asked) == {True}  # our check, Lightning's hparams, the restore
    asked.clear()
    export_command(["--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "export")])
    assert (tmp_path / "export" / "config.json").is_file() and set(asked) == {True}


def damage(path: Path, how: str, good: Path) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    else:  # truncated mid-write, as a full disk or a killed copy leaves it
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "random", "truncated"])
@pytest.mark.parametrize("command", ["fit", "test", "export"])
def test_a_damaged_checkpoint_exits_2_naming_it_and_the_previous_one(
    how: str,
    command: str,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Was a bare `EOFError`, or torch's advice to retry with `weights_only=False` (unsafe)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    previous = folder / "epoch=0-step=8.ckpt"
    previous.write_bytes(checkpoint.read_bytes())
    damaged = folder / "last.ckpt"
    damage(damaged, how, checkpoint)
    if command == "export":
        args = ["lightning-ppo", "export", "--ckpt_path", str(damaged), "--output_dir", str(tmp_path / "out")]
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as exit_info:
            cli.run()
        code, err = exit_info.value.code, capsys.readouterr().err
        assert "Traceback" not in err
        line = err.splitlines()[-1]
    else:
        args = ["--ckpt_path", str(damaged), "--trainer.logger.init_args.save_dir", str(tmp_path)]
        code, line = run_cli(capsys, monkeypatch, command, *args)
    assert code == 2
    assert line.startswith(f"lightning-ppo: error: --ckpt_path '{damaged}' cannot be read as a checkpoint: ")
    assert f"e.g. --ckpt_path {previous} " in line and "weights_only=False" not in line
    assert not list(tmp_path.glob("tiny/version_*"))  # stopped before any run started


def test_the_checkpoint_io_names_a_damaged_file_lightning_found_itself(tmp_path: Path) -> None:
    """`--ckpt_path last` resolves inside the Trainer: the plugin that reads it names the file."""
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"last\.ckpt' cannot be read .* it is empty \(0 bytes\)") as error:
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert f"No other checkpoint is in {tmp_path}" in str(error.value)


def test_an_old_checkpoint_with_pickled_options_loads_weights_only(tmp_path: Path) -> None:
    """Checkpoints of lightning-ppo 0.1 pickled PPOConfig (named lightning_ppo.module.PPOConfig)."""
    import lightning_ppo.module  # noqa: F401  (registers the option classes as safe)

    torch.save({"hyper_parameters": {"ppo": PPOConfig(mini_batch_size=8), "shaping": ShapingConfig()}},
               tmp_path / "old.ckpt")  # fmt: skip
    assert read_checkpoint(tmp_path / "old.ckpt")["hyper_parameters"]["ppo"].mini_batch_size == 8


def test_a_checkpoint_holding_other_objects_is_refused_not_loaded_unsafely(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "thing": SimpleNamespace(a=1)}, tmp_path / "odd.ckpt")
    with pytest.raises(ConfigError, match=r"holds types\.SimpleNamespace, which loading with weights_only"):
        read_checkpoint(tmp_path / "odd.ckpt")


# ------------------------------------------------------------------------------------------------
# 4. Data files that hold nothing, or are not UTF-8


def data_setup_error(dataset: Path, stage: str = "fit", **options: object) -> str:
    data = PromptDataModule(dataset=str(dataset), tokenizer="tiny:policy", batch_size=8, **options)
    with pytest.raises(ConfigError) as error:
        data.setup(stage)
    return str(error.value)


@pytest.mark.parametrize(
    ("splits", "where"),
    [({"train": []}, "split 'train'"), ({"train": ["a"], "test": []}, "split 'test'"), (None, "its dataset")],
)
def test_an_empty_save_to_disk_dataset_is_named(
    splits: dict[str, list[str]] | None, where: str, tmp_path: Path, tiny_assets: Path
) -> None:
    """Was `IndexError: list index out of range` inside `datasets.load_from_disk`."""
    if splits is None:  # a Dataset, not a DatasetDict
        saved = Dataset.from_dict({"text": []})
    else:
        saved = DatasetDict({name: Dataset.from_dict({"text": texts}) for name, texts in splits.items()})
    saved.save_to_disk(tmp_path / "saved")
    message = data_setup_error(tmp_path / "saved")
    assert message.startswith(f"data.dataset={str(tmp_path / 'saved')!r}: the `save_to_disk` folder ")
    assert f"{tmp_path / 'saved'} holds 0 rows in {where}; save the texts again" in message


LATIN1_TEXT = "un film très réussi, " * 12  # é and è are one byte each in Latin-1, invalid as UTF-8


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("reviews.csv", f"text\n{LATIN1_TEXT}\n"),
        ("reviews.jsonl", json.dumps({"text": LATIN1_TEXT}, ensure_ascii=False) + "\n"),
        ("reviews.json", json.dumps([{"text": LATIN1_TEXT}], ensure_ascii=False)),
        ("folder/train.csv", f"text\n{LATIN1_TEXT}\n"),
    ],
)
def test_a_data_file_that_is_not_utf8_is_named(
    name: str, content: str, tmp_path: Path, tiny_assets: Path
) -> None:
    """Was a bare `DatasetGenerationError` (CSV, JSON), or JSON lines read as mojibake without a word."""
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content.encode("latin-1"))
    message = data_setup_error(path.parent if name.startswith("folder/") else path, min_text_length=10)
    number, line = next((n, line) for n, line in enumerate(content.splitlines(), 1) if "è" in line)
    where = f"(byte {line.index('è') + 1} of line {number} "  # Latin-1: one byte per character
    assert message.startswith(f"data.dataset: the file {str(path)!r} is not UTF-8 text {where}")
    assert "is 0xe8); it must be UTF-8. Save it again as UTF-8" in message


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_a_predict_file_that_is_not_utf8_is_named(name: str, tmp_path: Path, tiny_assets: Path) -> None:
    """Was a bare `UnicodeDecodeError` naming neither the file nor data.predict_file."""
    path = tmp_path / name
    line = LATIN1_TEXT if name.endswith(".txt") else json.dumps({"prompt": LATIN1_TEXT}, ensure_ascii=False)
    path.write_bytes(line.encode("latin-1") + b"\n")
    message = data_setup_error(tmp_path, "predict", predict_file=str(path))
    assert message.startswith(f"data.predict_file: the file {str(path)!r} is not UTF-8 text (byte ")
    assert "of line 1 is 0xe8); it must be UTF-8" in message


# ------------------------------------------------------------------------------------------------
# 5. Trainer settings that ended inside the training step


def test_a_fit_in_precision_64_true_trains_in_float64(tiny_assets: Path, tmp_path: Path) -> None:
    """Was a dtype mismatch (`scatter(): Expected self.dtype to be equal to src.dtype`) in the backward."""
    fitted = cli.main(
        ["fit", "--config", TINY, *cli_seed_args(), *short_fit(tmp_path), "--trainer.precision", "64-true"]
    )
    assert fitted.trainer.global_step > 0
    assert {p.dtype for p in fitted.model.policy.parameters()} == {torch.float64}


@pytest.mark.parametrize("value", ["0", "-2", "0.0"])
def test_a_val_check_interval_of_zero_exits_2_naming_it(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was `ZeroDivisionError: integer modulo by zero` in Lightning's fit loop, after the models loaded."""
    code, line = run_cli(
        capsys, monkeypatch, "fit", *short_fit(tmp_path), "--trainer.val_check_interval", value
    )
    assert code == 2
    assert (
        line == f"lightning-ppo: error: trainer.val_check_interval must be a number > 0 or null, got {value}"
    )


@pytest.mark.parametrize(
    ("name", "content"), [("prompts.txt", ""), ("blank.txt", "\n  \n"), ("prompts.jsonl", "")]
)
def test_predict_on_a_file_without_prompts_exits_2_naming_it(
    name: str,
    content: str,
    tiny_assets: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Was exit 0 with an empty predictions file (.txt), or `datasets`' error on a file without columns."""
    path = tmp_path / name
    path.write_text(content)
    args = ["--data.predict_file", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    code, line = run_cli(capsys, monkeypatch, "predict", *args)
    assert code == 2
    assert line.startswith(
        f"lightning-ppo: error: data.predict_file {str(path)!r} holds no prompts, so predict "
    )
    assert not list(tmp_path.glob("tiny/version_*/predictions.jsonl"))


# ------------------------------------------------------------------------------------------------
# 6. A full disk while a checkpoint is written


def test_a_full_disk_while_checkpointing_exits_4_naming_the_intact_checkpoint(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was the right errno (ENOSPC) at the end of a long traceback. The disk 'fills' during the second save:
    its writes start, then fail as a full disk fails them."""
    save = torch.save

    def save_until_full(checkpoint: dict, handle: object, *args: object, **kwargs: object) -> None:
        if checkpoint.get("global_step", 0) < 160:  # the second save: 2 x every_n_train_steps=80
            return save(checkpoint, handle, *args, **kwargs)
        handle.write(b"PK\x03\x04" + bytes(1000))  # a partial write, then no space left
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_full)
    fit = [*short_fit(tmp_path), "--trainer.limit_train_batches", "20"]  # 8 optimizer steps per PPO step
    code, line = run_cli(capsys, monkeypatch, "fit", *fit)
    monkeypatch.setattr(torch, "save", save)
    (folder,) = tmp_path.glob("tiny/version_0/checkpoints")
    previous = next(p for p in [folder / "last.ckpt", folder / "epoch=0-step=80.ckpt"] if p.is_file())
    assert code == 4 == cli.DISK_FULL_EXIT_CODE
    assert line.startswith("lightning-ppo: error: disk full while writing the checkpoint ")
    assert f"; the previous checkpoint {previous} is intact. Free space on that disk and resume with " in line
    assert line.endswith(f"--ckpt_path {previous}")
    assert read_checkpoint(previous)["global_step"] == 80
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
