"""Shared fixtures of every tier (unit/, integration/, e2e/): the tiny assets are built once per machine
and recipe, other caches per session; everything under e2e/ is marked `slow`."""

from __future__ import annotations

import hashlib
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


E2E = Path(__file__).parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is `slow`: whole runs stay out of the fast tier without a marker each."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.slow)


def asset_cache() -> Path:
    """Where this checkout keeps its tiny assets: a folder per recipe (tiny.py's source), seed, library
    versions, thread count and CPU kernels, so a kept asset is exactly what a fresh build would give here."""
    import tokenizers
    import transformers

    from lightning_ppo import tiny

    key = hashlib.sha256()
    for part in (
        Path(tiny.__file__).read_bytes(),
        os.environ["LIGHTNING_PPO_TINY_SEED"].encode(),
        " ".join(m.__version__ for m in (torch, transformers, tokenizers, datasets)).encode(),
        f"{torch.get_num_threads()} {torch.backends.cpu.get_cpu_capability()}".encode(),
    ):
        key.update(part)
    return Path(__file__).parents[1] / ".cache" / "tiny-assets" / key.hexdigest()[:16]


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tiny assets in this checkout's `.cache/` (built once, `asset_cache`), `datasets`' file cache in a
    session temp folder; never the home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_PPO_CACHE", str(asset_cache()))
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
