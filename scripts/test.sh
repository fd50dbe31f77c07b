#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU, as CI does. Extra arguments go to pytest.
#   bash scripts/test.sh            the locked versions (constraints.txt) in .venv: what CI runs
#   bash scripts/test.sh --latest   the newest versions pyproject.toml allows, in .venv-latest
#   bash scripts/test.sh --oldest   the oldest versions it allows (constraints-oldest.txt), in .venv-oldest
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
if [ "${1:-}" = "--latest" ] || [ "${1:-}" = "--oldest" ]; then
  mode="${1#--}"
  shift
  bash scripts/setup.sh "--$mode" train,serve,quant,test,bench
  venv=".venv-$mode"
else
  bash scripts/setup.sh train,serve,quant,test,bench
fi
# The web UI test drives a real headless Chromium from the distribution's packages.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the browser tests"
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "[test] chromium install failed; browser tests will be skipped"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" -m pytest -q -ra --durations=15 "$@"
