"""Chat templates as data: the `Conversation` object, the template registry and the prompt renderers."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable, Sequence
from enum import Enum, auto
from io import BytesIO
from typing import TYPE_CHECKING, Any

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.prompting import IMAGE_PART_TEXT, web_image_turns

if TYPE_CHECKING:
    from PIL import Image

# A message is plain text, an image tuple `(text, PIL.Image, image_process_mode)` as the web UI sends it, or None
# for the open turn the model is about to write.
Message = Any
# A piece of the rendered prompt and whether the loss is computed on it.
Segment = tuple[str, bool]

IMAGE_PROCESS_MODES = ("Crop", "Resize", "Pad", "Default")
PAD_BACKGROUND = (122, 116, 104)
_CHATML_SYSTEM_HEADER = "<|im_start|>system\n"


class SeparatorStyle(Enum):
    """How a template joins the system prompt, role tags and messages."""

    SINGLE = auto()  # "system###Human: hi###Assistant: hello###"
    TWO = auto()  # vicuna v1: "system USER: hi ASSISTANT: hello</s>"
    MPT = auto()  # ChatML with the tags inside `system`/`roles`: "<|im_start|>user\nhi<|im_end|>"
    PLAIN = auto()  # no roles: "<image>caption\n"
    LLAMA_2 = auto()  # "[INST] <<SYS>>\nsystem\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] ..."
    LLAMA_3 = auto()  # "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    CHATML = auto()  # Qwen2: "<|im_start|>user\nhi<|im_end|>\n"


@dataclasses.dataclass(frozen=True)
class _Turn:
    role: str
    text: str | None  # None or "" renders the open turn: the role tag alone
    assistant: bool  # by position, as the original: even turns are the user's, odd ones the assistant's
    trainable: bool  # a real reply (not a few-shot example or a synthetic mmtag turn)


@dataclasses.dataclass
class Conversation:
    """A chat template plus the messages of one conversation.

    Templates in `conv_templates` hold their messages in a tuple, so they cannot be changed by accident; call
    `.copy()` (or `get_conv_template`) to get a conversation you can append to.
    """

    system: str
    roles: tuple[str, str]
    messages: Sequence[Sequence[Message]] = ()
    offset: int = 0  # turns before this index are few-shot examples: never shown in the UI or supervised
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False
    # What generation stops on besides EOS (None: EOS alone ends a reply).
    stop_str: str | None = None
    # Images shown as `<Image><image></Image>` (the `*_mmtag` templates); see `llava.prompting`.
    mmtag: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sep_style, SeparatorStyle):
            raise ValueError(
                f"Unknown sep_style `{self.sep_style}`; expected one of {[s.name for s in SeparatorStyle]}."
            )
        if len(self.roles) != 2:
            raise ValueError(f"`roles` must name exactly 2 roles (user, assistant), got {self.roles!r}.")
        self.roles = tuple(self.roles)

    # ---------------------------------------------------------------- rendering

    def get_prompt(self) -> str:
        """The prompt text the model sees, exactly as the original LLaVA rendered it."""
        return "".join(text for text, _ in self.get_prompt_segments())

    def get_prompt_segments(self) -> list[Segment]:
        """`get_prompt()` cut into consecutive pieces, each flagged True when the loss is computed on it.

        Supervised pieces are exactly the assistant replies plus the end-of-turn string that follows each one;
        role tags, user turns, system prompt and few-shot examples are not supervised.
        """
        segments = _RENDERERS[self.sep_style](self, self._turns())
        merged: list[Segment] = []
        for text, supervised in segments:
            if not text:
                continue
            if merged and merged[-1][1] == supervised:
                merged[-1] = (merged[-1][0] + text, supervised)
            else:
                merged.append((text, supervised))
        return merged

    def _turns(self) -> list[_Turn]:
        pairs = [(role, _text_of(message)) for role, message in self.messages]
        trainable = [i % 2 == 1 and i >= self.offset for i in range(len(pairs))]
        if self.messages and isinstance(self.messages[0][1], tuple):
            # A web-UI image turn: `llava.prompting` places the image (mmtag templates add two synthetic turns).
            role, text = pairs[0]
            *synthetic, text = web_image_turns(text, mmtag=self.mmtag)
            pairs = [(self.roles[i % 2], t) for i, t in enumerate(synthetic)] + [(role, text), *pairs[1:]]
            trainable = [False] * len(synthetic) + trainable
        return [
            _Turn(role, text, assistant=i % 2 == 1, trainable=train)
            for i, ((role, text), train) in enumerate(zip(pairs, trainable, strict=True))
        ]

    # ---------------------------------------------------------------- editing

    def append_message(self, role: str, message: Message) -> None:
        """Append `[role, message]`; `message` is text, an image tuple, or None for the turn to generate."""
        if not isinstance(self.messages, list):
            raise TypeError(
                "This conversation is a shared template whose messages are read-only; "
                "call `.copy()` or `get_conv_template(name)` first."
            )
        self.messages.append([role, message])

    def set_system_message(self, message: str) -> None:
        """Replace the system prompt, keeping the ChatML header that MPT-style templates keep inside `system`."""
        self.system = _system_header(self) + message

    def copy(self) -> Conversation:
        """A deep-enough copy: its own message list (image objects are shared, they are never modified)."""
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages])

    def dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary; image tuples are reduced to their text."""
        return {
            "system": self.system,
            "roles": list(self.roles),
            "messages": [[role, _text_of(message)] for role, message in self.messages],
            "offset": self.offset,
            "sep_style": self.sep_style.name,
            "sep": self.sep,
            "sep2": self.sep2,
            "version": self.version,
        }

    # ---------------------------------------------------------------- generation

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end a reply for `tokenizer`: its EOS, plus `stop_str` when that is one added token."""
        ids: list[int] = []
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            ids.append(eos)
        if self.stop_str:
            token_id = tokenizer.get_added_vocab().get(self.stop_str)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    # ---------------------------------------------------------------- images and UI

    def get_images(self, return_pil: bool = False, max_len: int = 1344, min_len: int = 672) -> list[Any]:
        """The images of the user turns, processed by their mode and shrunk as the original's HEAD does (only
        when the longest side is over `max_len`; see `process_image`).

        Returns PIL images when `return_pil`, else base64-encoded PNG strings.
        """
        images = []
        for i, (_, message) in enumerate(self.messages[self.offset :]):
            if i % 2 == 0 and isinstance(message, tuple):
                _, image, mode = message
                image = process_image(image, mode, max_len=max_len, min_len=min_len)
                images.append(image if return_pil else _to_base64_png(image))
        return images

    def to_gradio_chatbot(self, max_len: int = 1344, min_len: int = 672) -> list[dict[str, str]]:
        """The conversation in Gradio's messages format; an image shows as an inline `<img>` before its text."""
        chat = []
        for i, (_, message) in enumerate(self.messages[self.offset :]):
            if message is None:
                continue  # the turn still being generated
            role = "user" if i % 2 == 0 else "assistant"
            if isinstance(message, tuple):
                text, image, _ = message
                image = process_image(image, "Default", max_len=max_len, min_len=min_len)
                img = f'<img src="data:image/png;base64,{_to_base64_png(image)}" alt="user upload image" />'
                message = img + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            chat.append({"role": role, "content": message})
        return chat


def _text_of(message: Message) -> Any:
    return message[0] if isinstance(message, tuple) else message


def _system_header(conv: Conversation) -> str:
    # MPT-style templates (mpt, chatml_direct) carry the ChatML system header inside `system` itself.
    if conv.sep_style is SeparatorStyle.MPT and conv.system.startswith(_CHATML_SYSTEM_HEADER):
        return _CHATML_SYSTEM_HEADER
    return ""


# -------------------------------------------------------------------- renderers, one per separator style


def _reply(head: str, turn: _Turn, end: str, trailer: str = "") -> list[Segment]:
    """A finished turn: `head` (role tag) + text + `end` (end-of-turn) + `trailer` (formatting between turns)."""
    supervised = turn.assistant and turn.trainable
    return [(head, False), (turn.text + end, supervised), (trailer, False)]


def _render_single(conv: Conversation, turns: list[_Turn]) -> list[Segment]:
    segments = [(conv.system + conv.sep, False)]
    for turn in turns:
        segments += _reply(turn.role + ": ", turn, conv.sep) if turn.text else [(turn.role + ":", False)]
    return segments


def _render_two(conv: Conversation, turns: list[_Turn]) -> list[Segment]:
    segments = [(conv.system + conv.sep, False)]
    for turn in turns:
        end = conv.sep2 if turn.assistant else conv.sep
        segments += _reply(turn.role + ": ", turn, end) if turn.text else [(turn.role + ":", False)]
    return segments


def _render_mpt(conv: Conversation, turns: list[_Turn]) -> list[Segment]:
    # The roles are the ChatML tags themselves ("<|im_start|>user\n"); no newline between turns, as the original.
    segments = [(conv.system + conv.sep, False)]
    for turn in turns:
        segments += _reply(turn.role, turn, conv.sep) if turn.text else [(turn.role, False)]
    return segments


def _render_plain(conv: Conversation, turns: list[_Turn]) -> list[Segment]:
    segments = [(conv.system, False)]
    for i, turn in enumerate(turns):
        if not turn.text:
            continue
        if turn.assistant:
            segments += _reply("", turn, conv.sep2)
            continue
        # Training (`preprocess_plain` in the original) joins the image and its caption directly; a user turn that
        # no reply follows is a prompt, which the original ends with a newline (its get_prompt: `sep="\n"`).
        replied = i + 1 < len(turns) and bool(turns[i + 1].text)
        segments += _reply("", turn, conv.sep if replied else conv.sep2)
    return segments


def _render_llama_2(conv: Conversation, turns: list[_Turn]) -> list[Segment]:
    if turns and (not turns[0].text or turns[0].role != conv.roles[0]):
        raise ValueError(f"A `{conv.sep_style.name}` conversation must open with a non-empty `{conv.roles[0]}` turn.")
    segments: list[Segment] = []
    for i, turn in enumerate(turns):
        if not turn.text:
            continue  # the open assistant turn renders as nothing: the prompt already ends with [/INST]
        if turn.assistant:
            # " reply </s>": the original puts a space on both sides of the reply.
            segments += [(" ", False), *_reply("", turn, " " + conv.sep2)]
            continue
        text = turn.text
        if i == 0 and conv.system:
            text = f"<<SYS>>\n{conv.system}\n<</SYS>>\n\n{text}"
        # Every user turn but the first starts with `sep` ("<s>"); the original added it to the first one too and
        # then stripped it with `lstrip`, which is the same string since "[" follows.
        lead = "" if i == 0 else conv.sep
        segments.append((f"{lead}[INST] {text} [/INST]", False))
    return segments


def _render_llama_3(conv: Conversation, turns: list[_Turn]) -> list[Segment]:
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    segments = [(header("system") + conv.system + conv.sep, False)] if conv.system else []
    for turn in turns:
        segments += _reply(header(turn.role), turn, conv.sep) if turn.text else [(header(turn.role), False)]
    return segments


def _render_chatml(conv: Conversation, turns: list[_Turn]) -> list[Segment]:
    segments = [(f"<|im_start|>system\n{conv.system}{conv.sep}\n", False)] if conv.system else []
    for turn in turns:
        head = f"<|im_start|>{turn.role}\n"
        # The newline after <|im_end|> separates turns; it is not part of the reply, so it is not supervised.
        segments += _reply(head, turn, conv.sep, "\n") if turn.text else [(head, False)]
    return segments


_RENDERERS: dict[SeparatorStyle, Callable[[Conversation, list[_Turn]], list[Segment]]] = {
    SeparatorStyle.SINGLE: _render_single,
    SeparatorStyle.TWO: _render_two,
    SeparatorStyle.MPT: _render_mpt,
    SeparatorStyle.PLAIN: _render_plain,
    SeparatorStyle.LLAMA_2: _render_llama_2,
    SeparatorStyle.LLAMA_3: _render_llama_3,
    SeparatorStyle.CHATML: _render_chatml,
}


# -------------------------------------------------------------------- images


def process_image(image: Image.Image, mode: str, max_len: int = 1344, min_len: int = 672) -> Image.Image:
    """Apply the web UI's `image_process_mode`, then, only when the longest side is over `max_len` (the original's
    HEAD rule, sized for anyres models), shrink keeping the aspect ratio: the short side becomes the smallest of
    `max_len / aspect`, `min_len` and itself."""
    if mode == "Pad":
        image = _expand_to_square(image.convert("RGB"), PAD_BACKGROUND)
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


def _expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _to_base64_png(image: Image.Image) -> str:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# -------------------------------------------------------------------- templates

_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The missing space in "language.The" is in the original and in every checkpoint trained with it.
_SYSTEM_MMTAG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_SYSTEM_LLAVA = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
# Llama-2-chat's default system prompt (note the double space after "safe.").
_SYSTEM_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_VICUNA_V0_EXAMPLES = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    (
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively "
        "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
        "Non-renewable energy sources, on the other hand, are finite and will eventually be "
        "depleted, such as coal, oil, and natural gas. Here are some key differences between "
        "renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
        "energy sources are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
        "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
        "and other negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
        "have lower operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
        "locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
        "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
        "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
    ),
)

conv_vicuna_v0 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    messages=_VICUNA_V0_EXAMPLES,
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    stop_str="###",
)
conv_vicuna_v1 = Conversation(
    system=_SYSTEM_USER,
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
    stop_str="</s>",
)
conv_llama_2 = Conversation(
    system=_SYSTEM_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
    stop_str="</s>",
)
conv_llava_llama_2 = dataclasses.replace(conv_llama_2, system=_SYSTEM_LLAVA)
conv_mistral_instruct = dataclasses.replace(conv_llama_2, system="", sep="")
conv_mpt = Conversation(
    system=_CHATML_SYSTEM_HEADER
    + "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
    stop_str="<|im_end|>",
)
conv_chatml_direct = dataclasses.replace(conv_mpt, system=_CHATML_SYSTEM_HEADER + "Answer the questions.")
# Pretraining format: the user turn (just the image) is followed directly by the caption and a newline.
conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    sep_style=SeparatorStyle.PLAIN,
    sep="",
    sep2="\n",
    version="plain",
    stop_str="\n",
)
conv_llava_v0 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    stop_str="###",
)
conv_llava_v0_mmtag = dataclasses.replace(conv_llava_v0, system=_SYSTEM_MMTAG, version="v0_mmtag", mmtag=True)
conv_llava_v1 = dataclasses.replace(conv_vicuna_v1, system=_SYSTEM_HUMAN)
conv_llava_v1_mmtag = dataclasses.replace(conv_vicuna_v1, system=_SYSTEM_MMTAG, version="v1_mmtag", mmtag=True)
conv_llama_3 = Conversation(
    system=_SYSTEM_LLAVA,
    roles=("user", "assistant"),
    sep_style=SeparatorStyle.LLAMA_3,
    sep="<|eot_id|>",
    version="llama_3",
    stop_str="<|eot_id|>",
)
conv_qwen_2 = Conversation(
    system="You are a helpful assistant.",
    roles=("user", "assistant"),
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
    version="qwen_2",
    stop_str="<|im_end|>",
)

# Never modified at run time: look templates up with `get_conv_template`, which returns a copy.
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
    "llama_3": conv_llama_3,
    "qwen_2": conv_qwen_2,
}
default_conversation = conv_vicuna_v1


class UnknownTemplateError(KeyError, ValueError):
    """An unknown conversation template name (a KeyError for dict-style callers, a ValueError for the rest)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would print the message wrapped in quotes


def get_conv_template(name: str) -> Conversation:
    """A fresh, appendable copy of the template registered as `name`."""
    if name not in conv_templates:
        raise UnknownTemplateError(
            f"Unknown conversation template `{name}`; valid names: {sorted(conv_templates)}. "
            "Pass one of them as --conv-mode / conv_template."
        )
    return conv_templates[name].copy()


# -------------------------------------------------------------------- legacy name-based guess

# First match wins; checked against the lower-cased model name.
_NAME_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("llama-2",), "llava_llama_2"),
    (("mistral", "mixtral"), "mistral_instruct"),
    (("v1.6-34b",), "chatml_direct"),
    (("llama-3", "llama3"), "llama_3"),
    (("qwen",), "qwen_2"),
    (("v1",), "llava_v1"),
    (("mpt",), "mpt"),
)


def guess_conv_mode(model_name: str) -> str:
    """The template the original CLI picked from a model's name; only for checkpoints that do not record one."""
    name = model_name.lower()
    mode = next((mode for needles, mode in _NAME_RULES if any(n in name for n in needles)), "llava_v0")
    if mode == "llava_llama_2" and "llava" not in name:
        return "llama_2"  # a text-only Llama-2 chat model
    if "mmtag" in name and mode in ("llava_v0", "llava_v1"):
        return mode.removeprefix("llava_") + "_mmtag"
    return mode


# -------------------------------------------------------------------- Hugging Face chat templates

_JINJA_CONTENT_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_PART_TEXT.replace("\n", "\\n") + "' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _lit(text: str | None) -> str:
    """`text` as a Jinja string literal (Jinja unescapes Python/JSON-style escapes)."""
    return json.dumps(text or "", ensure_ascii=False)


def _out(expr: str) -> str:
    return "{{ " + expr + " }}"


def _if_system(expr: str) -> str:
    return "{%- if system -%}" + _out(expr) + "{%- endif -%}"


@dataclasses.dataclass(frozen=True)
class _JinjaParts:
    """Jinja for one style: text before the turns, a user turn, an assistant turn, the generation prompt.

    Turn parts may use `content` (the rendered message) and `loop`; all parts may use `system`.
    """

    prefix: str
    user: str
    assistant: str
    generation: str


def _jinja_single_two(conv: Conversation, user: str, assistant: str) -> _JinjaParts:
    end = _lit(conv.sep2 if conv.sep_style is SeparatorStyle.TWO else conv.sep)
    return _JinjaParts(
        prefix=_out(f"system + {_lit(conv.sep)}"),
        user=_out(f"{user} + ': ' + content + {_lit(conv.sep)}"),
        assistant=_out(f"{assistant} + ': ' + content + {end}"),
        generation=_out(f"{assistant} + ':'"),
    )


def _jinja_mpt(conv: Conversation, user: str, assistant: str) -> _JinjaParts:
    sep = _lit(conv.sep)
    return _JinjaParts(
        prefix=_out(f"system + {sep}"),
        user=_out(f"{user} + content + {sep}"),
        assistant=_out(f"{assistant} + content + {sep}"),
        generation=_out(assistant),
    )


def _jinja_plain(conv: Conversation, user: str, assistant: str) -> _JinjaParts:
    return _JinjaParts(
        prefix=_out("system"),
        user=_out(f"content + {_lit(conv.sep)}"),
        assistant=_out(f"content + {_lit(conv.sep2)}"),
        # The prompt ends with a newline after the user turn, as the original's (see `_render_plain`).
        generation=_out(_lit(conv.sep2)),
    )


def _jinja_llama_2(conv: Conversation, user: str, assistant: str) -> _JinjaParts:
    return _JinjaParts(
        prefix="",
        user="{%- if loop.first -%}"
        + _out("'[INST] '")
        + _if_system("'<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n'")
        + "{%- else -%}"
        + _out(f"{_lit(conv.sep)} + '[INST] '")
        + "{%- endif -%}"
        + _out("content + ' [/INST]'"),
        assistant="{%- if loop.first -%}"
        + _out("raise_exception('The first non-system message must come from the user.')")
        + "{%- endif -%}"
        + _out(f"' ' + content + ' ' + {_lit(conv.sep2)}"),
        generation="",
    )


def _jinja_llama_3(conv: Conversation, user: str, assistant: str) -> _JinjaParts:
    def header(role: str) -> str:
        return f"'<|start_header_id|>' + {role} + '<|end_header_id|>\\n\\n'"

    eot = _lit(conv.sep)
    return _JinjaParts(
        prefix=_if_system(f"{header(_lit('system'))} + system + {eot}"),
        user=_out(f"{header(user)} + content + {eot}"),
        assistant=_out(f"{header(assistant)} + content + {eot}"),
        generation=_out(header(assistant)),
    )


def _jinja_chatml(conv: Conversation, user: str, assistant: str) -> _JinjaParts:
    end = f"{_lit(conv.sep)} + '\\n'"
    return _JinjaParts(
        prefix=_if_system(f"'<|im_start|>system\\n' + system + {end}"),
        user=_out(f"'<|im_start|>' + {user} + '\\n' + content + {end}"),
        assistant=_out(f"'<|im_start|>' + {assistant} + '\\n' + content + {end}"),
        generation=_out(f"'<|im_start|>' + {assistant} + '\\n'"),
    )


_JINJA: dict[SeparatorStyle, Callable[[Conversation, str, str], _JinjaParts]] = {
    SeparatorStyle.SINGLE: _jinja_single_two,
    SeparatorStyle.TWO: _jinja_single_two,
    SeparatorStyle.MPT: _jinja_mpt,
    SeparatorStyle.PLAIN: _jinja_plain,
    SeparatorStyle.LLAMA_2: _jinja_llama_2,
    SeparatorStyle.LLAMA_3: _jinja_llama_3,
    SeparatorStyle.CHATML: _jinja_chatml,
}


def to_chat_template_jinja(name: str) -> str:
    """A Hugging Face chat template (`tokenizer.chat_template`) rendering exactly what `get_prompt()` renders.

    Messages have role "system" / "user" / "assistant"; content is a string or a list of `{"type": "image"}` and
    `{"type": "text", "text": ...}` parts, an image part rendering as "<image>\\n". A leading system message
    replaces the template's system prompt. `add_generation_prompt` opens the assistant turn.
    """
    conv = get_conv_template(name)
    if conv.messages:
        raise ValueError(
            f"Template `{name}` has few-shot example turns baked in and no chat template; "
            "use a template without examples (e.g. `llava_v0` instead of `v0`)."
        )
    parts = _JINJA[conv.sep_style](conv, _lit(conv.roles[0]), _lit(conv.roles[1]))
    unknown_role = "raise_exception('Unknown role `' + message['role'] + '`; expected system/user/assistant.')"
    # Everything is emitted through {{ }} expressions, so Jinja's whitespace trimming never touches the output.
    return (
        _JINJA_CONTENT_MACRO
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        + f"{{%- set system = {_lit(_system_header(conv))} + render(messages[0]['content']) -%}}"
        + "{%- set loop_messages = messages[1:] -%}"
        + f"{{%- else -%}}{{%- set system = {_lit(conv.system)} -%}}{{%- set loop_messages = messages -%}}"
        + "{%- endif -%}"
        + parts.prefix
        + "{%- for message in loop_messages -%}{%- set content = render(message['content']) -%}"
        + "{%- if message['role'] == 'user' -%}"
        + parts.user
        + "{%- elif message['role'] == 'assistant' -%}"
        + parts.assistant
        + "{%- else -%}"
        + _out(unknown_role)
        + "{%- endif -%}{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + parts.generation
        + "{%- endif -%}"
    )
