"""Compare the TensorBoard scalars of two runs, tag by tag and step by step.

    python scripts/compare_scalars.py runs/before/version_0 runs/after/version_0 [--atol 0] [--ignore time/]

Used to show that a refactoring changed no number: run the same config with the same seed before and after,
then compare. Prints the largest difference per tag and exits 1 if any tag, step or value differs beyond
`--atol` (wall-clock tags under `--ignore` prefixes are skipped; `time/` by default).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of the event files in `log_dir`: tag -> {step: value} (the last value per step)."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def compare(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], atol: float, ignore: list[str]
) -> list[str]:
    """Lines describing every difference; empty when the runs agree."""
    problems = []
    tags = sorted(tag for tag in before.keys() | after.keys() if not tag.startswith(tuple(ignore)))
    for tag in tags:
        if tag not in before or tag not in after:
            problems.append(f"{tag}: only in {'after' if tag not in before else 'before'}")
            continue
        if before[tag].keys() != after[tag].keys():
            problems.append(f"{tag}: logged at different steps")
            continue
        worst = max(_difference(before[tag][s], after[tag][s]) for s in before[tag])
        status = "ok" if worst <= atol else "DIFFERS"
        print(f"{status:8} {tag:40} {len(before[tag]):4} steps, max |difference| {worst:.3g}")
        if worst > atol:
            problems.append(f"{tag}: max |difference| {worst:.3g} > {atol}")
    return problems


def _difference(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path, help="log folder of the first run (holds events.out.tfevents.*)")
    parser.add_argument("after", type=Path, help="log folder of the second run")
    parser.add_argument("--atol", type=float, default=0.0, help="largest difference still called equal")
    parser.add_argument("--ignore", nargs="*", default=["time/"], help="tag prefixes to skip")
    parsed = parser.parse_args(args)
    before, after = read_scalars(parsed.before), read_scalars(parsed.after)
    if not before:
        parser.error(f"no scalars under {parsed.before}")
    problems = compare(before, after, parsed.atol, parsed.ignore)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(problems)} of {len(before.keys() | after.keys())} tags differ")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
