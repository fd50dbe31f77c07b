"""Start serving processes on this machine: free ports, readiness polling, and the controller + workers + front-end
supervisor that stops what it started, by PID, in reverse order (used by tests, the demo and the benchmarks).

    from llava.serve.launch import Supervisor
    with Supervisor(log_dir) as cluster:
        controller = cluster.start_controller()
        cluster.start_worker("ckpt/", "tiny", ["--device", "cpu"])
        cluster.wait_models(["tiny"])
        api = cluster.start_openai_server()
        ...                                             # every process is stopped when the block ends

Every wait fails early, with the tail of the process's log, when a process it depends on has exited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import requests

from llava.serve.client import CALL_ERRORS, ClusterClient, cluster_headers, shared_http

# Environment for server processes started here: no hub access, no analytics, unbuffered logs.
SERVE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "PYTHONUNBUFFERED": "1",
}
# A server that is not ready yet: our client's errors, and those of `requests` for checks written with it.
POLL_ERRORS = (*CALL_ERRORS, requests.RequestException, KeyError)


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """`preferred` when nothing listens there, else a port the OS picks as free on `host`."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"No free TCP port on {host}.")


class ServerProcess:
    """A server started as `<python> -m <module> <args>`, its output in `<log_dir>/<name>.log`."""

    def __init__(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        log_dir: str,
        env: dict | None = None,
        python: str = sys.executable,
        cwd: str | None = None,
    ):
        self.name = name
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "w")
        self.popen = subprocess.Popen(
            [python, "-m", module, *map(str, args)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVE_ENV, **(env or {})},
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def exit_report(self, what: str) -> str:
        return f"{self.name} exited (rc {self.popen.returncode}) while waiting for {what}:\n{self.log_tail()}"

    def kill(self, timeout: float = 50) -> None:
        """SIGKILL: the process dies without saying goodbye (as a crashed server would)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (so several processes shut down at once)."""
        if self.alive():
            self.popen.terminate()

    def stop(self, timeout: float = 50) -> None:
        """SIGTERM, then SIGKILL when it has not exited after `timeout` seconds; closes the log."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if not self._log.closed:
            self._log.close()


def wait_until(
    check: Callable[[], object],
    timeout: float,
    what: str,
    procs: Iterable[ServerProcess] = (),
    interval: float = 0.2,
):
    """Poll `check` until it returns something truthy (its result); `RuntimeError` with the log tail as soon as one
    of `procs` exits, `TimeoutError` with every log tail after `timeout` seconds. Errors a server that is still
    starting raises (connection refused, a half-written answer) count as "not yet"."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(proc.exit_report(what))
        try:
            result = check()
            if result:
                return result
        except POLL_ERRORS as err:
            last_error = err
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)
    raise TimeoutError(f"Timed out after {timeout:.0f} s waiting for {what} (last error: {last_error}).\n{logs}")


def url_answers(url: str, method: str = "GET", key: str | None = None, timeout: float = 10) -> bool:
    """True when `url` answers 200 (with the cluster key, when given), redirects followed."""
    response = shared_http().request(method, url, headers=cluster_headers(key), timeout=timeout, follow_redirects=True)
    return response.status_code == 200


def wait_http(
    url: str, timeout: float, procs: Iterable[ServerProcess] = (), method: str = "GET", key: str | None = None
) -> None:
    """Wait until `url` answers 200."""
    wait_until(lambda: url_answers(url, method, key), timeout, f"{url} to answer", procs)


def listed_models(controller: str, key: str | None = None, timeout: float = 10) -> list[str]:
    """The models `controller` lists (`Refused` on an error status, e.g. 401 for a wrong cluster key)."""
    return ClusterClient(controller, key, timeout).list_models()


def wait_models(
    controller: str, models: Iterable[str], timeout: float, procs: Iterable[ServerProcess] = (), key=None
) -> None:
    """Wait until the controller lists every model of `models` (their workers have registered)."""
    wanted = set(models)
    what = f"{', '.join(sorted(wanted))} to register with {controller}"
    wait_until(lambda: wanted <= set(listed_models(controller, key)), timeout, what, procs, interval=0.3)


class Supervisor:
    """The processes of one serving stack: a controller, model workers, an OpenAI API server and a web UI, each a
    `python -m llava.serve.<module>` child on `host`. `stop()` (or leaving the `with` block) stops them in reverse
    start order, each by its own PID. `timeout` bounds every readiness wait (seconds); `announce`, when given, is
    called with each command line (`$ python -m ...`) as its process starts."""

    def __init__(
        self,
        log_dir: str,
        host: str = "127.0.0.1",
        env: dict | None = None,
        python: str = sys.executable,
        cluster_key: str | None = None,
        timeout: float = 180.0,
        announce: Callable[[str], object] | None = None,
    ):
        self.log_dir, self.host, self.env, self.python = log_dir, host, dict(env or {}), python
        self.cluster_key, self.timeout, self.announce = cluster_key, timeout, announce
        self.procs: list[ServerProcess] = []
        self.controller: str | None = None

    def url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    def start(self, name: str, module: str, args: Sequence[str], env: dict | None = None) -> ServerProcess:
        """Start `python -m <module> <args>` (`llava.serve.` is prefixed to a bare module name)."""
        module = module if "." in module else f"llava.serve.{module}"
        proc = ServerProcess(name, module, args, self.log_dir, {**self.env, **(env or {})}, self.python)
        self.procs.append(proc)
        if self.announce:
            self.announce("$ " + " ".join(proc.popen.args))
        return proc

    def _key_args(self) -> list[str]:
        return ["--cluster-key", self.cluster_key] if self.cluster_key else []

    def start_controller(self, args: Sequence[str] = (), port: int | None = None, wait: bool = True) -> str:
        """Start the controller; its URL (also kept as `self.controller`), once it answers unless `wait` is False."""
        port = port or free_port(host=self.host)
        proc = self.start("controller", "controller", ["--host", self.host, "--port", port, *self._key_args(), *args])
        self.controller = self.url(port)
        if wait:
            wait_http(self.controller + "/health", self.timeout, [proc], key=self.cluster_key)
        return self.controller

    def start_worker(
        self, model_path: str, model_name: str | None = None, args: Sequence[str] = (), port: int | None = None
    ) -> tuple[str, ServerProcess]:
        """Start a model worker registering with this stack's controller; its URL and process (not waited for:
        see `wait_models`)."""
        port = port or free_port(host=self.host)
        url = self.url(port)
        argv = ["--host", self.host, "--port", port, "--worker", url, "--model-path", model_path, *self._key_args()]
        if self.controller:
            argv += ["--controller", self.controller]
        if model_name:
            argv += ["--model-name", model_name]
        name = f"worker-{model_name or os.path.basename(model_path.rstrip('/'))}-{port}"
        return url, self.start(name, "model_worker", [*argv, *args])

    def wait_models(self, models: Iterable[str], timeout: float | None = None) -> None:
        """Wait until the controller lists `models`; fails early when any process of the stack has exited."""
        wait_models(self.controller, models, timeout or self.timeout, self.procs, self.cluster_key)

    def _front(self, name: str, module: str, controller_flag: str, args: Sequence[str], port, health: str) -> str:
        port = port or free_port(host=self.host)
        argv = ["--host", self.host, "--port", port, controller_flag, self.controller, *self._key_args(), *args]
        proc = self.start(name, module, argv)
        url = self.url(port)
        wait_http(url + health, self.timeout, [proc])
        return url

    def start_openai_server(self, args: Sequence[str] = (), port: int | None = None) -> str:
        """Start the OpenAI-compatible API server; its URL (without /v1) once it answers."""
        return self._front("openai", "openai_api_server", "--controller", args, port, "/health")

    def start_web_server(self, args: Sequence[str] = (), port: int | None = None) -> str:
        """Start the Gradio web UI; its URL once the page answers."""
        return self._front("web", "gradio_web_server", "--controller-url", args, port, "/")

    def stop(self) -> None:
        """Stop every process in reverse start order (SIGTERM to all first, then wait for each)."""
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            proc.stop()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
