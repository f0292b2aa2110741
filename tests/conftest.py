"""Shared fixtures: every cache goes to a session temp folder, and the tiny assets are built once."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from lightning_ppo.tiny import ensure_arithmetic_assets, ensure_tiny_assets
from tests.helpers import TEST_SEED, seeded

# before any asset is built; CLI runs in subprocesses inherit it
os.environ.setdefault("LIGHTNING_PPO_TINY_SEED", str(TEST_SEED))


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point the tiny-asset cache (and the `datasets` file cache) at session temp folders, not the home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_PPO_CACHE", str(tmp_path_factory.mktemp("lightning_ppo_cache")))
        # `datasets` reads its cache root at import time; `load_dataset` looks this attribute up per call.
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


@pytest.fixture(scope="session")
def tiny_assets(isolated_caches: None) -> Path:
    """The root of the tiny assets (`policy/`, `reward/`, `reviews/`), built once per session."""
    return ensure_tiny_assets()


@pytest.fixture(autouse=True)
def seeded_rngs() -> None:
    """Every test starts from the suite's seed, whatever ran before it."""
    torch.manual_seed(seeded(0))
    np.random.seed(seeded(0))
    random.seed(seeded(0))


@pytest.fixture(scope="session")
def arithmetic_assets(isolated_caches: None) -> Path:
    """The root of the arithmetic demo's assets (`chat-policy/`, `arithmetic/`), built once per session."""
    return ensure_arithmetic_assets()
