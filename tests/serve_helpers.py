"""Helpers for serving tests: start real server processes on free loopback ports, wait for them, always stop them."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable

import requests

from llava.serve import launch
from llava.serve.launch import SERVE_ENV, ServerProcess, free_port

__all__ = ["REPO", "SERVE_ENV", "SLACK", "Proc", "controller_post", "free_port", "generate", "http_ok", "png_b64"]
__all__ += ["wait_until", "dumps"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every wait below is the time a step takes on a busy machine times this factor (the machine may be shared: a limit
# must be at least 5x the expected time). Waits that poll also fail early when a server process has died.
SLACK = 5


class Proc(ServerProcess):
    """A server started as `python -m <module> <args>` from the repository root, logging to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, module: str, args: list[str], log_dir: str, env: dict | None = None):
        super().__init__(name, module, args, log_dir, env, cwd=REPO)

    def kill(self) -> None:
        super().kill(10 * SLACK)

    def stop(self) -> None:
        super().stop(10 * SLACK)


def wait_until(check: Callable[[], object], timeout: float, what: str, procs: list[Proc] = (), interval=0.2):
    """`llava.serve.launch.wait_until` with `SLACK * timeout` seconds (fails at once if one of `procs` exits)."""
    return launch.wait_until(check, SLACK * timeout, what, procs, interval)


def http_ok(url: str, method: str = "GET") -> bool:
    return requests.request(method, url, timeout=2 * SLACK).status_code == 200


def png_b64(size=(40, 30), color=(10, 100, 200)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def generate(url: str, payload: dict | str | bytes, timeout: float = 120) -> tuple[int, list[dict]]:
    """POST to a /worker_generate_stream URL; the HTTP status and every parsed chunk."""
    from llava.serve.protocol import iter_chunks

    kwargs = {"data": payload} if isinstance(payload, (str, bytes)) else {"json": payload}
    response = requests.post(url, stream=True, timeout=(10 * SLACK, SLACK * timeout), **kwargs)
    with response:
        chunks = list(iter_chunks(response.iter_content(chunk_size=None)))
    return response.status_code, chunks


def controller_post(controller: str, path: str, body: dict | None = None) -> dict:
    response = requests.post(controller + path, json=body or {}, timeout=10 * SLACK)
    response.raise_for_status()
    return response.json()


def dumps(obj) -> str:
    return json.dumps(obj)
