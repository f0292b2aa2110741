"""Shared fixtures: every cache goes to a session temp folder, and the tiny assets are built once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest

from lightning_ppo.tiny import ensure_tiny_assets


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
