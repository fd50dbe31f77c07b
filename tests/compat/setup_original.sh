#!/usr/bin/env bash
# Build (once) the virtual environment that runs the ORIGINAL LLaVA release beside ours, for tests/compat/.
# The original is haotian-liu/LLaVA as released on the package index (llava-torch 1.2.2.post1), at the pins of
# its last commit (transformers 4.37.2, tokenizers 0.15.1, peft 0.10.0, accelerate 0.21.0, sentencepiece 0.1.99).
# torch 2.1.x has no CPU wheel for Python 3.11 on the index, so the same CPU torch as ours (2.13.0) is used.
# Usage: bash tests/compat/setup_original.sh [VENV_DIR]   (default: .venv-orig in the repository root)
# Idempotent: a finished environment is marked with VENV_DIR/.llava-orig-ready and reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-${LLAVA_ORIG_VENV:-.venv-orig}}"
python="${PYTHON:-python3}"
marker="$venv/.llava-orig-ready"
pins="llava-torch==1.2.2.post1 transformers==4.37.2 tokenizers==0.15.1 accelerate==0.21.0 sentencepiece==0.1.99 peft==0.10.0"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$pins" ]; then
  exit 0
fi
echo "[compat] building $venv with the original LLaVA release ($pins); about 1-2 minutes the first time"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q -U pip
"$venv/bin/pip" install -q "torch==2.13.0"
# --no-deps for the release itself: its own metadata pins torch 2.0.1 / CUDA-era wheels that do not exist for
# this Python on CPU. Everything its modules import on our test paths is installed explicitly below.
"$venv/bin/pip" install -q --no-deps "llava-torch==1.2.2.post1"
"$venv/bin/pip" install -q transformers==4.37.2 tokenizers==0.15.1 accelerate==0.21.0 sentencepiece==0.1.99 \
  peft==0.10.0 "numpy<2" safetensors protobuf shortuuid einops==0.6.1 einops-exts==0.0.4 requests fastapi uvicorn \
  "httpx<0.28" pillow scikit-learn markdown2 pandas
"$venv/bin/python" -c "import llava, transformers, peft; print('[compat] original llava ready: transformers', transformers.__version__, 'peft', peft.__version__)"
echo "$pins" > "$marker"
