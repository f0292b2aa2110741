"""The two Lightning internals this trainer reads, in one place; `tests/test_compat.py` breaks loudly when a
Lightning upgrade moves them (the pinned range is lightning>=2.4,<2.7).
"""

from __future__ import annotations

from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import Trainer


def logging_step(trainer: Trainer) -> int:
    """The step Lightning writes logged scalars at (one per training batch that stepped an optimizer).

    Tables and histograms written straight to TensorBoard use it so that they line up with the scalars;
    Lightning has no public name for it (its logger connector reads the same attribute).
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def cluster_environment(trainer: Trainer) -> ClusterEnvironment:
    """The cluster environment (SLURM, torchelastic, ...) even on a single-device strategy.

    Public only on parallel strategies (`strategy.cluster_environment`); Lightning's own signal handling
    reads it from the accelerator connector, as here.
    """
    return trainer._accelerator_connector.cluster_environment
