"""The controller: keeps the list of live model workers (registration + heartbeats) and picks one per request.

    LLAVA_CLUSTER_KEY=<secret> python -m llava.serve.controller --host 0.0.0.0 --port 10000 \
        [--dispatch-method shortest_queue|lottery]

With a cluster key (--cluster-key or LLAVA_CLUSTER_KEY) every endpoint answers 401 without the header
X-LLaVA-Cluster-Key, and the controller sends it to workers; without one it should listen on loopback only.

Endpoints (POST, JSON): /register_worker, /receive_heart_beat, /refresh_all_workers, /list_models,
/get_worker_address (optional `exclude`: worker addresses not to pick, e.g. those a client found full),
/worker_get_status, and /worker_generate_stream, which forwards a generation request to a
worker of its `model` and streams the answer back. A worker that misses heartbeats for --heart-beat-expiration
seconds is dropped. A client that cannot reach a worker posts `{"worker_name"}` to /report_unreachable: the worker
gets no new requests until a status probe (/worker_get_status, retried with back-off) answers again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Iterable

from llava.constants import CONTROLLER_HEART_BEAT_EXPIRATION
from llava.serve.client import CALL_ERRORS, AsyncClusterClient, ClusterClient, async_http, cluster_key_from
from llava.serve.protocol import ErrorCode, ServeError, encode_chunk
from llava.serve.server_utils import (
    BadJSON,
    BodyLimitMiddleware,
    ClusterKeyMiddleware,
    add_cluster_args,
    add_server_args,
    loads_json,
    read_json_object,
    require,
    run_server,
    setup_logging,
    warn_if_exposed,
)

require("fastapi", "uvicorn", "httpx")

import httpx  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

logger = logging.getLogger("llava.serve.controller")

DISPATCH_METHODS = ("lottery", "shortest_queue")
PROBE_TICK_S = 0.25  # how often reported workers are considered for a probe
PROBE_FIRST_S = 0.5  # first status probe of a reported worker; then doubling up to PROBE_MAX_S
PROBE_MAX_S = 8.0


@dataclasses.dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float


class Controller:
    """The registry of workers. Thread-safe: every method takes the lock."""

    def __init__(
        self,
        dispatch_method: str = "shortest_queue",
        heart_beat_expiration: float = 30.0,
        cluster_key: str | None = None,
    ):
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"Unknown dispatch method `{dispatch_method}`; use one of {', '.join(DISPATCH_METHODS)}.")
        self.dispatch_method = dispatch_method
        self.heart_beat_expiration = heart_beat_expiration
        self.cluster_key = cluster_key  # sent to workers; also required from every caller (see build_app)
        self.client = ClusterClient(None, cluster_key, timeout=5)
        self.workers: dict[str, WorkerInfo] = {}
        # workers a client reported unreachable: not routed to until a status probe answers (name -> next probe)
        self.suspects: dict[str, tuple[float, float]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()

    # -- registry ----------------------------------------------------------------------------------------------
    def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> bool:
        if worker_status is None:
            worker_status = self.get_worker_status(worker_name)
            if worker_status is None:
                return False
        status = _valid_status(worker_status)
        with self._lock:
            self.workers[worker_name] = WorkerInfo(
                model_names=status["model_names"],
                speed=status["speed"],
                queue_length=status["queue_length"],
                check_heart_beat=check_heart_beat,
                last_heart_beat=time.monotonic(),
            )
        logger.info("Registered worker %s serving %s", worker_name, status["model_names"])
        return True

    def get_worker_status(self, worker_name: str) -> dict | None:
        try:
            return _valid_status(self.client.worker_status(worker_name.rstrip("/")))
        except (*CALL_ERRORS, ServeError) as err:
            logger.warning("Cannot get the status of worker %s: %s", worker_name, err)
            return None

    def remove_worker(self, worker_name: str) -> None:
        with self._lock:
            self.suspects.pop(worker_name, None)
            if self.workers.pop(worker_name, None) is not None:
                logger.info("Removed worker %s", worker_name)

    def report_unreachable(self, worker_name: str) -> bool:
        """Stop routing to `worker_name` at once; it is re-admitted when a status probe answers again (or dropped
        when its heartbeats expire). False when the worker is not registered."""
        with self._lock:
            if worker_name not in self.workers:
                return False
            if worker_name not in self.suspects:
                logger.warning("Worker %s was reported unreachable; not routing to it until it answers", worker_name)
                self.suspects[worker_name] = (time.monotonic() + PROBE_FIRST_S, PROBE_FIRST_S)
            return True

    def probe_suspects(self) -> None:
        """Probe each reported worker whose turn has come: re-admit it when it answers, else back off."""
        now = time.monotonic()
        with self._lock:
            due = [(name, wait) for name, (at, wait) in self.suspects.items() if at <= now]
        for name, wait in due:
            status = self.get_worker_status(name)
            with self._lock:
                info = self.workers.get(name)
                if info is None or name not in self.suspects:
                    continue
                if status is None:
                    wait = min(wait * 2, PROBE_MAX_S)
                    self.suspects[name] = (time.monotonic() + wait, wait)
                    continue
                del self.suspects[name]
                info.model_names, info.speed = status["model_names"], status["speed"]
                info.queue_length = status["queue_length"]
            logger.info("Worker %s answers again; routing to it", name)

    def refresh_all_workers(self) -> None:
        with self._lock:
            names = list(self.workers)
        for name in names:
            status = self.get_worker_status(name)
            with self._lock:
                info = self.workers.get(name)
                if info is None:
                    continue
                if status is None:
                    self.remove_worker(name)
                else:
                    self.suspects.pop(name, None)
                    info.model_names, info.speed = status["model_names"], status["speed"]
                    info.queue_length = status["queue_length"]

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        with self._lock:
            info = self.workers.get(worker_name)
            if info is None:
                return False
            info.queue_length = queue_length
            info.last_heart_beat = time.monotonic()
            return True

    def _alive(self, info: WorkerInfo, now: float) -> bool:
        return not info.check_heart_beat or now - info.last_heart_beat <= self.heart_beat_expiration

    def remove_stale_workers(self) -> None:
        now = time.monotonic()
        with self._lock:
            for name in [n for n, info in self.workers.items() if not self._alive(info, now)]:
                logger.info("Worker %s missed its heartbeats for %.0f s", name, self.heart_beat_expiration)
                self.remove_worker(name)

    def live_workers(self, model: str | None = None) -> dict[str, WorkerInfo]:
        now = time.monotonic()
        with self._lock:
            return {
                name: info
                for name, info in self.workers.items()
                if self._alive(info, now) and name not in self.suspects and (model is None or model in info.model_names)
            }

    # -- queries -----------------------------------------------------------------------------------------------
    def list_models(self) -> list[str]:
        return sorted({m for info in self.live_workers().values() for m in info.model_names})

    def get_worker_address(self, model: str, exclude: Iterable[str] = ()) -> str:
        """A worker serving `model`, chosen by the dispatch method among those not in `exclude` (addresses a client
        already found full; a trailing "/" does not matter); "" when none is left."""
        skip = {address.rstrip("/") for address in exclude}
        with self._lock:
            candidates = {n: info for n, info in self.live_workers(model).items() if n.rstrip("/") not in skip}
            if not candidates:
                return ""
            names = list(candidates)
            if self.dispatch_method == "lottery":
                weights = [max(candidates[n].speed, 1e-6) for n in names]
                return random.choices(names, weights=weights)[0]
            # shortest_queue: fewest queued requests per unit of speed; count the request we are sending now, so
            # a burst arriving between two heartbeats spreads over the workers
            best = min(names, key=lambda n: (candidates[n].queue_length / max(candidates[n].speed, 1e-6), n))
            candidates[best].queue_length += 1
            return best

    def worker_api_get_status(self) -> dict:
        workers = self.live_workers()
        return {
            "model_names": sorted({m for info in workers.values() for m in info.model_names}),
            "speed": sum(info.speed for info in workers.values()),
            "queue_length": sum(info.queue_length for info in workers.values()),
            "workers": len(workers),
        }

    # -- expiry thread -----------------------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._expire_loop, name="llava-heart-beat-expiry", daemon=True).start()
        threading.Thread(target=self._probe_loop, name="llava-probe-suspects", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _expire_loop(self) -> None:
        while not self._stop.wait(max(0.2, self.heart_beat_expiration / 3)):
            self.remove_stale_workers()

    def _probe_loop(self) -> None:
        while not self._stop.wait(PROBE_TICK_S):
            self.probe_suspects()


def _valid_status(status) -> dict:
    if not isinstance(status, dict):
        raise ServeError("`worker_status` must be an object with model_names, speed and queue_length.")
    names = status.get("model_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ServeError(f"`worker_status.model_names` must be a non-empty list of names, got `{names!r}`.")
    speed, queue = status.get("speed", 1), status.get("queue_length", 0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or speed <= 0:
        raise ServeError(f"`worker_status.speed` must be a positive number, got `{speed!r}`.")
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        raise ServeError(f"`worker_status.queue_length` must be a non-negative integer, got `{queue!r}`.")
    return {"model_names": names, "speed": float(speed), "queue_length": queue}


def _no_worker_message(model, available: list[str], excluded: int = 0) -> str:
    if excluded:
        return f"Every live worker serving model `{model}` ({excluded}) is in `exclude`: none is left to try."
    return (
        f"No worker is serving model `{model}` right now (it may have stopped or be restarting). "
        f"Models available: {', '.join(available) or 'none'}."
    )


def _exclude_field(body: dict) -> list[str]:
    """The optional `exclude` of /get_worker_address (our extension; original clients never send it)."""
    exclude = body.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(address, str) for address in exclude):
        raise ServeError(f"`exclude` must be a list of worker addresses (strings), got `{exclude!r:.60}`.")
    return exclude


def build_app(controller: Controller, max_request_bytes: int = 1 << 20):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        controller.start()
        app.state.relay = AsyncClusterClient(None, controller.cluster_key, async_http())  # open connections are
        yield  # bounded by the workers' queues
        await app.state.relay.aclose()
        controller.stop()

    app = FastAPI(title="LLaVA controller", lifespan=lifespan)

    def reject(err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def body_of(request: Request) -> dict:
        try:
            return await read_json_object(request)
        except BadJSON as err:
            raise ServeError(str(err)) from err

    def field(body: dict, name: str, kind=str):
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ServeError(f"`{name}` is required and must be a {kind.__name__}, got `{value!r:.60}`.")
        return value

    @app.exception_handler(ServeError)
    async def serve_error(request, err: ServeError):
        return reject(err)

    @app.post("/register_worker")
    async def register_worker(request: Request):
        body = await body_of(request)
        name = field(body, "worker_name")
        ok = await run_in_threadpool(
            controller.register_worker, name, bool(body.get("check_heart_beat", True)), body.get("worker_status")
        )
        if not ok:
            raise ServeError(f"Could not get the status of worker `{name}`; is it running?", ErrorCode.SERVER_ERROR)
        return {"ok": True}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers():
        await run_in_threadpool(controller.refresh_all_workers)
        return {"ok": True}

    @app.post("/list_models")
    async def list_models():
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request):
        body = await body_of(request)
        model, exclude = field(body, "model"), _exclude_field(body)
        address = controller.get_worker_address(model, exclude)
        if not address:
            excluded = len(controller.live_workers(model)) if exclude else 0
            return {"address": "", "error": _no_worker_message(model, controller.list_models(), excluded)}
        return {"address": address}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        body = await body_of(request)
        queue = body.get("queue_length", 0)
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
            raise ServeError(f"`queue_length` must be a non-negative integer, got `{queue!r:.60}`.")
        return {"exist": controller.receive_heart_beat(field(body, "worker_name"), queue)}

    @app.post("/report_unreachable")
    async def report_unreachable(request: Request):
        """A client could not reach `worker_name`: stop routing to it until a status probe answers."""
        return {"known": controller.report_unreachable(field(await body_of(request), "worker_name"))}

    @app.post("/worker_get_status")
    async def worker_get_status():
        return controller.worker_api_get_status()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        raw = await request.body()
        try:
            body = loads_json(raw)
            model = body.get("model") if isinstance(body, dict) else None
        except BadJSON as err:
            raise ServeError(str(err)) from err
        if not isinstance(model, str):
            raise ServeError("The request must be a JSON object with a `model` name.")
        address = controller.get_worker_address(model)
        if not address:  # answer with the error and stop here
            chunk = encode_chunk(_no_worker_message(model, controller.list_models()), ErrorCode.SERVER_ERROR)
            return StreamingResponse(iter([chunk]), status_code=503, media_type="application/octet-stream")
        relay: AsyncClusterClient = request.app.state.relay
        try:  # the client's bytes go to the worker as they came, and the worker's bytes come back as they come
            upstream = await relay.open_stream(address, raw=raw)
        except httpx.HTTPError as err:
            controller.report_unreachable(address)
            message = f"The worker {address} for `{model}` is unreachable ({type(err).__name__}); try again."
            chunk = encode_chunk(message, ErrorCode.SERVER_ERROR)
            return StreamingResponse(iter([chunk]), status_code=503, media_type="application/octet-stream")

        async def relay():
            try:
                async for piece in upstream.aiter_raw():
                    yield piece
            except httpx.HTTPError as err:
                yield encode_chunk(f"The worker {address} stopped mid-answer ({type(err).__name__}).", 2)
            finally:
                await upstream.aclose()

        return StreamingResponse(
            relay(), status_code=upstream.status_code, media_type=upstream.headers.get("content-type")
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(controller.live_workers())}

    def error_body(message):
        return {"text": message, "error_code": 1}

    return ClusterKeyMiddleware(
        BodyLimitMiddleware(app, max_request_bytes, error_body), controller.cluster_key, error_body
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(parser, port=21001)
    add_cluster_args(parser)
    parser.add_argument("--dispatch-method", choices=DISPATCH_METHODS, default="shortest_queue")
    parser.add_argument(
        "--heart-beat-expiration",
        type=float,
        default=CONTROLLER_HEART_BEAT_EXPIRATION,
        help="Seconds without a heartbeat after which a worker is dropped.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging("llava.serve.controller")
    key = cluster_key_from(args.cluster_key)
    controller = Controller(args.dispatch_method, args.heart_beat_expiration, key)
    warn_if_exposed(logger, "controller", args.host, key)
    logger.info("Controller on %s:%d (dispatch: %s)", args.host, args.port, args.dispatch_method)
    run_server(build_app(controller, args.max_request_bytes), args.host, args.port)


if __name__ == "__main__":
    main()
