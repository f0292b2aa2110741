"""Measurements that back the README's figures; run each as `python -m benchmarks.<name>`."""
