"""A fit, test and predict on a dataset of prompts (`data.prompt_column`) whose reward reads each row's
other columns: the columns stay with their prompt through sampling k per prompt, and reach the test CSV
and `predictions.jsonl`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_ppo.cli import main
from lightning_ppo.tiny import ensure_tiny_assets
from tests.helpers import TINY, cli_seed_args

pytestmark = pytest.mark.slow
WORDS = ["great", "film", "bad"]


def prompt_file(path: Path, texts: list[str]) -> Path:
    records = []
    for i, text in enumerate(texts):
        prompt = " ".join(text.split()[:3])
        records.append({"prompt": prompt, "prompt_copy": prompt, "word": WORDS[i % 3]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_rows_columns_reach_the_reward_in_fit_test_and_predict(tiny_assets: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk

    texts = load_from_disk(str(ensure_tiny_assets() / "reviews"))["train"]["text"][:96]
    data = prompt_file(tmp_path / "prompts.jsonl", texts[:80])
    predict = prompt_file(tmp_path / "predict.jsonl", texts[80:])
    reward = tmp_path / "reward.yaml"
    reward.write_text(
        "model:\n  reward:\n    class_path: lightning_ppo.rewards.FunctionReward\n"
        "    init_args:\n      function: tests.helpers.rewards:says_the_row_word\n"
    )
    common = [
        "--config", TINY, *cli_seed_args(), "--config", str(reward), "--data.dataset", str(data),
        "--data.prompt_column", "prompt", "--data.prompt_max_tokens", "8", "--data.eval_fraction", "0.2",
        "--data.batch_size", "8", "--data.val_size", "8", "--data.test_size", "8",
        "--model.ppo.mini_batch_size", "8", "--model.ppo.ppo_epochs", "1",
        "--model.ppo.advantage_estimator", "grpo", "--model.sampling.num_samples_per_prompt", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1",
    ]  # fmt: skip
    fit = main(["fit", *common, "--trainer.limit_train_batches", "2", "--trainer.val_check_interval", "2"])
    assert fit.trainer.global_step > 0
    checkpoint = Path(fit.trainer.checkpoint_callback.last_model_path)
    test = main(["test", *common, "--ckpt_path", str(checkpoint)])
    with (Path(test.trainer.log_dir) / "test_samples.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(
        row["word"] in WORDS and row["prompt_copy"].strip() == row["query"].strip() for row in rows
    )
    predicted = main(
        ["predict", *common, "--data.predict_file", str(predict), "--ckpt_path", str(checkpoint)]
    )
    lines = (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 16
    assert all(r["prompt_copy"].strip() == r["prompt"].strip() and r["word"] in WORDS for r in records)
