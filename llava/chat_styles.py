"""Separator styles, each described once as data: the prompt renderer (`llava.conversation`) and the Hugging Face
chat-template export (`llava.chat_template`) are both derived from these descriptions."""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Any

CHATML_SYSTEM_HEADER = "<|im_start|>system\n"


class SeparatorStyle(Enum):
    """How a template joins the system prompt, role tags and messages (each described once in `STYLES`)."""

    SINGLE = auto()  # "system###Human: hi###Assistant: hello###"
    TWO = auto()  # vicuna v1: "system USER: hi ASSISTANT: hello</s>"
    MPT = auto()  # ChatML with the tags inside `system`/`roles`: "<|im_start|>user\nhi<|im_end|>"
    PLAIN = auto()  # no roles: "<image>caption\n"
    LLAMA_2 = auto()  # "[INST] <<SYS>>\nsystem\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] ..."
    LLAMA_3 = auto()  # "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    CHATML = auto()  # Qwen2: "<|im_start|>user\nhi<|im_end|>\n"


# -------------------------------------------------------------------- separator styles, described once


class Part(Enum):
    """A value a style's text takes from the conversation (a plain `str` piece is fixed text)."""

    SYSTEM = auto()  # the system prompt
    ROLE = auto()  # the role of the turn being rendered
    CONTENT = auto()  # the message itself (used by the Jinja export; the renderer appends the text)
    SEP = auto()
    SEP2 = auto()


@dataclasses.dataclass(frozen=True)
class Word:
    """Fixed text that stands where a role would (Llama-3's `system` header): data, not layout."""

    text: str


Piece = str | Part | Word
Parts = tuple[Piece, ...]


@dataclasses.dataclass(frozen=True)
class StyleSpec:
    """How one separator style lays out a conversation.

    A finished turn is `head + message + end + trailer`; `end` follows an assistant reply and is supervised with it.
    An open turn (its message None or "") is `open`: the generation prompt. `Conversation.get_prompt_segments`
    and the Hugging Face chat template (`llava.chat_template`) are both derived from this description.
    """

    system: Parts  # the system block, before the turns (or inside the first user turn, see `first_user_head`)
    user_head: Parts
    assistant_head: Parts
    user_end: Parts
    assistant_end: Parts
    open: Parts
    trailer: Parts = ()  # after each finished turn, never supervised
    system_optional: bool = False  # no system block when the system prompt is empty
    first_user_head: Parts | None = None  # the first user turn's head, when it differs; the system block follows it
    unanswered_user_end: Parts | None = None  # ends a user turn that no reply follows, instead of `user_end`
    user_first: bool = False  # the conversation must open with a non-empty user turn


def _same_heads(head: Parts, open: Parts, **rest: Any) -> StyleSpec:
    return StyleSpec(user_head=head, assistant_head=head, open=open, **rest)


_LLAMA_3_HEAD = ("<|start_header_id|>", Part.ROLE, "<|end_header_id|>\n\n")
_CHATML_HEAD = ("<|im_start|>", Part.ROLE, "\n")
SYSTEM, SEP, SEP2 = Part.SYSTEM, Part.SEP, Part.SEP2

STYLES: dict[SeparatorStyle, StyleSpec] = {
    SeparatorStyle.SINGLE: _same_heads(
        (Part.ROLE, ": "), (Part.ROLE, ":"), system=(SYSTEM, SEP), user_end=(SEP,), assistant_end=(SEP,)
    ),
    SeparatorStyle.TWO: _same_heads(
        (Part.ROLE, ": "), (Part.ROLE, ":"), system=(SYSTEM, SEP), user_end=(SEP,), assistant_end=(SEP2,)
    ),
    # The roles are the ChatML tags themselves ("<|im_start|>user\n"); no newline between turns, as the original.
    SeparatorStyle.MPT: _same_heads(
        (Part.ROLE,), (Part.ROLE,), system=(SYSTEM, SEP), user_end=(SEP,), assistant_end=(SEP,)
    ),
    # Training (`preprocess_plain` in the original) joins the image and its caption directly (`sep` is empty); a
    # user turn that no reply follows is a prompt, which the original ends with a newline (its `sep="\n"`).
    SeparatorStyle.PLAIN: _same_heads(
        (), (), system=(SYSTEM,), user_end=(SEP,), assistant_end=(SEP2,), unanswered_user_end=(SEP2,)
    ),
    # " reply </s>": the original puts a space on both sides of the reply. Every user turn but the first starts
    # with `sep` ("<s>"); the original added it to the first one too and then stripped it with `lstrip`.
    SeparatorStyle.LLAMA_2: StyleSpec(
        system=("<<SYS>>\n", SYSTEM, "\n<</SYS>>\n\n"),
        system_optional=True,
        first_user_head=("[INST] ",),
        user_head=(SEP, "[INST] "),
        assistant_head=(" ",),
        user_end=(" [/INST]",),
        assistant_end=(" ", SEP2),
        open=(),  # the prompt already ends with [/INST]
        user_first=True,
    ),
    SeparatorStyle.LLAMA_3: _same_heads(
        _LLAMA_3_HEAD,
        _LLAMA_3_HEAD,
        system=(_LLAMA_3_HEAD[0], Word("system"), _LLAMA_3_HEAD[2], SYSTEM, SEP),
        system_optional=True,
        user_end=(SEP,),
        assistant_end=(SEP,),
    ),
    # The newline after <|im_end|> separates turns; it is not part of the reply, so it is not supervised.
    SeparatorStyle.CHATML: _same_heads(
        _CHATML_HEAD,
        _CHATML_HEAD,
        system=(CHATML_SYSTEM_HEADER, SYSTEM, SEP, "\n"),
        system_optional=True,
        user_end=(SEP,),
        assistant_end=(SEP,),
        trailer=("\n",),
    ),
}


__all__ = ["CHATML_SYSTEM_HEADER", "STYLES", "Part", "Parts", "SeparatorStyle", "StyleSpec", "Word"]
