"""The web UI's image handling for a `Conversation`: the upload modes, the shrink rule, the chat view."""

from __future__ import annotations

import base64
from io import BytesIO
from typing import TYPE_CHECKING, Any

from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import IMAGE_PROCESS_MODES
from llava.image_io import expand2square

if TYPE_CHECKING:
    from llava.conversation import Conversation

PAD_BACKGROUND = (122, 116, 104)


def process_image(image: Image.Image, mode: str, max_len: int = 1344, min_len: int = 672) -> Image.Image:
    """Apply the web UI's `image_process_mode`, then, only when the longest side is over `max_len` (the original's
    HEAD rule, sized for anyres models), shrink keeping the aspect ratio: the short side becomes the smallest of
    `max_len / aspect`, `min_len` and itself."""
    if mode == "Pad":
        image = expand2square(image.convert("RGB"), PAD_BACKGROUND)
    elif mode == "Resize":
        image = image.resize((336, 336))
    elif mode not in ("Default", "Crop"):
        raise ValueError(f"Unknown image_process_mode `{mode}`; expected one of {list(IMAGE_PROCESS_MODES)}.")
    width, height = image.size
    longest, shortest = max(width, height), min(width, height)
    if longest <= max_len:
        return image
    aspect = longest / shortest
    new_short = max(1, int(min(max_len / aspect, min_len, shortest)))
    new_long = max(1, int(new_short * aspect))
    return image.resize((new_short, new_long) if height > width else (new_long, new_short))


def to_base64_png(image: Image.Image) -> str:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def get_images(conv: Conversation, return_pil: bool = False, max_len: int = 1344, min_len: int = 672) -> list[Any]:
    """The images of `conv`'s user turns, processed by their mode and shrunk as the original's HEAD does (only
    when the longest side is over `max_len`; see `process_image`).

    Returns PIL images when `return_pil`, else base64-encoded PNG strings.
    """
    images = []
    for i, (_, message) in enumerate(conv.messages[conv.offset :]):
        if i % 2 == 0 and isinstance(message, tuple):
            _, image, mode = message
            image = process_image(image, mode, max_len=max_len, min_len=min_len)
            images.append(image if return_pil else to_base64_png(image))
    return images


def to_gradio_chatbot(conv: Conversation, max_len: int = 1344, min_len: int = 672) -> list[dict[str, str]]:
    """`conv` in Gradio's messages format; an image shows as an inline `<img>` before its text."""
    chat = []
    for i, (_, message) in enumerate(conv.messages[conv.offset :]):
        if message is None:
            continue  # the turn still being generated
        role = "user" if i % 2 == 0 else "assistant"
        if isinstance(message, tuple):
            text, image, _ = message
            image = process_image(image, "Default", max_len=max_len, min_len=min_len)
            img = f'<img src="data:image/png;base64,{to_base64_png(image)}" alt="user upload image" />'
            message = img + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        chat.append({"role": role, "content": message})
    return chat


__all__ = ["PAD_BACKGROUND", "get_images", "process_image", "to_base64_png", "to_gradio_chatbot"]
