"""The documentation stays true: the configuration page is the one the docstrings generate.

Fast tier: imports the config classes, loads no model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def config_reference() -> ModuleType:
    """scripts/config_reference.py, loaded by path (scripts/ is not a package)."""
    path = ROOT / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_the_one_the_docstrings_generate() -> None:
    reference = config_reference()
    assert reference.PAGE.read_text() == reference.render(), (
        f"docs/configuration.md is stale (a config class's docstring or signature changed): "
        f"run `{reference.COMMAND}` and commit the page"
    )


def test_every_configuration_key_has_help() -> None:
    missing = config_reference().undocumented()
    assert not missing, f"keys without a line in their class's `Args:` docstring section: {missing}"


def test_the_configuration_page_walks_into_the_nested_groups() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    nested = ("model.ppo.cliprange", "model.sampling.temperature", "model.lora.r", "model.shaping.score_clip")
    for key in nested:
        assert f"| `{key}` |" in page
    assert "| `data.batch_size` | `int` | `128` |" in page
