"""Chat templates as data: the `Conversation` object (rendered from `llava.chat_styles`) and the template registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from llava.chat_styles import CHATML_SYSTEM_HEADER, STYLES, Part, Parts, SeparatorStyle, Word
from llava.prompting import web_image_turns

# A message is plain text, an image tuple `(text, PIL.Image, image_process_mode)` as the web UI sends it, or None
# for the open turn the model is about to write.
Message = Any
# A piece of the rendered prompt and whether the loss is computed on it.
Segment = tuple[str, bool]

# The `image_process_mode` values an image tuple may carry (applied by `llava.serve.gradio_utils.process_image`).
IMAGE_PROCESS_MODES = ("Crop", "Resize", "Pad", "Default")


@dataclasses.dataclass(frozen=True)
class _Turn:
    role: str
    text: str | None  # None or "" renders the open turn
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
        merged: list[Segment] = []
        for text, supervised in self._segments(self._turns()):
            if not text:
                continue
            if merged and merged[-1][1] == supervised:
                merged[-1] = (merged[-1][0] + text, supervised)
            else:
                merged.append((text, supervised))
        return merged

    def text_of(self, parts: Parts, role: str = "") -> str:
        """`parts` of this template's style (`STYLES`) as text, `role` standing for `Part.ROLE`."""
        out = []
        for piece in parts:
            if isinstance(piece, str):
                out.append(piece)
            elif isinstance(piece, Word):
                out.append(piece.text)
            elif piece is Part.SYSTEM:
                out.append(self.system)
            elif piece is Part.ROLE:
                out.append(role)
            elif piece is Part.SEP:
                out.append(self.sep)
            elif piece is Part.SEP2:
                if self.sep2 is None:
                    raise ValueError(f"A `{self.sep_style.name}` template needs `sep2`; this one has none.")
                out.append(self.sep2)
            else:
                raise ValueError(f"`{piece}` has no text of its own here; the renderer appends the message.")
        return "".join(out)

    def _segments(self, turns: list[_Turn]) -> list[Segment]:
        style = STYLES[self.sep_style]
        if style.user_first and turns and (not turns[0].text or turns[0].role != self.roles[0]):
            raise ValueError(
                f"A `{self.sep_style.name}` conversation must open with a non-empty `{self.roles[0]}` turn."
            )
        system = "" if style.system_optional and not self.system else self.text_of(style.system)
        segments = [(system, False)] if style.first_user_head is None else []
        for i, turn in enumerate(turns):
            if not turn.text:
                segments.append((self.text_of(style.open, turn.role), False))
                continue
            if turn.assistant:
                head, end = style.assistant_head, style.assistant_end
            else:
                head, end = style.user_head, style.user_end
                if i == 0 and style.first_user_head is not None:
                    head = (*style.first_user_head, system)
                replied = i + 1 < len(turns) and bool(turns[i + 1].text)
                if style.unanswered_user_end is not None and not replied:
                    end = style.unanswered_user_end
            supervised = turn.assistant and turn.trainable
            segments += [
                (self.text_of(head, turn.role), False),
                (turn.text + self.text_of(end), supervised),
                (self.text_of(style.trailer), False),
            ]
        return segments

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
        self.system = system_header(self) + message

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

    # ---------------------------------------------------------------- web UI (kept here for the original's callers)

    def get_images(self, return_pil: bool = False, max_len: int = 1344, min_len: int = 672) -> list[Any]:
        """The images of the user turns, processed for the web UI: see `llava.serve.gradio_utils.get_images`."""
        from llava.serve import gradio_utils  # the web UI's image handling, loaded only by its callers

        return gradio_utils.get_images(self, return_pil=return_pil, max_len=max_len, min_len=min_len)

    def to_gradio_chatbot(self, max_len: int = 1344, min_len: int = 672) -> list[dict[str, str]]:
        """The conversation in Gradio's messages format: see `llava.serve.gradio_utils.to_gradio_chatbot`."""
        from llava.serve import gradio_utils

        return gradio_utils.to_gradio_chatbot(self, max_len=max_len, min_len=min_len)


def _text_of(message: Message) -> Any:
    return message[0] if isinstance(message, tuple) else message


def system_header(conv: Conversation) -> str:
    """What stays in front of a replaced system prompt: MPT-style templates (mpt, chatml_direct) carry the ChatML
    system header inside `system` itself; the others nothing."""
    if conv.sep_style is SeparatorStyle.MPT and conv.system.startswith(CHATML_SYSTEM_HEADER):
        return CHATML_SYSTEM_HEADER
    return ""


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
    system=CHATML_SYSTEM_HEADER
    + "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
    stop_str="<|im_end|>",
)
conv_chatml_direct = dataclasses.replace(conv_mpt, system=CHATML_SYSTEM_HEADER + "Answer the questions.")
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
conv_llava_v0 = dataclasses.replace(conv_vicuna_v0, messages=(), offset=0)  # v0 without the few-shot examples
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


def to_chat_template_jinja(name: str) -> str:
    """The Hugging Face chat template of template `name` (kept here for callers; see `llava.chat_template`)."""
    from llava.chat_template import to_chat_template_jinja as export  # it reads this module's style descriptions

    return export(name)
