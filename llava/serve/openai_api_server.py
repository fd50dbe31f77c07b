"""An OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`) in front of the controller and its workers.

    python -m llava.serve.openai_api_server --controller http://localhost:10000 --port 8000 [--api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="KEY")
    client.chat.completions.create(model="llava-v1.5-7b", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the picture?"}]}])

Messages are rendered with the served model's own chat template (asked from its worker); each `image_url` part
becomes an `<image>` marker where it stands. `data:` URLs are passed to the worker as they are (it checks them);
http(s) URLs are refused unless --allow-image-urls, and then fetched here with address checks (see docs/Serving.md,
"Security"). With --cluster-key (or LLAVA_CLUSTER_KEY) every call to the controller and workers carries the cluster
key; the users' keys (--api-key) are separate. Errors use OpenAI's error format. Request parsing, prompt rendering
and the answer's formats live in `openai_protocol`; every call to the controller and workers goes through one pooled
`client.AsyncClusterClient`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection

from llava.mm_utils import ImageLimits
from llava.serve.client import CALL_ERRORS, AsyncClusterClient, NoWorker, async_http, cluster_key_from
from llava.serve.openai_protocol import (  # noqa: F401 (re-exported: the module's public names before the split)
    ROLES,
    ApiError,
    ChatRequest,
    WorkerOverloaded,
    WorkerUnreachable,
    _parts,
    chunk_error,
    fetch_image,
    lost_worker,
    parse_chat_request,
    render_prompt,
    sse,
    stream_chunk,
    usage_of,
)
from llava.serve.protocol import ErrorCode, aiter_chunks, rejection_chunk
from llava.serve.server_utils import (
    BadJSON,
    BodyLimitMiddleware,
    add_cluster_args,
    add_image_limit_args,
    add_server_args,
    api_keys_from,
    image_limits_from,
    key_allowed,
    read_json_object,
    require,
    run_server,
    setup_logging,
)

require("fastapi", "uvicorn", "httpx")

import httpx  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

logger = logging.getLogger("llava.serve.openai_api_server")

DETAILS_TTL = 30.0  # seconds a worker's template/context details are cached
MAX_OVERLOAD_TRIES = 64  # at most this many full workers are tried for one request before it gets 503 overloaded
UPSTREAM_CONNECTIONS = 4096  # open connections to workers; beyond this requests wait (the workers' queues fill first)

Limits = ImageLimits  # the image limits (flags: server_utils.add_image_limit_args)


async def resolve_images(urls: list[str], limits: Limits) -> list[str]:
    """The request's images for the worker: data: URLs as they are (the worker checks them), http(s) URLs fetched
    here when --allow-image-urls (`fetch_image`: the original bytes when they need no shrinking)."""
    if len(urls) > limits.max_images:
        raise ApiError(400, f"{len(urls)} images sent; the limit is {limits.max_images} per request.", "messages")
    out = []
    for url in urls:
        head = url[:8].lower()
        if head.startswith("data:"):
            out.append(url)
        elif head.startswith(("http://", "https://")):
            if not limits.allow_urls:
                raise ApiError(
                    400,
                    "Remote image URLs are disabled on this server; send images as data: URLs "
                    "(the operator can enable URLs with --allow-image-urls).",
                    "messages",
                )
            out.append(await run_in_threadpool(fetch_image, url, limits))
        else:
            raise ApiError(400, f"Image URL `{url[:60]}` must be a data: URL or an http(s) URL.", "messages")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------


class Backend:
    """Talks to the controller (model list, worker choice) and to workers (templates, generation), through one
    pooled `AsyncClusterClient` (keep-alive connections reused across requests)."""

    def __init__(self, controller_url: str, cluster_key: str | None = None):
        # No pool wait limit: a request waits for a connection rather than failing (backpressure); the workers'
        # queues decide when the cluster is full (503 "overloaded" from the worker).
        limits = httpx.Limits(max_connections=UPSTREAM_CONNECTIONS, max_keepalive_connections=64)
        self.client = AsyncClusterClient(controller_url, cluster_key, async_http(limits))
        self.controller_url = self.client.controller
        self._details: dict[str, tuple[float, dict]] = {}

    async def report_unreachable(self, address: str) -> None:
        """Tell the controller that `address` did not answer, so it stops routing to it until a probe succeeds."""
        self._details.pop(address, None)
        await self.client.report_unreachable(address)

    def _controller_down(self, err: Exception) -> ApiError:
        return ApiError(503, f"The controller at {self.controller_url} is unreachable ({type(err).__name__}).")

    async def models(self) -> list[str]:
        try:
            return await self.client.list_models()
        except CALL_ERRORS as err:
            raise self._controller_down(err) from err

    async def worker_for(self, model: str, exclude: Collection[str] = ()) -> tuple[str, dict]:
        """A worker for `model` other than `exclude` (workers that answered "queue full") and its details. When the
        controller has none left but `exclude` is not empty, every live worker was tried and was full: overloaded."""
        try:
            address = await self.client.get_worker_address(model, exclude)
        except NoWorker:
            available = await self.models()
            if model not in available:
                raise ApiError(
                    404,
                    f"Model `{model}` is not served here; available: {', '.join(available) or 'none'}.",
                    "model",
                    "model_not_found",
                ) from None
            if exclude:  # the address is empty: no worker is left to try
                raise WorkerOverloaded(
                    "", f"Every worker serving `{model}` has a full queue ({len(exclude)} tried); try again shortly."
                ) from None
            raise ApiError(503, f"No worker for `{model}` is available right now; try again.") from None
        except CALL_ERRORS as err:
            raise self._controller_down(err) from err
        cached = self._details.get(address)
        details = cached[1] if cached and time.monotonic() - cached[0] < DETAILS_TTL else None
        if details is None:
            try:
                details = await self.client.model_details(address)
                self._details[address] = (time.monotonic(), details)
            except CALL_ERRORS as err:
                if isinstance(err, httpx.TransportError):
                    await self.report_unreachable(address)
                raise WorkerUnreachable(
                    address, f"The worker for `{model}` at {address} is unreachable ({type(err).__name__})."
                ) from err
        return address, details

    async def open_stream(self, address: str, payload: dict) -> httpx.Response:
        """Start a generation; rejections (bad image, prompt too long, ...) raise before any byte is streamed."""
        try:
            response = await self.client.open_stream(address, payload)
        except httpx.HTTPError as err:
            await self.report_unreachable(address)
            raise WorkerUnreachable(
                address, f"The worker at {address} is unreachable ({type(err).__name__}); try again."
            ) from err
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            chunk = rejection_chunk(response.status_code, raw)
            if chunk["error_code"] == ErrorCode.OVERLOADED:
                raise WorkerOverloaded(address, chunk["text"])
            # 401: this server's --cluster-key does not match the worker's: an operator's problem, not the client's
            status = response.status_code
            raise ApiError(400 if status < 500 and status != 401 else 503, chunk["text"])
        return response


async def _collect(upstream, address: str) -> dict:
    """Read a non-streaming answer to its last chunk; worker errors and a dropped connection raise `ApiError`."""
    final = None
    try:
        async for data in aiter_chunks(upstream.aiter_raw()):
            if data.get("error_code"):
                raise chunk_error(data)
            final = data
    except httpx.HTTPError as err:
        raise lost_worker(address, err) from err
    finally:
        await upstream.aclose()
    if final is None or "finish_reason" not in final and not final.get("text"):
        raise WorkerUnreachable(address, f"The worker at {address} closed the stream without an answer.")
    return final


async def _disconnect(request) -> None:
    """Return when the client has gone (the body is already read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request, work):
    """Await `work`; when the client disconnects first, cancel it (which closes the worker stream, so the worker
    drops the request from its batch) and return None."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        logger.info("The client went away; cancelling its request")
        return None
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending


async def _guarded(upstream, address: str, backend: Backend) -> AsyncIterator[dict]:
    """The worker's chunks; a dropped connection becomes one error chunk (and the worker is reported)."""
    try:
        async for data in aiter_chunks(upstream.aiter_raw()):
            yield data
    except httpx.HTTPError as err:
        await backend.report_unreachable(address)
        yield {"error_code": int(ErrorCode.SERVER_ERROR), "lost": lost_worker(address, err).message}


def build_app(
    controller_url: str, api_keys: list[str], limits: Limits, max_request_bytes: int, cluster_key: str | None = None
):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        app.state.backend = Backend(controller_url, cluster_key)
        yield
        await app.state.backend.client.aclose()

    app = FastAPI(title="LLaVA OpenAI-compatible API", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1") and not key_allowed(request.headers.get("authorization"), api_keys):
            err = ApiError(401, "Missing or wrong API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "llava"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        models = await request.app.state.backend.models()
        return {"object": "list", "data": [model_card(m) for m in models]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        if model not in await request.app.state.backend.models():
            raise ApiError(404, f"Model `{model}` is not served here.", "model", "model_not_found")
        return model_card(model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        backend: Backend = request.app.state.backend
        try:
            body = await read_json_object(request)
        except BadJSON as err:
            raise ApiError(400, str(err)) from err
        chat = parse_chat_request(body)
        images: dict[tuple, list[str]] = {}  # resolved once, even when the request goes to a second worker

        async def start(full: Collection[str]) -> tuple[str, str, object]:
            address, details = await backend.worker_for(chat.model, full)
            prompt, urls = render_prompt(chat.messages, details.get("conv_mode") or "llava_v1")
            if tuple(urls) not in images:
                images[tuple(urls)] = await resolve_images(urls, limits)
            payload = {
                "model": chat.model,
                "prompt": prompt,
                "images": images[tuple(urls)],
                "temperature": chat.temperature,
                "top_p": chat.top_p,
                "max_new_tokens": chat.max_tokens or int(details.get("context_length") or 2048),
                "stop": chat.stop,
            }
            return address, prompt, await backend.open_stream(address, payload)

        async def start_anywhere(retry_unreachable: bool = True) -> tuple[str, str, object]:
            """`start`, on another worker when the chosen one cannot be reached (once) or its queue is full. Workers
            found full are excluded from the next choice, so 503 `overloaded` comes only when the controller has no
            untried worker left (or MAX_OVERLOAD_TRIES were full)."""
            full: set[str] = set()
            while True:
                try:
                    return await start(full)
                except WorkerUnreachable as err:  # already reported to the controller, which stops routing to it
                    if not retry_unreachable:
                        raise
                    retry_unreachable = False
                    logger.warning("%s Retrying once on another worker.", err.message)
                except WorkerOverloaded as err:
                    if not err.address:  # the controller has no worker left that was not full
                        raise
                    full.add(err.address)
                    if len(full) >= MAX_OVERLOAD_TRIES:
                        raise
                    logger.info("The worker at %s is full; trying another (%d full so far)", err.address, len(full))

        async def answer() -> tuple[str, dict]:
            # Nothing has reached the client yet, so a worker that cannot be reached or dies mid-answer is reported
            # to the controller and the request is tried once more on another worker.
            retried = False
            while True:
                address, prompt, upstream = await start_anywhere(not retried)
                try:
                    return prompt, await _collect(upstream, address)
                except WorkerUnreachable as err:
                    if retried:
                        raise
                    retried = True
                    await backend.report_unreachable(err.address)
                    logger.warning("%s Retrying once on another worker.", err.message)

        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            address, prompt, upstream = await start_anywhere()  # not one byte was streamed yet
            events = _sse(upstream, prompt, chat, completion_id, created, address, backend)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _unless_disconnected(request, answer())
        if result is None:  # the client left; nobody reads this reply
            return JSONResponse(ApiError(499, "The client closed the request.").body(), status_code=499)
        prompt, final = result
        usage = usage_of(final)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": final["text"][len(prompt) :].strip()},
                    "finish_reason": final.get("finish_reason") or "stop",
                }
            ],
            "usage": usage,
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return BodyLimitMiddleware(
        app, max_request_bytes, lambda message: ApiError(413, message, code="request_too_large").body()
    )


async def _sse(
    upstream, prompt: str, chat: ChatRequest, completion_id: str, created: int, address: str, backend: Backend
) -> AsyncIterator[bytes]:
    """Server-sent events. Surrounding whitespace is held back until more text follows, so the concatenated deltas
    equal the non-streaming answer exactly. A failure after the first event is sent as a `data: {"error": ...}`
    event with no `[DONE]` after it (the official `openai` client raises `APIError` on it)."""

    def event(delta: dict, finish_reason=None) -> bytes:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        return sse(stream_chunk(completion_id, created, chat.model, choices))

    sent, finished = "", False
    try:
        yield event({"role": "assistant", "content": ""})
        async for data in _guarded(upstream, address, backend):
            if data.get("error_code"):
                yield sse(chunk_error(data).body())
                return
            visible = data["text"][len(prompt) :].strip()
            if visible.startswith(sent) and len(visible) > len(sent):
                yield event({"content": visible[len(sent) :]})
                sent = visible
            if "finish_reason" in data:
                yield event({}, data.get("finish_reason") or "stop")
                if chat.include_usage:
                    yield sse(stream_chunk(completion_id, created, chat.model, [], usage=usage_of(data)))
                finished = True
        if not finished:  # the stream ended without its final chunk: never pass a cut answer off as complete
            err = WorkerUnreachable(address, f"The worker at {address} ended the answer without finishing it.")
            yield sse(err.body())
            return
        yield b"data: [DONE]\n\n"
    finally:
        await upstream.aclose()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(parser, port=8000)
    parser.add_argument(
        "--controller-address", "--controller", dest="controller_address", default="http://localhost:21001"
    )
    parser.add_argument(
        "--api-key", action="append", default=None, help="Require this key (repeatable; also LLAVA_API_KEYS=a,b)."
    )
    add_cluster_args(parser)
    add_image_limit_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging("llava.serve.openai_api_server")
    limits = image_limits_from(args)
    cluster_key = cluster_key_from(args.cluster_key)
    keys = api_keys_from(args.api_key)
    logger.info(
        "OpenAI API on %s:%d -> %s (API key %s)",
        args.host,
        args.port,
        args.controller_address,
        "required" if keys else "not required",
    )
    app = build_app(args.controller_address, keys, limits, args.max_request_bytes, cluster_key)
    run_server(app, args.host, args.port)


if __name__ == "__main__":
    main()
