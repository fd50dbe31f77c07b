"""Write constraints.txt: the exact versions, in this environment, of llava's dependencies with the given extras.

Run it in the environment the test suite just passed in (`bash scripts/setup.sh --latest`, then the tests, then this):

    .venv-latest/bin/python scripts/lock_constraints.py            # extras train,serve,quant,test
    .venv-latest/bin/python scripts/lock_constraints.py --extras train,test --output constraints.txt

Only the packages our requirements reach (recursively, markers evaluated here) are written, not whatever else the
environment holds. Local version labels are dropped (`torch==2.13.0` also matches `2.13.0+cpu` and CUDA builds).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """`{canonical name: installed version}` of every distribution `root[extras]` needs here."""
    found: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(root, extras)]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        if (canonical(name), frozenset(wanted)) in seen:
            continue
        seen.add((canonical(name), frozenset(wanted)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as err:
            raise SystemExit(
                f"{name} is required but not installed in {sys.prefix}; run scripts/setup.sh there first."
            ) from err
        if canonical(name) != canonical(root):
            found[canonical(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, set(req.extras)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="train,serve,quant,test")
    parser.add_argument("--output", default=os.path.join(REPO, "constraints.txt"))
    args = parser.parse_args(argv)
    extras = {e.strip() for e in args.extras.split(",") if e.strip()}
    pins = closure("llava", extras)
    version = sys.version_info
    lines = [
        "# Exact versions the test suite passed with (pip constraints: they pin, they do not add packages).",
        f"# Written by scripts/lock_constraints.py --extras {','.join(sorted(extras))} on Python "
        f"{version.major}.{version.minor}; used by scripts/setup.sh unless --latest is given.",
    ]
    lines += [f"{name}=={ver.split('+')[0]}" for name, ver in sorted(pins.items())]
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(pins)} pins to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
