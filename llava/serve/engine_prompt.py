"""A prompt in a LLaVA chat template, with `<image>` markers, turned back into OpenAI chat messages for an engine.

Our clients (web UI, OpenAI API server, test_message, the original's scripts) send a worker the rendered prompt.
An engine (vLLM, SGLang, `transformers serve`) wants chat messages and renders them itself with the chat template of
the checkpoint it serves; for a `convert_hf` export that template renders exactly what `Conversation.get_prompt()`
does, so splitting the prompt into its turns here and rendering them there gives the model the same text. The
split is read off the template itself (its prompt rendered with placeholders), so every registered template without
few-shot turns works without a parser of its own.
"""

from __future__ import annotations

import base64
import io

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.prompting import IMAGE_PART_TEXT
from llava.serve.protocol import ServeError

_SLOT_OPEN, _SLOT_CLOSE = "\ue000", "\ue001"  # private-use characters: never in a real template
_SYSTEM_SLOT = -1
MAX_TURNS = 256  # user turns looked for in one prompt


def _slot(index: int) -> str:
    return f"{_SLOT_OPEN}{index}{_SLOT_CLOSE}"


def _layout(conv_mode: str, n_users: int, own_system: bool) -> list[str | int]:
    """The template's prompt for `n_users` user turns (answered, except the last), as literal text pieces and slot
    numbers (turn index, or `_SYSTEM_SLOT`): [literal, slot, literal, ..., literal]."""
    conv = get_conv_template(conv_mode)
    if own_system:
        conv.set_system_message(_slot(_SYSTEM_SLOT))
    for i in range(n_users):
        conv.append_message(conv.roles[0], _slot(2 * i))
        conv.append_message(conv.roles[1], _slot(2 * i + 1) if i < n_users - 1 else None)
    pieces: list[str | int] = []
    for part in conv.get_prompt().split(_SLOT_OPEN):
        if pieces:
            number, _, part = part.partition(_SLOT_CLOSE)
            pieces.append(int(number))
        pieces.append(part)
    return pieces


def _fill(pieces: list[str | int], prompt: str) -> dict[int, str] | None:
    """The slot texts that make `pieces` render `prompt` (each literal at its first place after the previous one,
    the last at the end), or None when the prompt has another shape."""
    head, tail = pieces[0], pieces[-1]
    if not prompt.startswith(head) or not prompt.endswith(tail) or len(prompt) < len(head) + len(tail):
        return None
    pos, end, values = len(head), len(prompt) - len(tail), {}
    for k in range(1, len(pieces) - 1, 2):
        literal = pieces[k + 1]
        if k + 2 == len(pieces):  # the last slot: up to the template's closing text
            values[pieces[k]] = prompt[pos:end]
            return values
        if not literal:
            return None  # two slots side by side cannot be told apart
        found = prompt.find(literal, pos, end)
        if found < 0:
            return None
        values[pieces[k]] = prompt[pos:found]
        pos = found + len(literal)
    return values


def _own_system(conv_mode: str, system: str | None) -> str | None:
    """`system`, or None when it is what the template says anyway."""
    if system is None:
        return None
    conv, default = get_conv_template(conv_mode), get_conv_template(conv_mode).system
    conv.set_system_message(system)
    return None if conv.system == default else system


def split_prompt(prompt: str, conv_mode: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A prompt rendered with template `conv_mode` (ready for the assistant's reply) as (its system prompt, or None
    when it is the template's own, and its [(role, text)] turns, roles "user"/"assistant", ending with a user turn).

    The most turns that fit win, so a multi-turn history is not read as one long user turn; a system prompt of its
    own is preferred to the template's. Rendering the result with the template gives `prompt` back byte for byte
    (`plain` templates have no role tags, so several turns may read as one). `ServeError` when the prompt is not in
    that template."""
    between = _layout(conv_mode, 2, False)[4]  # what separates an answer from the next question
    most = 1 + (prompt.count(between) if between else 0)
    for n_users in range(min(most, MAX_TURNS), 0, -1):
        for own_system in (True, False):
            values = _fill(_layout(conv_mode, n_users, own_system), prompt)
            if values is None:
                continue
            turns = [("user" if i % 2 == 0 else "assistant", values[i]) for i in range(2 * n_users - 1)]
            return _own_system(conv_mode, values.get(_SYSTEM_SLOT)), turns
    raise ServeError(
        f"The prompt is not in the `{conv_mode}` chat template this worker translates from (--conv-mode); "
        f"it starts with `{prompt[:80]}`."
    )


def content_parts(text: str, image_urls: list[str]) -> str | list[dict]:
    """A user turn's text as OpenAI content: a string without images, else text and `image_url` parts in order.
    The newline after each `<image>` belongs to the image part (`IMAGE_PART_TEXT`, as the exported chat template
    renders it); `image_urls` are consumed from the front."""
    if DEFAULT_IMAGE_TOKEN not in text:
        return text
    parts: list[dict] = []
    for i, piece in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image_url", "image_url": {"url": image_urls.pop(0)}})
            piece = piece.removeprefix(IMAGE_PART_TEXT[len(DEFAULT_IMAGE_TOKEN) :])
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def to_messages(prompt: str, conv_mode: str, image_urls: list[str]) -> list[dict]:
    """The OpenAI chat messages a LLaVA-template prompt holds, one image URL per `<image>` marker."""
    markers = prompt.count(DEFAULT_IMAGE_TOKEN)
    if markers != len(image_urls):
        raise ServeError(f"The prompt has {markers} `{DEFAULT_IMAGE_TOKEN}` markers but {len(image_urls)} images.")
    system, turns = split_prompt(prompt, conv_mode)
    urls = list(image_urls)
    messages = [{"role": "system", "content": system}] if system is not None else []
    for role, text in turns:
        if role == "assistant" and DEFAULT_IMAGE_TOKEN in text:
            raise ServeError("An assistant turn of the prompt holds an image; only user turns can.")
        messages.append({"role": role, "content": content_parts(text, urls) if role == "user" else text})
    return messages


def image_data_url(image) -> str:
    """A decoded (checked, possibly shrunk) image as a lossless PNG data URL: the engine sees our pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
