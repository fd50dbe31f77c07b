"""Installs: pyproject's split matches the original's; constraints.txt pins what pyproject allows and is what .venv holds;
constraints-oldest.txt pins the bottom of every range."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

import llava

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def pins(lock: str = "constraints.txt") -> dict[str, str]:
    out = {}
    with open(os.path.join(REPO, lock)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, version = line.split("==")
                out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_base_install_serves_and_train_adds_deepspeed_and_wandb():
    base = {Requirement(r).name.lower() for r in project()["dependencies"]}
    # `pip install -e .` must run the CLI, worker, web UI and API server, as the original's base install did.
    assert {"fastapi", "uvicorn", "gradio", "requests", "httpx", "peft", "bitsandbytes", "openai"} <= base
    assert {Requirement(r).name for r in project()["optional-dependencies"]["train"]} == {"deepspeed", "wandb"}
    assert {"serve", "quant"} <= project()["optional-dependencies"].keys()  # old commands keep working
    version = Version(project()["version"])
    assert version >= Version("1.2") and str(version) == llava.__version__ == metadata.version("llava")


def requirements(*extras: str) -> list[tuple[str, Requirement]]:
    """(canonical name, requirement) of the base dependencies and the given extras."""
    reqs = [Requirement(r) for r in project()["dependencies"]]
    reqs += [Requirement(r) for k in extras for r in project()["optional-dependencies"][k]]
    return [(re.sub(r"[-_.]+", "-", req.name).lower(), req) for req in reqs]


def test_constraints_pin_every_requirement_within_pyproject_bounds():
    locked = pins()
    for name, req in requirements("train", "test"):
        assert name in locked, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(locked[name], prereleases=True), (str(req), locked[name])


def test_oldest_constraints_pin_the_bottom_of_every_range():
    oldest, locked = pins("constraints-oldest.txt"), pins()
    for name, req in requirements("train", "test", "bench"):
        assert name in oldest, f"constraints-oldest.txt has no pin for {req.name}"
        assert req.specifier.contains(oldest[name], prereleases=True), (str(req), oldest[name])
        assert Version(oldest[name]) <= Version(locked.get(name, oldest[name])), (name, oldest[name], locked.get(name))
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        # At the floor itself, or above it only where a dependency demands more (gradio 6.31 wants fastapi 0.133).
        if floors and Version(oldest[name]) != floors[0]:
            assert name in {"fastapi", "tokenizers", "uvicorn", "httpx", "requests", "openai"}, (name, oldest[name])
    torch_floor = next(s.version for s in Requirement(project()["dependencies"][0]).specifier if s.operator == ">=")
    # transformers 5.25 builds no model on torch < 2.6, so the floor is 2.6 (pyproject.toml's comment).
    assert Version(oldest["torch"]) == Version(torch_floor) == Version("2.6")


@pytest.mark.skipif(
    os.path.basename(os.path.realpath(sys.prefix)) not in (".venv", ".venv-oldest")
    or os.path.dirname(os.path.realpath(sys.prefix)) != os.path.realpath(REPO),
    reason="checks the locked .venv and .venv-oldest only (scripts/test.sh --latest runs in .venv-latest)",
)
def test_locked_environment_has_the_pinned_versions():
    lock = "constraints-oldest.txt" if sys.prefix.rstrip("/").endswith("-oldest") else "constraints.txt"
    wrong = {}
    for name, version in pins(lock).items():
        try:
            have = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue  # a platform-specific dependency this machine does not need
        if have != version:
            wrong[name] = (have, version)
    assert not wrong, f"installed vs {lock}: {wrong}; run `bash scripts/setup.sh` to re-sync"


def test_lock_script_writes_the_closure(tmp_path):
    out = tmp_path / "c.txt"
    subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "lock_constraints.py"), "--extras", "train", "--output", out],
        check=True,
        capture_output=True,
        timeout=300,
    )
    lines = [ln for ln in out.read_text().splitlines() if ln and not ln.startswith("#")]
    names = {ln.split("==")[0] for ln in lines}
    assert {"torch", "transformers", "deepspeed", "gradio"} <= names and "pytest" not in names
    assert all("+" not in ln for ln in lines)  # local labels (2.13.0+cpu) dropped: the pin matches any build
