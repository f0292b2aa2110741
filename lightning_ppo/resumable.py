"""A training DataLoader that resumes mid-epoch: no prompt repeated or skipped after a restart.

Lightning (2.6) saves `state_dict()` of every train loader that has one into the checkpoint
(`FitLoop.on_save_checkpoint`) and hands it back to `load_state_dict()` when it restarts mid-epoch
(`FitLoop._load_combined_loader_states`); a plain DataLoader would start the epoch over.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A `DistributedSampler` (one seeded permutation per epoch, this rank's share) that can start part-way.

    Being a `DistributedSampler`, Lightning leaves it in place under DDP instead of wrapping it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # samples of this rank's share to skip on the next pass only

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """Counts the batches of the epoch it has handed out; once restored, its next pass skips them.

    Needs a `ResumableSampler`, `drop_last=True` batches, and a loader-owned `generator` so that creating
    an iterator (which draws the workers' base seed) never advances the global RNG a resumed run restores.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, drop_last=True, **kwargs)
        self._epoch = 0  # epoch of the current (or last) pass
        self._batches_done = 0  # batches of that pass handed out so far
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first `next()`, after Lightning's `set_epoch` for this epoch.
        self._epoch, self._batches_done = self.sampler.epoch, 0
        if self._resume is not None and self._resume["epoch"] == self._epoch:
            self._batches_done = self._resume["batches_done"]
            self.sampler.start = self._batches_done * self.batch_size
        self._resume = None
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)


def resumable_loader(
    dataset: Dataset, batch_size: int, seed: int, world: dict[str, int], **kwargs: Any
) -> ResumableDataLoader:
    """A shuffled, drop-last `ResumableDataLoader`; `world` gives `num_replicas` and `rank` (default 1, 0)."""
    sampler = ResumableSampler(dataset, seed=seed, **world)
    generator = torch.Generator().manual_seed(seed)
    return ResumableDataLoader(dataset, sampler, batch_size=batch_size, generator=generator, **kwargs)
