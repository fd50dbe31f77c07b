#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU, as CI does. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train,serve,quant,test
# The web UI test drives a real headless Chromium from the distribution's packages.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the browser tests"
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "[test] chromium install failed; browser tests will be skipped"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
