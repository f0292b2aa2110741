"""Measurements behind docs/performance.md and docs/estimators.md; run as `python -m benchmarks.<name>`."""
