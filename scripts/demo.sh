#!/usr/bin/env bash
# The embedded default: set up .venv if needed, then train a tiny LLaVA on a built-in synthetic dataset on CPU,
# evaluate it (trained vs blank images vs chance), save its loss curves, and serve it in the web UI.
# Usage: bash scripts/demo.sh [--no-serve] [--preset quick] [--port 7860] ...   (see docs/Demo.md)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import llava, gradio, fastapi" 2>/dev/null; then
  bash scripts/setup.sh train,serve
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m llava.demo "$@"
