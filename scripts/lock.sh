#!/usr/bin/env bash
# Refresh requirements/tested.txt, the exact versions CI installs, from pyproject.toml's ranges:
#   bash scripts/lock.sh            # the newest releases the ranges allow
# then run the suite on them (docs/testing.md) and commit the file with the result.
# pip-compile (pip-tools) resolves with pip itself, in a throwaway venv; DeepSpeed's setup imports torch,
# so torch is installed there first and nothing is built in isolation. torch stays out of the file:
# it is installed first, as the build for the machine (CPU or CUDA) requires.
set -euo pipefail
cd "$(dirname "$0")/.."
# the CPU build (PyTorch's CPU index, or a local wheel): a CUDA build would pin its nvidia-* packages too
TORCH=${TORCH:-torch==2.13.0+cpu}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet --upgrade pip pip-tools setuptools wheel "$TORCH"
echo "$TORCH" > "$tools/torch.txt"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh  (torch: $TORCH)" \
  "$tools/venv/bin/pip-compile" --quiet --upgrade --no-build-isolation --strip-extras --constraint "$tools/torch.txt" \
  --extra dev --extra deepspeed --extra math \
  --unsafe-package torch --unsafe-package pip --unsafe-package setuptools \
  --no-emit-index-url --no-emit-find-links \
  --output-file requirements/tested.txt pyproject.toml
echo "wrote requirements/tested.txt"
