"""HTTP plumbing the servers share: a request-size limit, strict JSON bodies, API keys, uvicorn start-up."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
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
        # Read the whole body here, counting (a chunked body has no Content-Length), before the app sees any of it:
        # an exception raised from inside the app's `receive` would reach the client as a 500.
        parts, seen = [], 0
        while True:
            event = await receive()
            if event["type"] != "http.request":  # the client left before sending it all
                return
            parts.append(event.get("body", b""))
            seen += len(parts[-1])
            if seen > self.max_bytes:
                return await self._reject(send, message)
            if not event.get("more_body", False):
                break
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # after the body: the disconnect

        await self.app(scope, replay_receive, send)

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


MAX_JSON_DEPTH = 32  # nesting of objects/arrays in a request body; real requests need 5 or fewer


def _not_json_constant(name: str):
    raise BadJSON(f"The request body contains `{name}`, which is not JSON; send a finite number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"The number `{text[:40]}` in the request body is out of range (larger than a 64-bit float).")
    return value


def _depth(data) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                break
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def loads_json(raw: bytes | str):
    """Strict JSON: no NaN/Infinity, no number that overflows a float, at most MAX_JSON_DEPTH levels deep;
    `BadJSON` with a message for the client otherwise."""
    try:
        data = json.loads(raw, parse_constant=_not_json_constant, parse_float=_finite_float)
    except RecursionError as err:
        raise BadJSON(f"The request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels).") from err
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, and ints over Python's digit limit
        if isinstance(err, BadJSON):
            raise
        raise BadJSON(f"The request body is not valid JSON: {err}.") from err
    if _depth(data) > MAX_JSON_DEPTH:
        raise BadJSON(f"The request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels).")
    return data


async def read_json_object(request) -> dict:
    """The request body as a JSON object; `BadJSON` (with a message for the client) otherwise."""
    raw = await request.body()
    if not raw.strip():
        raise BadJSON("The request body is empty; send a JSON object.")
    data = loads_json(raw)
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


# ---------------------------------------------------------------------------------------------------------------------
# The cluster key (controller and workers) and image limits (workers, API server, web UI)
# ---------------------------------------------------------------------------------------------------------------------


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    from llava.serve.client import CLUSTER_KEY_ENV, CLUSTER_KEY_HEADER

    parser.add_argument(
        "--cluster-key",
        default=None,
        help=f"Shared secret of the controller, workers, API server and web UI (also ${CLUSTER_KEY_ENV}); "
        f"controller and worker endpoints refuse requests without it (header {CLUSTER_KEY_HEADER}) with 401.",
    )


def is_loopback_host(host: str) -> bool:
    """True when `host` (a bind address or a host name) only reaches this machine."""
    import ipaddress

    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(logger: logging.Logger, what: str, host: str, key: str | None) -> None:
    """Warn loudly when a controller or worker listens beyond loopback without a cluster key."""
    if key or is_loopback_host(host):
        return
    from llava.serve.client import CLUSTER_KEY_ENV

    logger.warning(
        "\n"
        "*********************************************************************************************************\n"
        "WARNING: this %s listens on %s WITHOUT a cluster key.\n"
        "Anyone who can reach this port can register a rogue worker (and receive users' prompts and images),\n"
        "read every answer, or generate directly, bypassing the API server's keys.\n"
        "Set the same secret on every process of the cluster: --cluster-key <secret> or %s=<secret>.\n"
        "*********************************************************************************************************",
        what,
        host,
        CLUSTER_KEY_ENV,
    )


class ClusterKeyMiddleware:
    """Answer 401 to every HTTP request that lacks the cluster key (compared in constant time); a no-op without a
    key."""

    def __init__(self, app, key: str | None, error_body: Callable[[str], dict]):
        self.app, self.key, self.error_body = app, key, error_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key:
            return await self.app(scope, receive, send)
        from llava.serve.client import CLUSTER_KEY_ENV, CLUSTER_KEY_HEADER

        given = dict(scope.get("headers") or []).get(CLUSTER_KEY_HEADER.lower().encode(), b"")
        if secrets.compare_digest(given, self.key.encode()):
            return await self.app(scope, receive, send)
        message = (
            f"Missing or wrong cluster key: send the `{CLUSTER_KEY_HEADER}` header (--cluster-key / {CLUSTER_KEY_ENV})."
        )
        body = json.dumps(self.error_body(message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def add_image_limit_args(parser: argparse.ArgumentParser, urls: bool = True) -> None:
    """The image-limit flags, the same on the worker, the API server (`urls`: also the URL-fetch flags) and web UI."""
    from llava import mm_utils as mm

    parser.add_argument("--max-images", type=int, default=8, help="Images per request.")
    parser.add_argument("--max-image-bytes", type=int, default=mm.DEFAULT_MAX_IMAGE_BYTES, help="Per image file.")
    parser.add_argument(
        "--max-image-pixels", type=int, default=mm.DEFAULT_MAX_IMAGE_PIXELS, help="Width*height of one image."
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=mm.DEFAULT_MAX_REQUEST_PIXELS,
        help="Width*height of all images of one request together (checked from headers before decoding).",
    )
    parser.add_argument(
        "--max-image-aspect-ratio",
        type=float,
        default=mm.DEFAULT_MAX_ASPECT_RATIO,
        help="Long side / short side; longer images are refused.",
    )
    parser.add_argument(
        "--max-image-side",
        type=int,
        default=mm.DEFAULT_MAX_IMAGE_SIDE,
        help="Images are shrunk (aspect kept) to fit this many pixels per side right after decoding.",
    )
    if urls:
        parser.add_argument("--image-download-timeout", type=float, default=mm.DEFAULT_DOWNLOAD_TIMEOUT)
        parser.add_argument(
            "--allow-image-urls",
            action="store_true",
            help="Fetch http(s) image URLs (off: data: URLs and base64 only). Loopback, private, link-local, "
            "multicast and reserved addresses stay refused unless --image-url-allow names them.",
        )
        parser.add_argument(
            "--image-url-allow",
            action="append",
            default=[],
            metavar="HOST_OR_CIDR",
            help="With --allow-image-urls: a host name, address or network (CIDR) fetched even if private "
            "(repeatable).",
        )
        parser.add_argument(
            "--no-remote-images", action="store_true", help="Refuse http(s) image URLs (the default; kept for scripts)."
        )


def image_limits_from(args: argparse.Namespace):
    """The `ImageLimits` the flags of `add_image_limit_args` describe."""
    from llava.mm_utils import DEFAULT_DOWNLOAD_TIMEOUT, ImageLimits

    for flag in ("max_images", "max_image_bytes", "max_image_pixels", "max_request_pixels", "max_image_side"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1.")
    if args.max_image_aspect_ratio < 1:
        raise SystemExit(f"--max-image-aspect-ratio {args.max_image_aspect_ratio}: must be at least 1.")
    allow_urls = getattr(args, "allow_image_urls", False) and not getattr(args, "no_remote_images", False)
    try:
        return ImageLimits(
            max_images=args.max_images,
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            max_request_pixels=args.max_request_pixels,
            max_aspect_ratio=args.max_image_aspect_ratio,
            max_side=args.max_image_side,
            timeout=getattr(args, "image_download_timeout", DEFAULT_DOWNLOAD_TIMEOUT),
            allow_urls=allow_urls,
            url_allow=tuple(getattr(args, "image_url_allow", None) or ()),
        )
    except ValueError as err:
        raise SystemExit(str(err)) from err
