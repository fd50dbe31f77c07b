"""Stop a training rank when the launcher that started it (torchrun, deepspeed) dies, so no rank trains orphaned."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger("llava.train")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAUNCHER_POLL_SECONDS = 1.0
# After SIGTERM a rank whose handlers keep it alive is ended outright after this long.
LAUNCHER_GRACE_SECONDS = 30.0


def launched_by_launcher() -> bool:
    """Whether this process is a rank started by torchrun / torch.distributed.run or the deepspeed launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def stop_with_launcher() -> None:
    """Make this rank end when the launcher that started it dies (kill -9 of torchrun would otherwise leave the
    ranks training as orphans: PyTorch starts them in their own sessions, so no terminal signal reaches them).

    Linux: the kernel sends SIGTERM at the parent's death (`prctl(PR_SET_PDEATHSIG)`). Everywhere: a daemon thread
    checks once a second whether the parent changed, and then sends SIGTERM to this process (and ends it after
    `LAUNCHER_GRACE_SECONDS` if that did not). Does nothing unless started by a launcher."""
    if not launched_by_launcher():
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        # The signal comes when the thread that started this process exits: torchrun and the deepspeed launcher
        # start their ranks from their main thread, so that is when the launcher dies.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the launcher only.", ctypes.get_errno())
    if parent == 1 or not _alive(parent):  # the launcher died before the watch was set
        _launcher_gone(parent)
    threading.Thread(target=_watch_parent, args=(parent,), name="llava-launcher-watch", daemon=True).start()
    logger.info("Rank pid %d stops when its launcher (pid %d) dies.", os.getpid(), parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(LAUNCHER_POLL_SECONDS)
    _launcher_gone(parent)


def _launcher_gone(parent: int) -> None:
    logger.error("The launcher (pid %d) is gone; this rank (pid %d) stops.", parent, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(LAUNCHER_GRACE_SECONDS)
    os._exit(1)
