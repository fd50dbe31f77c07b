"""Helpers for serving tests: start real server processes on free loopback ports, wait for them, always stop them."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every wait below is the time a step takes on a busy machine times this factor (the machine may be shared: a limit
# must be at least 5x the expected time). Waits that poll also fail early when a server process has died.
SLACK = 5

SERVE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server started as `python -m <module> <args>`, logging to a file."""

    def __init__(self, name: str, module: str, args: list[str], log_dir: str, env: dict | None = None):
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "w")
        full_env = {**os.environ, **SERVE_ENV, **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def kill(self) -> None:
        """SIGKILL: the process dies without saying goodbye (as a crashed worker would)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10 * SLACK)

    def stop(self) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(10 * SLACK)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10 * SLACK)
        self._log.close()


def wait_until(check: Callable[[], object], timeout: float, what: str, procs: list[Proc] = (), interval=0.2):
    """Poll `check` until it returns something truthy; fail with the servers' logs after `SLACK * timeout` seconds
    (at once if one of `procs` exits)."""
    timeout = SLACK * timeout
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited (rc {proc.popen.returncode}) while waiting for {what}:\n{proc.log_tail()}"
                )
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, ValueError, KeyError) as err:
            last_error = err
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)
    raise TimeoutError(f"Timed out after {timeout} s waiting for {what} (last error: {last_error}).\n{logs}")


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
