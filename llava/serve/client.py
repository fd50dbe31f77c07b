"""The one HTTP client for every hop that calls the controller or a model worker; it adds the cluster key.

API (stable; sync functions use `requests`, async ones take an `httpx.AsyncClient` you own):

    CLUSTER_KEY_HEADER = "X-LLaVA-Cluster-Key"      # the header every controller/worker endpoint checks
    CLUSTER_KEY_ENV = "LLAVA_CLUSTER_KEY"           # the environment variable behind --cluster-key
    cluster_key_from(flag) -> str | None             # --cluster-key value, else $LLAVA_CLUSTER_KEY, else None
    cluster_headers(key) -> dict                      # {CLUSTER_KEY_HEADER: key}, or {} when key is None/""
    post_json(url, body=None, key=None, timeout=10) -> requests.Response   # POST JSON, raises requests errors
    stream_worker(url, body, key=None, timeout=(10, 300)) -> Iterator[dict]
        # POST to a .../worker_generate_stream URL and yield the parsed NUL-delimited chunks; a 4xx/5xx rejection
        # is yielded as its one JSON chunk ({"text", "error_code"}), a 401 as an error chunk naming the key
    async apost_json(client, url, body=None, key=None, timeout=None) -> httpx.Response
    async astream_open(client, url, body, key=None) -> httpx.Response   # streamed response; caller closes it
    async astream_worker(client, url, body, key=None) -> AsyncIterator[dict]   # parsed chunks, closes itself

`url` is the full URL (controller or worker address + path). `timeout` for the async helpers, when given,
overrides the client's own for that request. Nothing here retries or catches transport errors: callers decide.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator

import requests

from llava.serve.protocol import ErrorCode, aiter_chunks, iter_chunks

CLUSTER_KEY_HEADER = "X-LLaVA-Cluster-Key"
CLUSTER_KEY_ENV = "LLAVA_CLUSTER_KEY"


def cluster_key_from(flag: str | None) -> str | None:
    """The cluster key: the `--cluster-key` value when given, else `$LLAVA_CLUSTER_KEY`, else None (no key)."""
    key = flag if flag is not None else os.environ.get(CLUSTER_KEY_ENV)
    key = (key or "").strip()
    return key or None


def cluster_headers(key: str | None) -> dict[str, str]:
    """The header that carries `key` to a controller or worker; empty when there is no key."""
    return {CLUSTER_KEY_HEADER: key} if key else {}


def post_json(url: str, body: dict | None = None, key: str | None = None, timeout: float = 10) -> requests.Response:
    """POST `body` as JSON with the cluster key; the response as it came (check its status yourself)."""
    return requests.post(url, json=body or {}, headers=cluster_headers(key), timeout=timeout)


def _rejection(status: int, raw: bytes) -> dict:
    if status == 401:
        return {
            "text": f"The server refused the cluster key (401): set --cluster-key or {CLUSTER_KEY_ENV}.",
            "error_code": int(ErrorCode.BAD_REQUEST),
        }
    try:
        data = json.loads(raw.split(b"\0")[0])
    except ValueError:
        data = None
    if isinstance(data, dict) and "text" in data:
        return {"text": str(data["text"]), "error_code": int(data.get("error_code") or ErrorCode.SERVER_ERROR)}
    code = ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.SERVER_ERROR
    return {"text": f"The server answered HTTP {status}.", "error_code": int(code)}


def stream_worker(
    url: str, body: dict, key: str | None = None, timeout: float | tuple[float, float] = (10, 300)
) -> Iterator[dict]:
    """POST a generation request and yield its parsed chunks (see the module docstring)."""
    with requests.post(url, json=body, headers=cluster_headers(key), stream=True, timeout=timeout) as response:
        if response.status_code != 200:
            yield _rejection(response.status_code, response.content)
            return
        yield from iter_chunks(response.iter_content(chunk_size=None))


async def apost_json(client, url: str, body: dict | None = None, key: str | None = None, timeout=None):
    """`post_json` on an `httpx.AsyncClient`."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    return await client.post(url, json=body or {}, headers=cluster_headers(key), **kwargs)


async def astream_open(client, url: str, body: dict, key: str | None = None):
    """Open a streamed POST with the cluster key; the caller reads and closes the `httpx.Response`."""
    request = client.build_request("POST", url, json=body, headers=cluster_headers(key))
    return await client.send(request, stream=True)


async def astream_worker(client, url: str, body: dict, key: str | None = None) -> AsyncIterator[dict]:
    """`stream_worker` on an `httpx.AsyncClient`."""
    response = await astream_open(client, url, body, key)
    try:
        if response.status_code != 200:
            yield _rejection(response.status_code, await response.aread())
            return
        async for data in aiter_chunks(response.aiter_raw()):
            yield data
    finally:
        await response.aclose()
