"""HTTP plumbing the servers share: a request-size limit, strict JSON bodies, API keys, uvicorn start-up."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence

DEFAULT_HOST = "127.0.0.1"  # servers listen on loopback unless --host says otherwise
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024


def require(*modules: str, extra: str = "serve") -> None:
    """Fail with the install command when an optional serving dependency is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"Serving needs {', '.join(missing)}: pip install 'llava[{extra}]'.")


def setup_logging(name: str, level: str = "INFO") -> logging.Logger:
    logging.basicConfig(level=level, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    return logging.getLogger(name)


def add_server_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="Interface to listen on; 0.0.0.0 exposes the server.")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="Requests with a larger body are refused with 413.",
    )


def local_url(host: str, port: int) -> str:
    """The URL other processes on this machine use to reach a server bound to `host`."""
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    return f"http://{host}:{port}"


class RequestTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length or by counting a chunked body."""

    def __init__(self, app, max_bytes: int, error_body: Callable[[str], dict]):
        self.app = app
        self.max_bytes = max_bytes
        self.error_body = error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"The request body is larger than the server's limit of {self.max_bytes} bytes (--max-request-bytes)."
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode() or None
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send, message)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            event = await receive()
            if event["type"] == "http.request":
                seen += len(event.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge
            return event

        async def tracking_send(event):
            nonlocal started
            if event["type"] == "http.response.start":
                started = True
            await send(event)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge:
            if not started:
                await self._reject(send, message)

    async def _reject(self, send, message: str):
        body = json.dumps(self.error_body(message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class BadJSON(ValueError):
    pass


async def read_json_object(request) -> dict:
    """The request body as a JSON object; `BadJSON` (with a message for the client) otherwise."""
    raw = await request.body()
    if not raw.strip():
        raise BadJSON("The request body is empty; send a JSON object.")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadJSON(f"The request body is not valid JSON: {err}.") from err
    if not isinstance(data, dict):
        raise BadJSON(f"The request body must be a JSON object, got {type(data).__name__}.")
    return data


def api_keys_from(args_keys: Sequence[str] | None, env: str = "LLAVA_API_KEYS") -> list[str]:
    """API keys from `--api-key` flags plus the comma-separated environment variable `env`."""
    keys = list(args_keys or [])
    keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return keys


def key_allowed(authorization: str | None, keys: Sequence[str]) -> bool:
    if not keys:
        return True
    if not authorization or not authorization.lower().startswith("bearer "):
        return False
    given = authorization[7:].strip()
    return any(secrets.compare_digest(given, k) for k in keys)


def run_server(app, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
