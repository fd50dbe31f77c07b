#!/usr/bin/env bash
# Create a virtual environment and install llava with its extras.
#   bash scripts/setup.sh [extras]            .venv, at the exact versions in constraints.txt (what CI tests)
#   bash scripts/setup.sh --latest [extras]   .venv-latest, at the newest versions pyproject.toml allows
#   bash scripts/setup.sh --oldest [extras]   .venv-oldest, at the oldest versions it allows (constraints-oldest.txt)
# extras default to train,serve,quant,test. Set PYTHON to choose the interpreter (3.11+), VENV to choose the directory.
# A second run is quick when nothing changed; when pyproject.toml, constraints.txt or the extras changed, it re-syncs
# the environment (pip moves every pinned package to its pinned version) and checks it with `pip check`.
set -euo pipefail
cd "$(dirname "$0")/.."
latest=0
lock=constraints.txt
mode="locked"
venv="${VENV:-.venv}"
case "${1:-}" in
  --latest)
    latest=1
    mode="latest"
    venv="${VENV:-.venv-latest}"
    shift
    ;;
  --oldest)
    lock=constraints-oldest.txt
    mode="oldest"
    venv="${VENV:-.venv-oldest}"
    shift
    ;;
esac
extras="${1:-train,serve,quant,test}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($python --version)"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -U pip
fi

# What the last successful run installed: the mode, a hash of pyproject.toml and constraints.txt, and its extras.
# When the mode and hash are unchanged and the extras were installed then, there is nothing to do.
stamp_file="$venv/.llava-setup-stamp"
state="$mode $(cat pyproject.toml "$lock" | sha256sum | cut -c1-16)"
installed=""
if [ -f "$stamp_file" ] && [ "$(head -n1 "$stamp_file")" = "$state" ]; then
  installed="$(sed -n 2p "$stamp_file")"
fi
missing=""
for extra in ${extras//,/ }; do
  case ",$installed," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
done
# Installed versions are compared with the pins too (a fraction of a second), so a package changed by hand since the
# last run is put back rather than silently kept.
drift=$(LOCK="$lock" "$venv/bin/python" - <<'PY' 2>/dev/null || echo "unknown"
import os
from importlib import metadata
wrong = []
for line in open(os.environ["LOCK"]):
    line = line.strip()
    if line and not line.startswith("#"):
        name, version = line.split("==")
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a dependency of an extra not installed here, or of another platform
        if have.split("+")[0] != version:
            wrong.append(f"{name} {have} (pinned {version})")
import llava  # noqa: F401  (the package itself must import)
print("; ".join(wrong))
PY
)
if [ "$latest" = 0 ] && [ -z "$missing" ] && [ -z "$drift" ]; then
  echo "[setup] $venv is in sync with $lock (extras $extras)"
  exit 0
fi
[ "$latest" = 0 ] && [ -n "$drift" ] && [ -n "$installed" ] && echo "[setup] re-syncing $venv to $lock: $drift"
rm -f "$stamp_file"
[ -n "$installed" ] && extras="$installed,$extras"  # keep what the same versions already installed

pins=()
upgrade=()
if [ "$latest" = 0 ]; then
  pins=(-c "$lock")
else
  upgrade=(-U --upgrade-strategy eager)
fi
# Without a GPU, install the CPU-friendly torch first: an open range would pull the multi-GB CUDA build.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch from the package index"
    "$venv/bin/pip" install -q "${pins[@]}" "torch>=2.6,<2.14"
  elif [ "$mode" = oldest ]; then
    echo "[setup] no GPU: installing the oldest allowed torch, whose only build on the package index is the CUDA one (about 3 GB; it runs on the CPU)"
    "$venv/bin/pip" install -q "${pins[@]}" torch
  else
    echo "[setup] no GPU: installing torch==2.13.0"
    "$venv/bin/pip" install -q "${pins[@]}" "torch==2.13.0"
  fi
fi
echo "[setup] installing llava[$extras] into $venv ($mode versions)"
"$venv/bin/pip" install -q "${pins[@]}" "${upgrade[@]}" -e ".[$extras]"
"$venv/bin/pip" check
printf "%s\n%s\n" "$state" "$(echo "$extras" | tr , "\n" | sort -u | paste -sd,)" >"$stamp_file"
echo "[setup] done: $("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
