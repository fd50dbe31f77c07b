"""Hugging Face chat templates (Jinja) derived from the separator-style descriptions of `llava.conversation`.

`to_chat_template_jinja(name)` renders exactly what `Conversation.get_prompt()` renders for template `name`. Its
output is stored in exported checkpoints (`tokenizer.chat_template`) and matched by string equality when they are
read back (`llava.model.llava_hf.match_conv_template`), so the text it produces for a template must never change.
"""

from __future__ import annotations

import json

from llava.chat_styles import STYLES, Part, Parts, StyleSpec, Word
from llava.conversation import get_conv_template, system_header
from llava.prompting import IMAGE_PART_TEXT

_CONTENT_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ " + "'" + IMAGE_PART_TEXT.replace("\n", "\\n") + "'" + " }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
_UNKNOWN_ROLE = "raise_exception('Unknown role `' + message['role'] + '`; expected system/user/assistant.')"
_NOT_USER_FIRST = "raise_exception('The first non-system message must come from the user.')"


def _lit(text: str | None) -> str:
    """`text` as a Jinja string literal (Jinja unescapes Python/JSON-style escapes)."""
    return json.dumps(text or "", ensure_ascii=False)


def _fixed(text: str) -> str:
    """A style's fixed text as a single-quoted Jinja literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _out(expr: str) -> str:
    return "{{ " + expr + " }}"


class _Writer:
    """Jinja expressions for the parts of one template's style."""

    def __init__(self, sep: str, sep2: str | None):
        self.values = {Part.SYSTEM: "system", Part.CONTENT: "content", Part.SEP: _lit(sep), Part.SEP2: _lit(sep2)}

    def out(self, parts: Parts, role: str = "") -> str:
        """`{{ a + b + ... }}` for `parts` (`role`: the Jinja literal of the role), or "" when there are none."""
        if not parts:
            return ""
        terms = []
        for piece in parts:
            if isinstance(piece, str):
                terms.append(_fixed(piece))
            elif isinstance(piece, Word):
                terms.append(_lit(piece.text))
            else:
                terms.append(role if piece is Part.ROLE else self.values[piece])
        return _out(" + ".join(terms))

    def system(self, style: StyleSpec) -> str:
        block = self.out(style.system)
        return "{%- if system -%}" + block + "{%- endif -%}" if style.system_optional else block


def _turn_parts(style: StyleSpec, w: _Writer, user: str, assistant: str) -> tuple[str, str, str, str]:
    """Jinja for the text before the turns, a user turn, an assistant turn and the generation prompt."""
    content = (Part.CONTENT,)
    if style.first_user_head is None:
        prefix = w.system(style)
        user_turn = w.out((*style.user_head, *content, *style.user_end, *style.trailer), user)
    else:  # the system block sits inside the first user turn
        prefix = ""
        user_turn = (
            "{%- if loop.first -%}"
            + w.out(style.first_user_head, user)
            + w.system(style)
            + "{%- else -%}"
            + w.out(style.user_head, user)
            + "{%- endif -%}"
            + w.out((*content, *style.user_end, *style.trailer), user)
        )
    assistant_turn = w.out((*style.assistant_head, *content, *style.assistant_end, *style.trailer), assistant)
    if style.user_first:
        assistant_turn = "{%- if loop.first -%}" + _out(_NOT_USER_FIRST) + "{%- endif -%}" + assistant_turn
    # A user turn that no reply follows ends with `unanswered_user_end` (PLAIN). The Jinja form cannot know that
    # while rendering the turn, so the generation prompt adds it (`to_chat_template_jinja` checks `user_end` is
    # empty then, so the text is the same).
    generation = w.out((*style.open, *(style.unanswered_user_end or ())), assistant)
    return prefix, user_turn, assistant_turn, generation


def to_chat_template_jinja(name: str) -> str:
    """A Hugging Face chat template (`tokenizer.chat_template`) rendering exactly what `get_prompt()` renders.

    Messages have role "system" / "user" / "assistant"; content is a string or a list of `{"type": "image"}` and
    `{"type": "text", "text": ...}` parts, an image part rendering as "<image>\\n" (`llava.prompting`). A leading
    system message replaces the template's system prompt. `add_generation_prompt` opens the assistant turn.
    """
    conv = get_conv_template(name)
    if conv.messages:
        raise ValueError(
            f"Template `{name}` has few-shot example turns baked in and no chat template; "
            "use a template without examples (e.g. `llava_v0` instead of `v0`)."
        )
    style = STYLES[conv.sep_style]
    if style.unanswered_user_end is not None and conv.text_of(style.user_end):
        raise ValueError(
            f"Template `{name}` ends an answered user turn with {conv.text_of(style.user_end)!r}, which its "
            "chat-template form cannot tell from an unanswered one; give it an empty `sep`."
        )
    prefix, user_turn, assistant_turn, generation = _turn_parts(
        style, _Writer(conv.sep, conv.sep2), _lit(conv.roles[0]), _lit(conv.roles[1])
    )
    # Everything is emitted through {{ }} expressions, so Jinja's whitespace trimming never touches the output.
    return (
        _CONTENT_MACRO
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        + f"{{%- set system = {_lit(system_header(conv))} + render(messages[0]['content']) -%}}"
        + "{%- set loop_messages = messages[1:] -%}"
        + f"{{%- else -%}}{{%- set system = {_lit(conv.system)} -%}}{{%- set loop_messages = messages -%}}"
        + "{%- endif -%}"
        + prefix
        + "{%- for message in loop_messages -%}{%- set content = render(message['content']) -%}"
        + "{%- if message['role'] == 'user' -%}"
        + user_turn
        + "{%- elif message['role'] == 'assistant' -%}"
        + assistant_turn
        + "{%- else -%}"
        + _out(_UNKNOWN_ROLE)
        + "{%- endif -%}{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + generation
        + "{%- endif -%}"
    )


__all__ = ["to_chat_template_jinja"]
