"""The worker streaming protocol: JSON chunks ended by NUL, error codes, and readers for both sides.

A streamed reply is a sequence of `json.dumps({"text": ..., "error_code": ...}).encode() + b"\\0"` chunks, where
`text` is the prompt plus everything generated so far (as in the original LLaVA). Our workers add `finish_reason`
and `usage` to the last chunk; clients that do not know them ignore them. A request rejected before streaming
starts gets a single plain JSON object `{"text": <message>, "error_code": n}` with a 4xx/5xx status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from enum import IntEnum


class ErrorCode(IntEnum):
    """`error_code` values in stream chunks (documented in docs/API.md)."""

    OK = 0
    BAD_REQUEST = 1  # malformed JSON, bad parameters, bad image, image count, prompt too long
    SERVER_ERROR = 2  # no worker serves the model, a worker is unreachable, generation failed
    OVERLOADED = 3  # out of memory, or the worker's queue is full: retry later or send less


# HTTP status for a rejection before streaming starts.
HTTP_STATUS = {ErrorCode.BAD_REQUEST: 400, ErrorCode.SERVER_ERROR: 503, ErrorCode.OVERLOADED: 503}


class ServeError(Exception):
    """A request that cannot be served; carries the protocol error code and the HTTP status to answer with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = ErrorCode(code)
        self.status = status or HTTP_STATUS.get(self.code, 500)

    def body(self) -> dict:
        return {"text": self.message, "error_code": int(self.code)}


def encode_chunk(text: str, error_code: int = ErrorCode.OK, **extra) -> bytes:
    """One stream chunk: JSON followed by NUL."""
    return json.dumps({"text": text, "error_code": int(error_code), **extra}).encode() + b"\0"


def _parse(piece: bytes) -> dict:
    try:
        data = json.loads(piece.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return {"text": f"Malformed chunk from the worker: {err} ({piece[:80]!r}).", "error_code": 2}
    if not isinstance(data, dict):
        return {"text": f"Malformed chunk from the worker: {piece[:80]!r}.", "error_code": 2}
    return data


def iter_chunks(pieces: Iterable[bytes]) -> Iterator[dict]:
    """Parse a NUL-delimited stream given as arbitrary byte pieces (a trailing chunk without NUL counts too)."""
    buffer = b""
    for piece in pieces:
        buffer += piece
        *done, buffer = buffer.split(b"\0")
        for chunk in done:
            if chunk.strip():
                yield _parse(chunk)
    if buffer.strip():
        yield _parse(buffer)


async def aiter_chunks(pieces: AsyncIterator[bytes]) -> AsyncIterator[dict]:
    """`iter_chunks` for an async byte stream (httpx `aiter_bytes`)."""
    buffer = b""
    async for piece in pieces:
        buffer += piece
        *done, buffer = buffer.split(b"\0")
        for chunk in done:
            if chunk.strip():
                yield _parse(chunk)
    if buffer.strip():
        yield _parse(buffer)
