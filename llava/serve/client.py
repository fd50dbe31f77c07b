"""The one client of the controller/worker protocol, sync and async: cluster key, timeouts, pooled connections.

    client = ClusterClient("http://localhost:21001", key)          # sync: web UI, worker, test_message, controller
    client.list_models(refresh=True)                                # ["llava-v1.5-7b", ...]
    address = client.get_worker_address("llava-v1.5-7b")            # NoWorker (with the controller's reason) if none
    client.get_worker_address("llava-v1.5-7b", exclude={address})   # another worker (e.g. the first was full)
    client.model_details(address)                                   # None for a worker without /model_details
    for chunk in client.generate_stream(address, payload): ...      # `Chunk` dicts; a rejection is one error chunk
    client.register(worker_url, status); client.heartbeat(worker_url, queue_length) -> known?

    aclient = AsyncClusterClient(controller, key)                   # async: API server, controller relay
    await aclient.get_worker_address(model); await aclient.open_stream(address, payload)  # + aclose()

Every process keeps ONE pooled `httpx.Client` for the sync calls (`shared_http()`, keep-alive connections reused
across calls and threads) and each async server one `httpx.AsyncClient` (created in its lifespan). `address` is a
worker's or a controller's base URL. Failures raise `httpx.HTTPError` (unreachable, timeout, an error status) or
`ValueError` (an answer that is not the expected JSON): `CALL_ERRORS` holds both. Nothing here retries.
The module-level helpers (`post_json`, `stream_worker`, `apost_json`, `astream_open`, `astream_worker`) take full URLs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator

import httpx

from llava.serve.protocol import Chunk, aiter_chunks, iter_chunks, rejection_chunk

logger = logging.getLogger("llava.serve.client")

CLUSTER_KEY_HEADER = "X-LLaVA-Cluster-Key"
CLUSTER_KEY_ENV = "LLAVA_CLUSTER_KEY"
CONTROL_TIMEOUT = 10.0  # seconds for a control call (list, address, details, register, heartbeat)
STREAM_TIMEOUT = httpx.Timeout(10.0, read=300.0)  # connect/write 10 s; up to 300 s between two chunks
# No cap on open connections (the workers' queues bound the load and answer 503 when full); idle ones are kept.
POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=30)
ASYNC_TIMEOUT = httpx.Timeout(CONTROL_TIMEOUT, read=None, pool=None)
CALL_ERRORS = (httpx.HTTPError, ValueError)


def cluster_key_from(flag: str | None) -> str | None:
    """The cluster key: the `--cluster-key` value when given, else `$LLAVA_CLUSTER_KEY`, else None (no key)."""
    key = flag if flag is not None else os.environ.get(CLUSTER_KEY_ENV)
    key = (key or "").strip()
    return key or None


def cluster_headers(key: str | None) -> dict[str, str]:
    """The header that carries `key` to a controller or worker; empty when there is no key."""
    return {CLUSTER_KEY_HEADER: key} if key else {}


_shared: tuple[int, httpx.Client] | None = None
_shared_lock = threading.Lock()


def shared_http() -> httpx.Client:
    """This process's pooled sync client (thread-safe; a forked child makes its own)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), httpx.Client(timeout=CONTROL_TIMEOUT, limits=POOL_LIMITS))
        return _shared[1]


def async_http(limits: httpx.Limits = POOL_LIMITS) -> httpx.AsyncClient:
    """A pooled async client for one server process (create it in the app's lifespan, close it at shutdown): 10 s
    to connect, no read limit (answers stream as long as they take), a request waits for a free connection."""
    return httpx.AsyncClient(timeout=ASYNC_TIMEOUT, limits=limits)


class NoWorker(LookupError):
    """The controller has no live worker for the model; `message` is its reason (lists the models it has)."""

    def __init__(self, model: str, message: str | None):
        self.model = model
        self.message = message or f"No worker is serving model `{model}` right now."
        super().__init__(self.message)


class Refused(ValueError):
    """The controller or worker answered a control call with an error status (401: the cluster key)."""

    def __init__(self, url: str, status: int, text: str):
        hint = "; set the same --cluster-key" if status == 401 else ""
        super().__init__(f"{url} answered {status}{hint}: {text[:200]}")
        self.status = status


def _address_query(model: str, exclude: Iterable[str]) -> dict:
    """The /get_worker_address body; `exclude` (our extension) only when there is something to exclude, so the
    request stays the original protocol's otherwise."""
    exclude = sorted(set(exclude))
    return {"model": model, "exclude": exclude} if exclude else {"model": model}


def _json_object(response: httpx.Response) -> dict:
    data = response.json()
    if not isinstance(data, dict):
        raise ValueError(f"{response.request.url} answered {type(data).__name__}, not a JSON object.")
    return data


def post_json(url: str, body: dict | None = None, key: str | None = None, timeout=CONTROL_TIMEOUT) -> httpx.Response:
    """POST `body` as JSON with the cluster key on the shared client; the response as it came (check its status)."""
    return shared_http().post(url, json=body or {}, headers=cluster_headers(key), timeout=timeout)


def stream_worker(url: str, body: dict, key: str | None = None, timeout=STREAM_TIMEOUT) -> Iterator[Chunk]:
    """POST a generation request to a `.../worker_generate_stream` URL and yield its parsed chunks; a request
    refused before streaming (4xx/5xx) is yielded as its one error chunk (a 401 names the cluster key).
    `timeout`: an `httpx.Timeout`, seconds, or a (connect, read) pair."""
    if isinstance(timeout, tuple):
        timeout = httpx.Timeout(timeout[0], read=timeout[1])
    with shared_http().stream("POST", url, json=body, headers=cluster_headers(key), timeout=timeout) as response:
        if response.status_code != 200:
            yield rejection_chunk(response.status_code, response.read(), f"--cluster-key or {CLUSTER_KEY_ENV}")
            return
        yield from iter_chunks(response.iter_raw())


class ClusterClient:
    """Sync calls to a controller (`controller`, may be None for worker-only use) and its workers."""

    def __init__(self, controller: str | None = None, key: str | None = None, timeout: float = CONTROL_TIMEOUT):
        self.controller = controller.rstrip("/") if controller else None
        self.key, self.timeout = key, timeout

    def post(self, url: str, body: dict | None = None, timeout: float | None = None) -> dict:
        """POST a control call; its JSON object. `Refused` on an error status."""
        response = post_json(url, body, self.key, timeout or self.timeout)
        if response.status_code != 200:
            raise Refused(url, response.status_code, response.text)
        return _json_object(response)

    def _controller(self, path: str, body: dict | None = None, answer: bool = True) -> dict:
        """A controller call; its JSON object (`answer` False: only the status is checked, as the original
        controller answers `null` to /register_worker and /refresh_all_workers)."""
        if not self.controller:
            raise ValueError("This client has no controller address.")
        if answer:
            return self.post(self.controller + path, body)
        response = post_json(self.controller + path, body, self.key, self.timeout)
        if response.status_code != 200:
            raise Refused(self.controller + path, response.status_code, response.text)
        return {}

    def list_models(self, refresh: bool = False) -> list[str]:
        """The models the controller serves (`refresh`: it re-asks every worker first)."""
        if refresh:
            self._controller("/refresh_all_workers", answer=False)
        return list(self._controller("/list_models").get("models", []))

    def get_worker_address(self, model: str, exclude: Iterable[str] = ()) -> str:
        """A worker for `model` as the controller dispatches, none of `exclude` (e.g. workers found full); `NoWorker`
        with its reason when there is none."""
        data = self._controller("/get_worker_address", _address_query(model, exclude))
        if not data.get("address"):
            raise NoWorker(model, data.get("error"))
        return data["address"].rstrip("/")

    def report_unreachable(self, address: str) -> None:
        """Tell the controller `address` did not answer (it stops routing there until a probe succeeds); a failure
        to tell it is only logged."""
        try:
            self._controller("/report_unreachable", {"worker_name": address}, answer=False)
        except CALL_ERRORS as err:
            logger.warning("Cannot report unreachable worker %s to the controller: %s", address, err)

    def register(self, worker: str, status: dict | None = None, check_heart_beat: bool = True) -> None:
        """Register `worker` (its URL) with the controller; without `status` the controller asks the worker."""
        body = {"worker_name": worker, "check_heart_beat": check_heart_beat}
        if status is not None:
            body["worker_status"] = status
        self._controller("/register_worker", body, answer=False)

    def heartbeat(self, worker: str, queue_length: int) -> bool:
        """Send a heartbeat; False when the controller does not know `worker` (it must register again)."""
        return bool(self._controller("/receive_heart_beat", {"worker_name": worker, "queue_length": queue_length})
                    .get("exist", False))  # fmt: skip

    def worker_status(self, address: str, timeout: float | None = None) -> dict:
        return self.post(address + "/worker_get_status", {}, timeout)

    def model_details(self, address: str) -> dict | None:
        """The worker's `/model_details` (template, context length, ...); None for a worker without that endpoint
        (the original's, SGLang's)."""
        response = post_json(address + "/model_details", {}, self.key, self.timeout)
        if response.status_code in (404, 405):
            return None
        if response.status_code != 200:
            raise Refused(address + "/model_details", response.status_code, response.text)
        return _json_object(response)

    def health(self, address: str, timeout: float = 2.0) -> bool:
        """True when `address/health` answers 200."""
        return shared_http().get(address + "/health", headers=cluster_headers(self.key), timeout=timeout).is_success

    def generate_stream(self, address: str, payload: dict, timeout=STREAM_TIMEOUT) -> Iterator[Chunk]:
        """`stream_worker` on `address/worker_generate_stream` (a worker, or a controller's relay)."""
        return stream_worker(address + "/worker_generate_stream", payload, self.key, timeout)


async def apost_json(client: httpx.AsyncClient, url: str, body=None, key=None, timeout=None) -> httpx.Response:
    """`post_json` on an `httpx.AsyncClient`; `timeout`, when given, overrides the client's own."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    return await client.post(url, json=body or {}, headers=cluster_headers(key), **kwargs)


async def astream_open(client: httpx.AsyncClient, url: str, body=None, key=None, content: bytes | None = None):
    """Open a streamed POST (JSON `body`, or raw JSON bytes `content` passed on untouched) with the cluster key;
    the caller reads and closes the `httpx.Response`."""
    headers = cluster_headers(key)
    if content is not None:
        request = client.build_request(
            "POST", url, content=content, headers={**headers, "content-type": "application/json"}
        )
    else:
        request = client.build_request("POST", url, json=body, headers=headers)
    return await client.send(request, stream=True)


async def astream_worker(client: httpx.AsyncClient, url: str, body: dict, key=None) -> AsyncIterator[Chunk]:
    """`stream_worker` on an `httpx.AsyncClient`."""
    response = await astream_open(client, url, body, key)
    try:
        if response.status_code != 200:
            yield rejection_chunk(response.status_code, await response.aread())
            return
        async for data in aiter_chunks(response.aiter_raw()):
            yield data
    finally:
        await response.aclose()


class AsyncClusterClient:
    """`ClusterClient` for an asyncio server, on one pooled `httpx.AsyncClient` (`http`, or its own)."""

    def __init__(self, controller: str | None, key: str | None = None, http: httpx.AsyncClient | None = None):
        self.controller = controller.rstrip("/") if controller else None
        self.key = key
        self.http = http if http is not None else async_http()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post(self, url: str, body: dict | None = None) -> dict:
        response = await apost_json(self.http, url, body, self.key)
        if response.status_code != 200:
            raise Refused(url, response.status_code, response.text)
        return _json_object(response)

    async def list_models(self) -> list[str]:
        return list((await self.post(self.controller + "/list_models")).get("models", []))

    async def get_worker_address(self, model: str, exclude: Iterable[str] = ()) -> str:
        data = await self.post(self.controller + "/get_worker_address", _address_query(model, exclude))
        if not data.get("address"):
            raise NoWorker(model, data.get("error"))
        return data["address"].rstrip("/")

    async def report_unreachable(self, address: str) -> None:
        try:
            await self.post(self.controller + "/report_unreachable", {"worker_name": address})
        except CALL_ERRORS as err:
            logger.warning("Cannot report unreachable worker %s to the controller: %s", address, err)

    async def model_details(self, address: str) -> dict:
        return await self.post(address + "/model_details", {})

    async def open_stream(self, address: str, payload: dict | None = None, raw: bytes | None = None):
        """Start `address/worker_generate_stream` (JSON `payload`, or the client's `raw` body unparsed); the open
        streamed response, whatever its status (the caller reads and closes it)."""
        return await astream_open(self.http, address + "/worker_generate_stream", payload, self.key, raw)
