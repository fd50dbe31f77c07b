"""The thread policy (llava.runtime): passive OpenMP waits set before torch loads, overrides, export to children."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import json, os, sys
from llava.runtime import configure_threads
import torch
n = configure_threads(int(sys.argv[1]) if len(sys.argv) > 1 else None)
child = os.popen(sys.executable + " -c 'import torch; print(torch.get_num_threads())'").read().strip()
print(json.dumps({"threads": n, "torch": torch.get_num_threads(), "child": int(child),
                  "wait": os.environ.get("OMP_WAIT_POLICY"), "omp": os.environ.get("OMP_NUM_THREADS")}))
"""


def probe(*args: str, **env: str) -> dict:
    drop = ("OMP_NUM_THREADS", "LLAVA_THREADS", "OMP_WAIT_POLICY", "LLAVA_THREADS_AUTO", "LOCAL_WORLD_SIZE")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env={**base, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_uses_every_core_with_passive_waits_and_exports_it():
    cores = len(os.sched_getaffinity(0))
    got = probe()
    assert got == {"threads": cores, "torch": cores, "child": cores, "wait": "PASSIVE", "omp": str(cores)}


def test_overrides_flag_then_llava_threads_then_omp_num_threads():
    assert probe("1", LLAVA_THREADS="3", OMP_NUM_THREADS="2")["torch"] == 1  # --threads wins
    got = probe(LLAVA_THREADS="1", OMP_NUM_THREADS="2")
    assert got["torch"] == got["child"] == 1 and got["omp"] == "1"  # children inherit the choice
    got = probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert got["torch"] == 1 and got["wait"] == "ACTIVE"  # the user's wait policy is kept


def test_ranks_split_the_cores_unless_told():
    cores = len(os.sched_getaffinity(0))
    assert probe(LOCAL_WORLD_SIZE="2")["torch"] == max(1, cores // 2)
    # a parent's automatic choice is not an override: a rank decides again; a user's OMP_NUM_THREADS is kept
    assert probe(LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS=str(cores), LLAVA_THREADS_AUTO=str(cores))["torch"] == max(
        1, cores // 2
    )
    assert probe(LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="2")["torch"] == min(2, cores)


def test_bad_thread_counts_are_refused():
    from llava.runtime import configure_threads

    with pytest.raises(ValueError, match="--threads 0"):
        configure_threads(0)
    with pytest.raises(ValueError, match="LLAVA_THREADS='two'"):
        os.environ["LLAVA_THREADS"] = "two"
        try:
            configure_threads()
        finally:
            del os.environ["LLAVA_THREADS"]
