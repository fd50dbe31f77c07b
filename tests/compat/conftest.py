"""The original LLaVA release in its own virtual environment, run in subprocesses beside our code.

`orig` is a session fixture: it builds `.venv-orig` once (tests/compat/setup_original.sh, cached between runs by
its marker file) and returns an `Original` that runs Python code there. Tests hand data in and out as JSON or
files in a temp dir; the original's code never runs in this interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = os.path.join(ROOT, "tests", "compat", "setup_original.sh")
VENV = os.environ.get("LLAVA_ORIG_VENV", os.path.join(ROOT, ".venv-orig"))


class Original:
    """Runs code against the original LLaVA release (`import llava` there is the original package)."""

    def __init__(self, python: str, cwd: str):
        self.python = python
        self.cwd = cwd  # a directory outside our checkout, so `import llava` finds the original package

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        # Our checkout must not shadow the original package: run from a neutral directory, no PYTHONPATH.
        env.pop("PYTHONPATH", None)
        return env

    def run(self, code: str, *args: str, timeout: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run `code` (dedented) with the original's interpreter; raise with its stderr when it fails."""
        proc = subprocess.run(
            [self.python, "-c", textwrap.dedent(code), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=cwd or self.cwd,
        )
        if proc.returncode != 0:
            raise AssertionError(f"original LLaVA code failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc

    def json(self, code: str, *args: str, timeout: float = 600, cwd: str | None = None):
        """Run `code`, which must print one JSON document as its last stdout line, and return it parsed."""
        out = self.run(code, *args, timeout=timeout, cwd=cwd).stdout.strip().splitlines()
        return json.loads(out[-1])


@pytest.fixture(scope="session")
def orig(tmp_path_factory) -> Original:
    proc = subprocess.run(["bash", SETUP, VENV], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"could not build the original LLaVA environment ({SETUP}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    python = os.path.join(VENV, "bin", "python")
    neutral = tmp_path_factory.mktemp("orig-cwd")
    o = Original(python, str(neutral))
    # Sanity: the interpreter imports the ORIGINAL package, not ours.
    where = o.run("import llava, os; print(os.path.dirname(llava.__file__))", cwd=str(neutral)).stdout.strip()
    assert ".venv-orig" in where or VENV in where, f"`import llava` in the original venv resolved to {where}"
    return o


@pytest.fixture(scope="session")
def ours_python() -> str:
    return sys.executable
