"""Callbacks the module always installs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_ppo.data import unique_rows
from lightning_ppo.parallel import gather_rows


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
