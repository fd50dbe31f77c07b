"""Where image markers go in a prompt: the one policy that training, serving and the chat templates share.

A model sees each image where its prompt holds the marker `<image>` (`tokenizer_image_token` turns it into
IMAGE_TOKEN_INDEX). What surrounds that marker, and where it stands, is decided here and nowhere else:

- the marker's own text (`image_marker_text`): bare `<image>`, inside `<im_start>`/`<im_end>` for models trained with
  `mm_use_im_start_end`, inside `<Image></Image>` for templates whose `mmtag` field is set (the `*_mmtag` ones);
- a question asked at inference (`place_image_markers`): one `<image>\\n` per image before the text when the text
  has no marker of its own, as the original's CLI and eval scripts did; `mmtag` templates wrap it as training does,
  unless `wrap_mmtag=False` asks for the original's CLI and eval scripts' bare marker;
- a training conversation (`place_training_image_markers`): the single marker of a one-image record moves to the
  front (`<image>\\n` + text), the layout LLaVA-1.5 was trained with; `plain`-style templates keep only the markers
  of a user turn;
- an image content part of a chat message (`content_text`, `IMAGE_PART_TEXT`): `<image>\\n`, as the exported Jinja
  chat template and the OpenAI-compatible server render it;
- an image uploaded in the web UI (`web_image_turns`): the image goes first in its turn; `mmtag` templates give it
  a turn of its own that the assistant acknowledges, as the original's `get_prompt` did.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN

if TYPE_CHECKING:
    from llava.conversation import Conversation

# How one image content part of a chat message renders (Jinja chat template, OpenAI API): the marker, a newline.
IMAGE_PART_TEXT = DEFAULT_IMAGE_TOKEN + "\n"
MMTAG_OPEN, MMTAG_CLOSE = "<Image>", "</Image>"
# The assistant's reply to an image-only turn of an `mmtag` template in the web UI (the original's words).
MMTAG_ACK = "Received."


def image_marker_text(*, mmtag: bool = False, mm_use_im_start_end: bool = False) -> str:
    """The text that stands for one image: `<image>`, wrapped in `<im_start>`/`<im_end>` and then in
    `<Image></Image>` as the flags say (`<Image><im_start><image><im_end></Image>` with both)."""
    marker = DEFAULT_IMAGE_TOKEN
    if mm_use_im_start_end:
        marker = DEFAULT_IM_START_TOKEN + marker + DEFAULT_IM_END_TOKEN
    if mmtag:
        marker = MMTAG_OPEN + marker + MMTAG_CLOSE
    return marker


def wrap_image_markers(text: str, *, mmtag: bool = False, mm_use_im_start_end: bool = False) -> str:
    """`text` with every `<image>` replaced by `image_marker_text(...)`.

    Idempotent: markers already in exactly that wrapped form are kept as they are, not wrapped twice.
    """
    wrapped = image_marker_text(mmtag=mmtag, mm_use_im_start_end=mm_use_im_start_end)
    if wrapped == DEFAULT_IMAGE_TOKEN:
        return text
    return text.replace(wrapped, DEFAULT_IMAGE_TOKEN).replace(DEFAULT_IMAGE_TOKEN, wrapped)


def _template(template: Conversation | str | None) -> Conversation | None:
    if template is None or not isinstance(template, str):
        return template
    from llava.conversation import conv_templates  # conversation imports this module: look up at call time

    return conv_templates.get(template)  # None: not a registered template (e.g. the tokenizer's chat template)


def _is_plain(template: Conversation | None) -> bool:
    from llava.conversation import SeparatorStyle

    return template is not None and template.sep_style is SeparatorStyle.PLAIN


def place_image_markers(
    question: str,
    n_images: int,
    *,
    template: Conversation | str | None = None,
    mm_use_im_start_end: bool = False,
    wrap_mmtag: bool = True,
) -> str:
    """A user question for inference with `n_images` images, markers placed and wrapped as the model expects.

    A question without `<image>` gets `n_images` times `<image>\\n` before it (the original's CLI and eval layout);
    a question that has markers keeps them where they are. `template` (a `Conversation` or a registered name)
    decides `mmtag` wrapping; `mm_use_im_start_end` comes from the model's config. `wrap_mmtag=False` leaves the
    marker out of `<Image></Image>` even for an `mmtag` template: the original's CLI and eval scripts sent the
    question as a plain string, which its `get_prompt` does not rewrite (only training and the web UI wrapped it).
    """
    conv = _template(template)
    if n_images and DEFAULT_IMAGE_TOKEN not in question:
        question = IMAGE_PART_TEXT * n_images + question
    mmtag = wrap_mmtag and conv is not None and conv.mmtag
    return wrap_image_markers(question, mmtag=bool(mmtag), mm_use_im_start_end=mm_use_im_start_end)


def place_training_image_markers(
    messages: Sequence[tuple[str, str]],
    num_images: int,
    *,
    template: Conversation | str | None = None,
    mm_use_im_start_end: bool = False,
) -> list[tuple[str, str]]:
    """`(role, text)` messages of a training record with their markers placed as the original LLaVA trained.

    A record with a single image has its marker moved to the start of its message (`<image>\\n` + text); with
    several images each marker stays where the record put it. A `plain`-style template (stage 1) reduces every
    user turn to its markers alone, so only the caption is text. Markers are then wrapped as
    `image_marker_text` says for `template` (`mmtag`) and `mm_use_im_start_end`. `template` None (or a name that
    is not registered, such as the tokenizer's own chat template) means: no `plain` reduction, no `mmtag`.
    """
    conv = _template(template)
    plain = _is_plain(conv)
    mmtag = bool(conv is not None and conv.mmtag)
    out = []
    for role, text in messages:
        count = text.count(DEFAULT_IMAGE_TOKEN)
        if plain and role == "user":
            text = DEFAULT_IMAGE_TOKEN * count
        elif count == 1 and num_images == 1:
            text = (IMAGE_PART_TEXT + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
        if count:
            text = wrap_image_markers(text, mmtag=mmtag, mm_use_im_start_end=mm_use_im_start_end)
        out.append((role, text))
    return out


def web_image_turns(text: str, *, mmtag: bool = False) -> list[str]:
    """The texts a web-UI turn with an uploaded image renders as, alternating user/assistant from the user.

    The image goes first, whatever the user typed around `<image>`: one turn `<image>\\n` + text; `mmtag` templates
    show the image in a turn of its own, acknowledged by the assistant, then the text (the original's layout).
    """
    text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    if mmtag:
        return [image_marker_text(mmtag=True), MMTAG_ACK, text]
    return [IMAGE_PART_TEXT + text]


def content_text(parts: Iterable[tuple[str, str]], *, compact: bool = False) -> str:
    """The text of a message given as `(kind, value)` parts, kind `image` or `text`, with one marker per image.

    Each image part is `IMAGE_PART_TEXT` (`<image>\\n`), as the exported Jinja chat template and the OpenAI server
    render it. `compact` (training records in the HF `messages` format) writes the bare marker and puts a newline
    only between an image and non-empty text that follows it without one.
    """
    text, after_image = "", False
    for kind, value in parts:
        if kind == "image":
            text += DEFAULT_IMAGE_TOKEN if compact else IMAGE_PART_TEXT
            after_image = True
        elif kind == "text":
            needs_newline = compact and after_image and value and not value.startswith("\n")
            text += ("\n" if needs_newline else "") + value
            after_image = False
        else:
            raise ValueError(f"Unknown content part kind `{kind}`; expected `image` or `text`.")
    return text


__all__ = [
    "IMAGE_PART_TEXT",
    "MMTAG_ACK",
    "content_text",
    "image_marker_text",
    "place_image_markers",
    "place_training_image_markers",
    "web_image_turns",
    "wrap_image_markers",
]
