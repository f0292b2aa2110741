"""Held-out evaluation: per-prompt rewards and KL of validation and test, gathered once per prompt across
ranks; the test report (CSV, picture, paired difference with its interval); the predictions file.

Ranks evaluate equal, padded shares of the held-out prompts (`data.EvalSampler`), so a prompt may come
back twice: every value travels with its prompt's `index`, and the first of each index is kept.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.aggregation import CatMetric

from lightning_ppo.parallel import gather_rows
from lightning_ppo.report import RewardComparison, log_reward_figure, reward_histogram, save_figure


class HeldOutResults:
    """Per-prompt values over the batches of an evaluation pass and every rank, once per prompt.

    Each value is a torchmetrics `CatMetric`, which gathers uneven shares from all ranks on `compute`.
    """

    def __init__(self) -> None:
        self._values: dict[str, CatMetric] = {}

    def update(self, index: Tensor, **values: Tensor) -> None:
        """Add a batch: its prompts' `index` (B,) and one (B,) tensor per named value."""
        for name, value in {"index": index, **values}.items():
            metric = self._values.setdefault(name, CatMetric(nan_strategy="disable"))
            metric.update(value.detach().float().to(metric.device))

    def compute(self) -> dict[str, Tensor]:
        """Each value (N,) float32 over all ranks, one per held-out prompt in prompt order; then reset.

        A collective under DDP or DeepSpeed: every rank calls it.
        """
        gathered = {name: metric.compute().reshape(-1) for name, metric in self._values.items()}
        self._values = {}
        keep = first_of_each_index(gathered.pop("index").long())
        return {name: value[keep] for name, value in gathered.items()}


def first_of_each_index(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each value of `index` (N,), in increasing order of the values.

    Naive equivalent: `[list(index).index(i) for i in sorted(set(index))]`.
    """
    order = torch.argsort(index, stable=True)  # (N,)
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


def unique_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of each held-out prompt (rows hold its `index`, which is dropped), in prompt order."""
    keep = first_of_each_index(torch.tensor([row["index"] for row in rows], dtype=torch.long))
    return [{k: v for k, v in rows[i].items() if k != "index"} for i in keep.tolist()]


def test_rows(
    batch: dict[str, Any],
    ref_responses: list[str],
    responses: list[str],
    ref_scores: Tensor,
    scores: Tensor,
) -> list[dict[str, Any]]:
    """The test table's rows for one batch: prompt, both responses and both rewards, the row's columns."""
    return [
        {
            "index": int(batch["index"][i]),
            "query": query,
            "response (before)": ref_responses[i],
            "response (after)": responses[i],
            "rewards (before)": float(ref_scores[i]),
            "rewards (after)": float(scores[i]),
            **columns,
        }
        for i, (query, columns) in enumerate(zip(batch["query"], row_columns(batch), strict=True))
    ]


def row_columns(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The other columns of each prompt row of a batch, as one dict per row."""
    columns = batch.get("columns") or {}
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)] or [
        {} for _ in batch["query"]
    ]


def write_test_report(
    trainer: Trainer, rows: list[dict[str, Any]], results: dict[str, Tensor], comparison: RewardComparison
) -> None:
    """Gather every rank's rows; on rank 0 write `test_samples.csv` and `test_rewards.png` to the log dir,
    send the picture to TensorBoard, and say what changed (`report.RewardComparison.summary_text`)."""
    rows = unique_rows(gather_rows(rows))
    log_dir = Path(trainer.log_dir or ".")  # a collective: every rank asks
    if not trainer.is_global_zero:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "test_samples.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = f"Per-prompt table: {log_dir / 'test_samples.csv'}"
    figure = reward_histogram(results["reward_ref"], results["reward"], comparison)
    save_figure(figure, log_dir / "test_rewards.png")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            log_reward_figure(logger.experiment, figure, trainer.global_step)
    rank_zero_info(f"{comparison.summary_text()}\n{written}; picture: {log_dir / 'test_rewards.png'}")


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes `predict` results as JSON lines (prompt, response, reward) to `<log_dir>/predictions.jsonl`."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        # each rank predicted its (padded) share of the prompts: keep each prompt once, in file order
        rows = unique_rows(gather_rows([row for batch_rows in predictions for row in batch_rows]))
        path = Path(trainer.log_dir or ".") / "predictions.jsonl"  # log_dir is a collective: every rank asks
        if not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        rank_zero_info(f"Wrote {len(rows)} predictions to {path}")
