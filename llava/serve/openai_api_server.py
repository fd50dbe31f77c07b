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
key; the users' keys (--api-key) are separate. Errors use OpenAI's error format.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.mm_utils import ImageLimits, ImageLoadError
from llava.serve.client import apost_json, astream_open, cluster_key_from
from llava.serve.protocol import ErrorCode, aiter_chunks
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

ROLES = ("system", "developer", "user", "assistant")
DETAILS_TTL = 30.0  # seconds a worker's template/context details are cached
OVERLOAD_TRIES = 3  # workers asked before a request is refused as overloaded (503)
UPSTREAM_CONNECTIONS = 4096  # open connections to workers; beyond this requests wait (the workers' queues fill first)


class ApiError(Exception):
    """An error answered in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Limits = ImageLimits  # the image limits (flags: server_utils.add_image_limit_args)


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------------------------------------------------


def _number(body: dict, name: str, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high
    if ok and integer and value != int(value):
        ok = False
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"`{name}` must be {kind} in [{low}, {high}], got `{value!r:.60}`.", name)
    return int(value) if integer else float(value)


def parse_chat_request(body: dict) -> ChatRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required: the name of a served model (see GET /v1/models).", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"`messages[{i}].role` must be one of {', '.join(ROLES)}.", f"messages[{i}].role")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        param = "logprobs" if body.get("logprobs") not in (None, False) else "top_logprobs"
        raise ApiError(400, "`logprobs` is not supported by this server; leave it out (or false).", param)
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, f"Only `n`=1 is supported, got `{n!r:.20}`.", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "`stop` must be a string or a list of up to 16 non-empty strings.", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"`stream` must be true or false, got `{stream!r:.20}`.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object.", "stream_options")
    max_tokens = _number(body, "max_completion_tokens", None, 1, 1 << 16, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, 1, 1 << 16, integer=True)
    return ChatRequest(
        model=model,
        messages=messages,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        max_tokens=max_tokens,
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _parts(message: dict, index: int) -> list[tuple[str, str]]:
    """A message's content as ("text", text) / ("image", url) parts."""
    content = message.get("content")
    where = f"messages[{index}].content"
    if content is None:
        return []
    if isinstance(content, str):
        parts = [("text", content)]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(("text", part["text"]))
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"`{where}[{j}].image_url.url` must be a data: or http(s) URL.", where)
                parts.append(("image", url))
            else:
                raise ApiError(
                    400,
                    f"`{where}[{j}]` must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}.",
                    where,
                )
    else:
        raise ApiError(400, f"`{where}` must be a string or a list of content parts.", where)
    for kind, text in parts:
        if kind == "text" and DEFAULT_IMAGE_TOKEN in text:
            raise ApiError(400, f"`{where}` contains `{DEFAULT_IMAGE_TOKEN}`; send images as image_url parts.", where)
    return parts


def render_prompt(messages: list[dict], conv_mode: str) -> tuple[str, list[str]]:
    """The prompt in template `conv_mode`, ready for the assistant's reply, and the image URLs in marker order."""
    conv = get_conv_template(conv_mode)
    turns: list[list] = []  # [role, text]; consecutive messages of one role are joined
    images: list[str] = []
    for i, message in enumerate(messages):
        parts = _parts(message, i)
        role = message["role"]
        if role in ("system", "developer"):
            if any(kind == "image" for kind, _ in parts):
                raise ApiError(400, f"`messages[{i}]`: a system message cannot hold images.", f"messages[{i}]")
            if turns:
                raise ApiError(400, f"`messages[{i}]`: system messages must come first.", f"messages[{i}]")
            conv.set_system_message("".join(text for _, text in parts))
            continue
        if role == "assistant" and any(kind == "image" for kind, _ in parts):
            raise ApiError(400, f"`messages[{i}]`: assistant messages cannot hold images.", f"messages[{i}]")
        text = ""
        for kind, value in parts:
            if kind == "image":
                images.append(value)
                text += DEFAULT_IMAGE_TOKEN + "\n"  # where the image stands, as the HF chat template renders it
            else:
                text += value
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "The conversation must start and end with a user message.", "messages")
    for role, text in turns:
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt(), images


def _fetch_image(url: str, limits: Limits) -> str:
    """A remote image as base64 PNG (lossless, so the worker sees exactly the downloaded pixels, after the shrink
    to --max-image-side)."""
    from llava.mm_utils import load_image

    try:
        image = load_image(url, allow_paths=False, limits=limits)
    except ImageLoadError as err:
        raise ApiError(400, str(err), "messages") from err
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def resolve_images(urls: list[str], limits: Limits) -> list[str]:
    if len(urls) > limits.max_images:
        raise ApiError(400, f"{len(urls)} images sent; the limit is {limits.max_images} per request.", "messages")
    out = []
    for url in urls:
        head = url[:8].lower()
        if head.startswith("data:"):
            out.append(url)  # the worker decodes and checks it
        elif head.startswith(("http://", "https://")):
            if not limits.allow_urls:
                raise ApiError(
                    400,
                    "Remote image URLs are disabled on this server; send images as data: URLs "
                    "(the operator can enable URLs with --allow-image-urls).",
                    "messages",
                )
            out.append(await run_in_threadpool(_fetch_image, url, limits))
        else:
            raise ApiError(400, f"Image URL `{url[:60]}` must be a data: URL or an http(s) URL.", "messages")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------


class Backend:
    """Talks to the controller (model list, worker choice) and to workers (templates, generation)."""

    def __init__(self, controller_url: str, cluster_key: str | None = None):
        self.controller_url = controller_url.rstrip("/")
        self.cluster_key = cluster_key
        # No pool wait limit: a request waits for a connection rather than failing (backpressure); the workers'
        # queues decide when the cluster is full (503 "overloaded" from the worker).
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None, pool=None),
            limits=httpx.Limits(max_connections=UPSTREAM_CONNECTIONS, max_keepalive_connections=64),
        )
        self._details: dict[str, tuple[float, dict]] = {}

    async def report_unreachable(self, address: str) -> None:
        """Tell the controller that `address` did not answer, so it stops routing to it until a probe succeeds."""
        self._details.pop(address, None)
        try:
            await apost_json(
                self.http, self.controller_url + "/report_unreachable", {"worker_name": address}, self.cluster_key
            )
        except httpx.HTTPError as err:
            logger.warning("Cannot report unreachable worker %s to the controller: %s", address, err)

    async def post_controller(self, path: str, body: dict | None = None) -> dict:
        try:
            response = await apost_json(self.http, self.controller_url + path, body, self.cluster_key)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as err:
            raise ApiError(
                503, f"The controller at {self.controller_url} is unreachable ({type(err).__name__})."
            ) from err

    async def models(self) -> list[str]:
        return (await self.post_controller("/list_models")).get("models", [])

    async def worker_for(self, model: str) -> tuple[str, dict]:
        address = (await self.post_controller("/get_worker_address", {"model": model})).get("address", "")
        if not address:
            available = await self.models()
            if model not in available:
                raise ApiError(
                    404,
                    f"Model `{model}` is not served here; available: {', '.join(available) or 'none'}.",
                    "model",
                    "model_not_found",
                )
            raise ApiError(503, f"No worker for `{model}` is available right now; try again.")
        cached = self._details.get(address)
        details = cached[1] if cached and time.monotonic() - cached[0] < DETAILS_TTL else None
        if details is None:
            try:
                response = await apost_json(self.http, address + "/model_details", {}, self.cluster_key)
                response.raise_for_status()
                details = response.json()
                self._details[address] = (time.monotonic(), details)
            except (httpx.HTTPError, ValueError) as err:
                if isinstance(err, httpx.TransportError):
                    await self.report_unreachable(address)
                raise WorkerUnreachable(
                    address, f"The worker for `{model}` at {address} is unreachable ({type(err).__name__})."
                ) from err
        return address, details

    async def open_stream(self, address: str, payload: dict) -> httpx.Response:
        """Start a generation; rejections (bad image, prompt too long, ...) raise before any byte is streamed."""
        try:
            response = await astream_open(self.http, address + "/worker_generate_stream", payload, self.cluster_key)
        except httpx.HTTPError as err:
            await self.report_unreachable(address)
            raise WorkerUnreachable(
                address, f"The worker at {address} is unreachable ({type(err).__name__}); try again."
            ) from err
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            code = None
            try:
                data = json.loads(raw.split(b"\0")[0])
                message, code = data.get("text") or raw.decode(errors="replace"), data.get("error_code")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")[:500]
            if code == ErrorCode.OVERLOADED:
                raise WorkerOverloaded(address, message)
            # 401: this server's --cluster-key does not match the worker's: an operator's problem, not the client's
            raise ApiError(400 if response.status_code < 500 and response.status_code != 401 else 503, message)
        return response


class WorkerUnreachable(ApiError):
    """A worker that could not be reached, or that dropped the connection mid-answer (503)."""

    def __init__(self, address: str, message: str):
        super().__init__(503, message, code="worker_unreachable")
        self.address = address


class WorkerOverloaded(ApiError):
    """A worker refused a request because its queue is full (503 `overloaded`); another worker may have room."""

    def __init__(self, address: str, message: str):
        super().__init__(503, message, code="overloaded")
        self.address = address


def _lost_worker(address: str, err: Exception) -> WorkerUnreachable:
    return WorkerUnreachable(
        address, f"The worker at {address} stopped mid-answer ({type(err).__name__}: {err}); try again."
    )


async def _collect(upstream, address: str) -> dict:
    """Read a non-streaming answer to its last chunk; worker errors and a dropped connection raise `ApiError`."""
    final = None
    try:
        async for data in aiter_chunks(upstream.aiter_raw()):
            if data.get("error_code"):
                raise _chunk_error(data)
            final = data
    except httpx.HTTPError as err:
        raise _lost_worker(address, err) from err
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
        yield {"error_code": int(ErrorCode.SERVER_ERROR), "lost": _lost_worker(address, err).message}


def _chunk_error(data: dict) -> ApiError:
    if data.get("lost"):
        return WorkerUnreachable("", data["lost"])
    code = data.get("error_code")
    status = 503 if code == ErrorCode.OVERLOADED else 400 if code == ErrorCode.BAD_REQUEST else 500
    return ApiError(status, data.get("text") or f"The worker failed (error_code {code}).")


def build_app(
    controller_url: str, api_keys: list[str], limits: Limits, max_request_bytes: int, cluster_key: str | None = None
):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        app.state.backend = Backend(controller_url, cluster_key)
        yield
        await app.state.backend.http.aclose()

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

        async def start() -> tuple[str, str, object]:
            address, details = await backend.worker_for(chat.model)
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
            """`start`, on another worker when the chosen one cannot be reached (once) or its queue is full (up to
            OVERLOAD_TRIES workers in all): 503 `overloaded` only when the workers tried are all full."""
            full = 0
            while True:
                try:
                    return await start()
                except WorkerUnreachable as err:  # already reported to the controller
                    if not retry_unreachable:
                        raise
                    retry_unreachable = False
                    logger.warning("%s Retrying once on another worker.", err.message)
                except WorkerOverloaded:
                    full += 1
                    if full >= OVERLOAD_TRIES:
                        raise

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
        usage = _usage(final)
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


def _usage(final: dict) -> dict:
    usage = final.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens") or 0
    completion_tokens = usage.get("completion_tokens") or 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _sse(
    upstream, prompt: str, chat: ChatRequest, completion_id: str, created: int, address: str, backend: Backend
) -> AsyncIterator[bytes]:
    """Server-sent events. Surrounding whitespace is held back until more text follows, so the concatenated deltas
    equal the non-streaming answer exactly. A failure after the first event is sent as a `data: {"error": ...}`
    event with no `[DONE]` after it (the official `openai` client raises `APIError` on it)."""

    def event(delta: dict, finish_reason=None, **extra) -> bytes:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n".encode()

    sent, finished = "", False
    try:
        yield event({"role": "assistant", "content": ""})
        async for data in _guarded(upstream, address, backend):
            if data.get("error_code"):
                yield f"data: {json.dumps(_chunk_error(data).body())}\n\n".encode()
                return
            visible = data["text"][len(prompt) :].strip()
            if visible.startswith(sent) and len(visible) > len(sent):
                yield event({"content": visible[len(sent) :]})
                sent = visible
            if "finish_reason" in data:
                yield event({}, data.get("finish_reason") or "stop")
                if chat.include_usage:
                    usage = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": chat.model,
                        "choices": [],
                        "usage": _usage(data),
                    }
                    yield f"data: {json.dumps(usage)}\n\n".encode()
                finished = True
        if not finished:  # the stream ended without its final chunk: never pass a cut answer off as complete
            err = WorkerUnreachable(address, f"The worker at {address} ended the answer without finishing it.")
            yield f"data: {json.dumps(err.body())}\n\n".encode()
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
