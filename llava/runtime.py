"""The thread policy every entry point applies: all cores for intra-op work, OpenMP threads that wait passively.

On a busy machine an OpenMP thread that spins while it waits for a sibling holds a core another process needs, and
a thread that lost its core stalls every parallel region: with two threads on two cores and one competing process,
a training step ran 9x slower. Passive waiting (`OMP_WAIT_POLICY=PASSIVE`; for GNU libgomp, what torch's CPU wheels
use, it also means no spinning) lets the job slow down in proportion to what it shares instead. OpenMP reads the
wait policy once, when torch loads it, so importing `llava` sets it (unless the environment already does) before
anything imports torch; `configure_threads` then sets the thread count and exports both for child processes
(torchrun ranks, demo stages, servers). docs/Performance.md ("Threads") has the measurements.

Overrides, strongest first: an explicit `threads` (the entry points' `--threads` flag), `LLAVA_THREADS`,
`OMP_NUM_THREADS`; `OMP_WAIT_POLICY` set in the environment is kept. Without one, the ranks of a distributed launch
(`LOCAL_WORLD_SIZE`, set by torchrun) split the cores between them.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

# Set too late when torch (and with it OpenMP) was loaded before llava: it then only reaches child processes.
_WAIT_POLICY_TOO_LATE = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Marks an OMP_NUM_THREADS that this policy exported (not one the user set), so child processes decide for themselves.
_AUTO = "LLAVA_THREADS_AUTO"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number of threads; set it to e.g. 2, or unset it.") from None
    if n < 1:
        raise ValueError(f"{name}={value!r}: the number of threads must be at least 1.")
    return n


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count by the policy above and export it for child processes; returns it."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: the number of threads must be at least 1.")
    inherited = _from_env("OMP_NUM_THREADS")
    if inherited is not None and os.environ.get(_AUTO) == str(inherited):
        inherited = None  # our own export from a parent process, not the user's choice: decide again here
    explicit = threads or _from_env("LLAVA_THREADS") or inherited
    # Ranks of a distributed launch on this machine (torchrun sets LOCAL_WORLD_SIZE) share its cores.
    ranks = max(1, _from_env("LOCAL_WORLD_SIZE") or 1)
    chosen = explicit or max(1, available_cores() // ranks)
    import torch

    torch.set_num_threads(chosen)
    os.environ["OMP_NUM_THREADS"] = str(chosen)
    if explicit:
        os.environ.pop(_AUTO, None)
    else:
        os.environ[_AUTO] = str(chosen)
    if _WAIT_POLICY_TOO_LATE:
        logger.info("torch was imported before llava: OpenMP threads spin while waiting (set OMP_WAIT_POLICY=PASSIVE).")
    return chosen


def add_threads_argument(parser) -> None:
    """Add the entry points' `--threads` flag to an argparse parser."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op CPU threads (default: LLAVA_THREADS, OMP_NUM_THREADS, else all cores, waiting passively)",
    )
