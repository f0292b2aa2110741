#!/usr/bin/env bash
# Install lightning-ppo and what its tests need into the active Python environment, at the exact versions
# CI tested (requirements/tested.txt):
#   python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh
# TORCH picks the torch build first (default the CPU build CI tests; on a GPU machine e.g.
# TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"), so that nothing pulls another.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-torch==2.13.0}
python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # TORCH may carry pip options
python -m pip install --quiet $TORCH
python -m pip install --quiet -c requirements/tested.txt -e ".[dev]"
# DeepSpeed's setup imports torch: no build isolation (it compiles nothing at install time)
python -m pip install --quiet --no-build-isolation -c requirements/tested.txt "deepspeed>=0.15"
python - <<'PY'
import deepspeed, lightning, torch, transformers
print(f"installed: torch {torch.__version__}, lightning {lightning.__version__}, "
      f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}")
PY
