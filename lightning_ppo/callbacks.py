"""Callbacks the module always installs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes `predict` results as JSON lines (prompt, response, reward) to `<log_dir>/predictions.jsonl`."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        name = (
            "predictions.jsonl" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.jsonl"
        )
        path = Path(trainer.log_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for rows in predictions:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
        rank_zero_info(f"Wrote {sum(len(rows) for rows in predictions)} predictions to {path}")
