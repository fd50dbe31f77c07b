"""The OpenAI chat API's request side: its error format, request parsing, messages rendered in the model's chat
template, and image URLs resolved for the worker (used by `openai_api_server`).

Generation parameters are read by `llava.inference.params.read_param`, the one check the model worker runs too, so
both accept the same ranges; errors keep OpenAI's format and name the field as the client spelled it.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.inference.params import RequestError, read_param
from llava.mm_utils import ImageLimits, ImageLoadError
from llava.prompting import content_text
from llava.serve.protocol import meaning_of

ROLES = ("system", "developer", "user", "assistant")
# Formats a fetched image may be passed to the worker in as it came (the worker decodes them; anything else, or an
# image the server must shrink first, is decoded here and sent on as lossless PNG).
PASS_THROUGH_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


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


def lost_worker(address: str, err: Exception) -> WorkerUnreachable:
    return WorkerUnreachable(
        address, f"The worker at {address} stopped mid-answer ({type(err).__name__}: {err}); try again."
    )


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


def _param(body: dict, name: str, default, key: str | None = None):
    """A generation parameter through the shared check, its error in OpenAI's format."""
    try:
        return read_param(body, name, default, key=key)
    except RequestError as err:
        raise ApiError(400, str(err), err.field or key or name) from err


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
    if isinstance(stop, list) and not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "`stop` must be a string or a list of up to 16 non-empty strings.", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"`stream` must be true or false, got `{stream!r:.20}`.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object.", "stream_options")
    max_tokens = _param(body, "max_new_tokens", None, "max_completion_tokens")
    return ChatRequest(
        model=model,
        messages=messages,
        temperature=_param(body, "temperature", 1.0),
        top_p=_param(body, "top_p", 1.0),
        max_tokens=_param(body, "max_new_tokens", max_tokens, "max_tokens"),
        stop=_param(body, "stop", []),
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
    """The prompt in template `conv_mode`, ready for the assistant's reply, and the image URLs in marker order
    (each image part becomes a marker where it stands: `llava.prompting.content_text`)."""
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
        images += [value for kind, value in parts if kind == "image"]
        text = content_text(parts)
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


def fetch_image(url: str, limits: ImageLimits) -> str:
    """A remote image as base64 for the worker. Fetched with the address checks of `--allow-image-urls`; an image
    in a common format that needs no shrinking (long side <= --max-image-side) goes on as the bytes it came as
    (the worker checks and decodes it once); any other is decoded here, checked, shrunk, and sent as lossless PNG."""
    from PIL import Image

    from llava.mm_utils import _decode_image, _guarded_download

    try:
        data = _guarded_download(url, limits)
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                (width, height), fmt = header.size, header.format
        except (OSError, ValueError, Image.DecompressionBombError):
            width = height = 0  # not a plain image: the full check below says why
            fmt = None
        small = 0 < width * height <= limits.max_pixels and max(width, height) <= limits.max_side
        if fmt in PASS_THROUGH_FORMATS and small and max(width, height) <= limits.max_aspect_ratio * min(width, height):
            return base64.b64encode(data).decode()
        image = _decode_image(data, url, limits.max_pixels, limits, remote=True)
    except ImageLoadError as err:
        raise ApiError(400, str(err), "messages") from err
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------------------------------------------------------------
# The answer side: worker failures as OpenAI errors, usage, stream events
# ---------------------------------------------------------------------------------------------------------------------


def chunk_error(data: dict) -> ApiError:
    if data.get("lost"):
        return WorkerUnreachable("", data["lost"])
    code = data.get("error_code")
    return ApiError(meaning_of(code).stream_status, data.get("text") or f"The worker failed (error_code {code}).")


def usage_of(final: dict) -> dict:
    usage = final.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens") or 0
    completion_tokens = usage.get("completion_tokens") or 0
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def stream_chunk(completion_id: str, created: int, model: str, choices: list, **extra) -> dict:
    """One `chat.completion.chunk` object."""
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    return {**chunk, "choices": choices, **extra}


def sse(data: dict) -> bytes:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n".encode()
