"""The documentation stays true: the generated configuration page, links and anchors, layouts, the test
files it names, a short README.

Fast tier: imports the config classes, loads no model.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 200
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), images too


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


def test_the_readme_is_a_front_door() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a docs/ page and link it"


def test_the_readme_shows_the_test_command_ci_runs() -> None:
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    pytest_command = next(line for line in ci_commands if line.startswith("python -m pytest"))
    assert pytest_command in README.read_text()


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of `page`: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_points_to_an_existing_file_and_heading() -> None:
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files or headings: {broken}"


def package_layout(page: Path) -> set[str]:
    """The file names in `page`'s fenced block that starts with `lightning_ppo/`."""
    block = re.search(r"```\nlightning_ppo/\n(.*?)```", page.read_text(), re.S)
    assert block, f"{page.relative_to(ROOT)} has no layout block starting with `lightning_ppo/`"
    return set(re.findall(r"^  (\w+\.py) ", block.group(1), re.M))


def test_the_layouts_name_every_module_and_only_those() -> None:
    modules = {path.name for path in (ROOT / "lightning_ppo").glob("*.py")}
    for page in (README, ROOT / "docs" / "architecture.md"):
        listed = package_layout(page)
        assert listed == modules, (
            f"{page.relative_to(ROOT)}'s layout is stale: missing {sorted(modules - listed)}, "
            f"gone {sorted(listed - modules)}"
        )


def test_every_test_file_the_docs_name_exists() -> None:
    """The test files README.md, docs/*.md and .ci/run point to as proof or to run, after tests move."""
    missing = []
    for page in [README, ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"\btests/[\w/]+\.py\b", page.read_text()):
            if not (ROOT / path).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, f"test files named but not there: {missing}"
