#!/usr/bin/env bash
# Create .venv and install llava with its extras. Usage: bash scripts/setup.sh [extras]   (default: train,serve,quant,test)
# Idempotent: a second run only checks what is there. Set PYTHON to choose the interpreter (3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,serve,quant,test}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
  .venv/bin/pip install -q -U pip
fi
# Without a GPU, install the pinned CPU-friendly torch first: an open range would pull the multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch from the package index"
    .venv/bin/pip install -q "torch>=2.4,<2.14"
  else
    echo "[setup] no GPU: installing torch==2.13.0"
    .venv/bin/pip install -q "torch==2.13.0"
  fi
fi
echo "[setup] installing llava[$extras]"
.venv/bin/pip install -q -e ".[$extras]"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
