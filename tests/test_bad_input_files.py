"""Issue 24: faults that gave a library traceback or a silent non-result now end in a clear outcome.

Each test names the fault and what was seen before, and checks the one paragraph (or the working result)
that replaces it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_ppo import report

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


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
