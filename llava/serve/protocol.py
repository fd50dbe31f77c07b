"""The worker streaming protocol: JSON chunks ended by NUL, error codes, and readers for both sides.

A streamed reply is a sequence of `json.dumps({"text": ..., "error_code": ...}).encode() + b"\\0"` chunks, where
`text` is the prompt plus everything generated so far (as in the original LLaVA). Our workers add `finish_reason`
and `usage` to the last chunk; clients that do not know them ignore them. A request rejected before streaming
starts gets a single plain JSON object `{"text": <message>, "error_code": n}` with a 4xx/5xx status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TypedDict


class ErrorCode(IntEnum):
    """`error_code` values in stream chunks (documented in docs/API.md)."""

    OK = 0
    BAD_REQUEST = 1  # malformed JSON, bad parameters, bad image, image count, prompt too long
    SERVER_ERROR = 2  # no worker serves the model, a worker is unreachable, generation failed
    OVERLOADED = 3  # out of memory, or the worker's queue is full: retry later or send less


class Chunk(TypedDict, total=False):
    """One parsed stream chunk (a plain dict on the wire and in code, typed for readers and checkers)."""

    text: str  # the prompt plus everything generated so far; the message when `error_code` is not 0
    error_code: int
    finish_reason: str  # last chunk only (our workers): "stop" or "length"
    usage: dict  # last chunk only: prompt_tokens, completion_tokens


class Event(Chunk, total=False):
    """What a scheduler tells a request's callback: progress (`text` = the reply so far), then one final event
    with `finished` and either `finish_reason` + `usage` or a non-zero `error_code`."""

    finished: bool


@dataclass(frozen=True)
class ErrorMeaning:
    """How every client presents one error code: the prefix a person reads before the worker's message, the HTTP
    status of a rejection before streaming starts, and of a failure reported inside a stream."""

    prefix: str
    status: int
    stream_status: int


ERRORS = {
    ErrorCode.BAD_REQUEST: ErrorMeaning("The request was rejected: ", 400, 400),
    ErrorCode.SERVER_ERROR: ErrorMeaning("", 503, 500),
    ErrorCode.OVERLOADED: ErrorMeaning("The server is out of memory or overloaded: ", 503, 503),
}
# HTTP status for a rejection before streaming starts.
HTTP_STATUS = {code: meaning.status for code, meaning in ERRORS.items()}


def meaning_of(code: int) -> ErrorMeaning:
    """The `ErrorMeaning` of an error code; unknown codes read as a server error."""
    try:
        return ERRORS[ErrorCode(code)]
    except (ValueError, KeyError):
        return ERRORS[ErrorCode.SERVER_ERROR]


def explain(code: int, message: str) -> str:
    """An error chunk as a person reads it (web UI, test_message)."""
    if not message:
        return f"The worker failed (error_code {code})."
    return meaning_of(code).prefix + message


class ServeError(Exception):
    """A request that cannot be served; carries the protocol error code and the HTTP status to answer with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = ErrorCode(code)
        self.status = status or HTTP_STATUS.get(self.code, 500)

    def body(self) -> dict:
        return {"text": self.message, "error_code": int(self.code)}


def encode_chunk(text: str, error_code: int = ErrorCode.OK, **extra) -> bytes:  # the HTTP edge of a `Chunk`
    """One stream chunk: JSON followed by NUL."""
    return json.dumps({"text": text, "error_code": int(error_code), **extra}).encode() + b"\0"


def _parse(piece: bytes) -> Chunk:
    try:
        data = json.loads(piece.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return {
            "text": f"Malformed chunk from the worker: {err} ({piece[:80]!r}).",
            "error_code": ErrorCode.SERVER_ERROR,
        }
    if not isinstance(data, dict):
        return {"text": f"Malformed chunk from the worker: {piece[:80]!r}.", "error_code": ErrorCode.SERVER_ERROR}
    return data


def iter_chunks(pieces: Iterable[bytes]) -> Iterator[Chunk]:
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


async def aiter_chunks(pieces: AsyncIterator[bytes]) -> AsyncIterator[Chunk]:
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


def rejection_chunk(status: int, raw: bytes, key_hint: str = "--cluster-key") -> Chunk:
    """The error chunk for a request refused before streaming (HTTP `status`, body `raw`): the server's own
    `{"text", "error_code"}` when it sent one; a 401 names the cluster key (`key_hint` says how to set it)."""
    if status == 401:
        return {
            "text": f"The server refused the cluster key (401): set {key_hint}.",
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


def template_from_model_name(model: str) -> str:
    """The chat template the original web UI picks from a model's name (used for workers without /model_details).
    The original names two templates it does not define (`mistral_orca`, `mpt_text`); the nearest ones stand in."""
    name = model.lower()
    unfinetuned_plain = "plain" in name and "finetune" not in name
    if "llava" in name:
        if "llama-2" in name:
            return "llava_llama_2"
        if "mistral" in name or "mixtral" in name:
            return "chatml_direct" if "hermes" in name else "mistral_instruct"
        if "llava-v1.6-34b" in name:
            return "chatml_direct"
        if "v1" in name:
            return "v1_mmtag" if "mmtag" in name or unfinetuned_plain else "llava_v1"
        if "mpt" in name:
            return "mpt"
        return "v0_mmtag" if "mmtag" in name or unfinetuned_plain else "llava_v0"
    if "mpt" in model:
        return "mpt"
    if "llama-2" in model:
        return "llama_2"
    return "vicuna_v1"
