"""Conversation -> (input_ids, labels), template-driven, in one pass: only assistant replies are supervised.

A conversation is rendered into segments, `(text, supervised)` pairs whose concatenation is the prompt: by a template
of `llava.conversation` (`Conversation.get_prompt_segments()`), or by the tokenizer's own chat template, rendered
message by message. The text is then cut at each `<image>` (exactly as `tokenizer_image_token` cuts a prompt at
inference) and every image-free chunk is tokenized once; each token takes the flag of the segment its characters
come from. When a token would straddle a supervised/unsupervised boundary (a tokenizer that merges across it), that
chunk is tokenized segment by segment instead, so the supervised tokens always decode to exactly the replies.

The space between a role tag and its reply ("ASSISTANT: reply") belongs to the reply: the prompt at inference ends
with "ASSISTANT:", and SentencePiece and byte-level BPE tokenizers both fold that space into the reply's first token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import Conversation, conv_templates
from llava.prompting import place_training_image_markers

CHAT_TEMPLATE = "chat_template"
ROLES = ("system", "user", "assistant")
Segment = tuple[str, bool]


class ConversationError(ValueError):
    """A conversation cannot be rendered (roles out of order, empty, unknown role)."""


@dataclasses.dataclass
class Tokenized:
    """Token ids and labels of one sample; `labels[i]` is `input_ids[i]` when supervised, else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def num_images(self) -> int:
        return sum(token == IMAGE_TOKEN_INDEX for token in self.input_ids)


def template_names() -> list[str]:
    return sorted(conv_templates) + [CHAT_TEMPLATE]


def check_version(version: str, tokenizer: Any = None) -> str:
    """Validate `--version`: a registered template name or `chat_template` (the tokenizer must have one)."""
    if version == CHAT_TEMPLATE:
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "`--version chat_template` needs a tokenizer with a chat template, and this one has none; "
                f"pick a registered template instead: {', '.join(sorted(conv_templates))}."
            )
        return version
    if version not in conv_templates:
        raise ValueError(
            f"Unknown `--version` `{version}`; valid: {', '.join(template_names())}. Use `plain` for stage-1 "
            "pretraining and `v1` (Vicuna) for stage-2 fine-tuning."
        )
    return version


# --------------------------------------------------------------------------------------------------------- images


def prepare_image_markers(
    messages: Sequence[tuple[str, str]], num_images: int, version: str, mm_use_im_start_end: bool = False
) -> list[tuple[str, str]]:
    """`messages` with their `<image>` markers placed for template `version` as the original LLaVA trained
    (`llava.prompting.place_training_image_markers`, which owns the rules)."""
    return place_training_image_markers(
        messages, num_images, template=conv_templates.get(version), mm_use_im_start_end=mm_use_im_start_end
    )


# ------------------------------------------------------------------------------------------------------- segments


def check_order(messages: Sequence[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split off a leading system message; the rest must alternate user/assistant, starting with the user.

    Records read by `llava.train.data.normalize_record` were checked there; the preprocessor is then called with
    `validated=True` and only splits the system message off (`split_system`), so each sample is checked once.
    """
    if not messages:
        raise ConversationError("The conversation has no messages.")
    for role, text in messages:
        if role not in ROLES:
            raise ConversationError(f"Unknown role `{role}`; expected one of {', '.join(ROLES)}.")
        if not isinstance(text, str):
            raise ConversationError(f"A `{role}` message is {type(text).__name__}, not text.")
    system, messages = split_system(messages)
    for i, (role, _) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(
                f"Message {i} is from `{role}` but `{expected}` was expected: turns must alternate user/assistant, "
                "starting with the user (a system message may come first)."
            )
    if not any(role == "assistant" for role, _ in messages):
        raise ConversationError("The conversation has no assistant reply, so there is nothing to learn.")
    return system, messages


def split_system(messages: Sequence[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """`(system text or None, the other messages)`, without checking their order (see `check_order`)."""
    if messages and messages[0][0] == "system":
        return messages[0][1], list(messages[1:])
    return None, list(messages)


def template_segments(version: str, messages: Sequence[tuple[str, str]], *, validated: bool = False) -> list[Segment]:
    """Segments of a conversation rendered with the registered template `version` (`validated`: see `check_order`)."""
    system, turns = split_system(messages) if validated else check_order(messages)
    template = conv_templates[version]
    # Few-shot examples baked into a template (v0) are for prompting, not training: start from an empty history.
    conv: Conversation = dataclasses.replace(template, messages=[], offset=0)
    if system is not None:
        conv.set_system_message(system)
    for role, text in turns:
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], text)
    return conv.get_prompt_segments()


def chat_template_segments(
    tokenizer: Any, messages: Sequence[tuple[str, str]], *, validated: bool = False
) -> list[Segment]:
    """Segments from the tokenizer's chat template, rendered message by message.

    For each assistant message, the conversation is rendered up to it with the generation prompt (that is what the
    model sees at inference) and then including it; the difference is the reply. The reply and its end-of-turn
    string are supervised; whitespace the template puts after them (between turns) is not. `validated`: see
    `check_order`.
    """
    if not validated:
        check_order(messages)
    chat = [{"role": role, "content": text} for role, text in messages]

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(chat[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[Segment] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConversationError(
                "The tokenizer's chat template does not render a conversation as a growing prefix (rendering "
                f"message {i} changed the text before it), so replies cannot be located; use a registered "
                f"template instead: {', '.join(sorted(conv_templates))}."
            )
        reply = full[len(prompt) :]
        kept = len(reply.rstrip())
        segments += [(prompt[len(done) :], False), (reply[:kept], True), (reply[kept:], False)]
        done = full
    rest = render(len(chat), False)
    if rest.startswith(done):
        segments.append((rest[len(done) :], False))
    return [(text, sup) for text, sup in segments if text]


def _move_reply_spaces(segments: Sequence[Segment]) -> list[Segment]:
    """Give the spaces that end a role tag to the reply that follows (see the module docstring)."""
    out = [list(seg) for seg in segments if seg[0]]
    for prev, cur in zip(out, out[1:]):
        if not prev[1] and cur[1]:
            stripped = prev[0].rstrip(" ")
            cur[0] = prev[0][len(stripped) :] + cur[0]
            prev[0] = stripped
    return [(text, sup) for text, sup in out if text]


# ----------------------------------------------------------------------------------------------------- tokenizing


def adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


class Preprocessor:
    """Renders and tokenizes conversations for one tokenizer and template (`version`)."""

    def __init__(self, tokenizer: Any, version: str, mm_use_im_start_end: bool = False):
        self.tokenizer = tokenizer
        self.version = check_version(version, tokenizer)
        self.mm_use_im_start_end = mm_use_im_start_end
        self.add_bos = adds_bos(tokenizer)
        self.has_offsets = bool(getattr(tokenizer, "is_fast", False))

    def segments(
        self, messages: Sequence[tuple[str, str]], num_images: int | None = None, *, validated: bool = False
    ) -> list[Segment]:
        """Render `messages` [(role, text)] as segments, image markers placed as the template wants them.

        `validated`: the messages already passed `check_order` (records from `normalize_record`).
        """
        if num_images is None:
            num_images = sum(text.count(DEFAULT_IMAGE_TOKEN) for _, text in messages)
        messages = prepare_image_markers(messages, num_images, self.version, self.mm_use_im_start_end)
        if self.version == CHAT_TEMPLATE:
            segments = chat_template_segments(self.tokenizer, messages, validated=validated)
        else:
            segments = template_segments(self.version, messages, validated=validated)
        return _move_reply_spaces(segments)

    def __call__(
        self, messages: Sequence[tuple[str, str]], num_images: int | None = None, *, validated: bool = False
    ) -> Tokenized:
        return self.tokenize_segments(self.segments(messages, num_images, validated=validated))

    def tokenize_segments(self, segments: Sequence[Segment]) -> Tokenized:
        """Token ids and labels for `segments`; `<image>` becomes IMAGE_TOKEN_INDEX (never supervised)."""
        text = "".join(t for t, _ in segments)
        bounds, pos = [], 0  # (start, end, supervised) per segment, in characters of `text`
        for t, sup in segments:
            bounds.append((pos, pos + len(t), sup))
            pos += len(t)
        ids: list[int] = []
        labels: list[int] = []
        bos = self.tokenizer.bos_token
        if self.add_bos and not (bos and text.startswith(bos)):
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        start = 0
        for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
                labels.append(IGNORE_INDEX)
                start += len(DEFAULT_IMAGE_TOKEN)
            if chunk:
                pieces = [(max(s, start) - start, min(e, start + len(chunk)) - start, sup) for s, e, sup in bounds]
                pieces = [(s, e, sup) for s, e, sup in pieces if s < e]
                chunk_ids, chunk_labels = self._tokenize_chunk(chunk, pieces)
                ids += chunk_ids
                labels += chunk_labels
            start += len(chunk)
        return Tokenized(ids, labels)

    def _encode(self, text: str, offsets: bool = False):
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)

    def _tokenize_chunk(self, chunk: str, pieces: list[tuple[int, int, bool]]) -> tuple[list[int], list[int]]:
        """Tokenize one image-free chunk whose characters are covered by `pieces` [(start, end, supervised)]."""
        if self.has_offsets and len({sup for _, _, sup in pieces}) > 1:
            enc = self._encode(chunk, offsets=True)
            cuts = [s for s, _, _ in pieces[1:]]
            spans = enc["offset_mapping"]
            if not any(s < cut < e for s, e in spans for cut in cuts):
                labels = []
                for token, (s, _) in zip(enc["input_ids"], spans):
                    sup = next((p_sup for p_s, p_e, p_sup in pieces if p_s <= s < p_e), pieces[-1][2])
                    labels.append(token if sup else IGNORE_INDEX)
                return list(enc["input_ids"]), labels
        elif len({sup for _, _, sup in pieces}) == 1:
            token_ids = list(self._encode(chunk)["input_ids"])
            return token_ids, token_ids if pieces[0][2] else [IGNORE_INDEX] * len(token_ids)
        # A token straddles a boundary (or no offsets): tokenize segment by segment.
        ids: list[int] = []
        labels: list[int] = []
        for s, e, sup in pieces:
            piece_ids = list(self._encode(chunk[s:e])["input_ids"])
            ids += piece_ids
            labels += piece_ids if sup else [IGNORE_INDEX] * len(piece_ids)
        return ids, labels


# ------------------------------------------------------------------------------------------------------ truncation


def truncate_to_fit(tokens: Tokenized, image_token_counts: Sequence[int], max_length: int) -> tuple[Tokenized, int]:
    """Cut `tokens` so that, once each image marker becomes its features, the sequence fits `max_length`.

    `image_token_counts[k]` is how many positions the k-th image takes. An image that does not fit whole is dropped
    with everything after it. Returns the kept tokens and how many images they still hold.
    """
    total, images, keep = 0, 0, len(tokens.input_ids)
    for i, token in enumerate(tokens.input_ids):
        cost = image_token_counts[images] if token == IMAGE_TOKEN_INDEX else 1
        if total + cost > max_length:
            keep = i
            break
        total += cost
        images += token == IMAGE_TOKEN_INDEX
    if keep == len(tokens.input_ids):
        return tokens, images
    return Tokenized(tokens.input_ids[:keep], tokens.labels[:keep]), images


# --------------------------------------------------------------------------------------------------------- display


def render_supervision(tokenizer: Any, tokens: Tokenized, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """Decode a sample with its supervised spans wrapped in `open_mark`/`close_mark` and images shown as <image>."""
    out, run, run_sup = [], [], None

    def flush():
        if run:
            piece = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(f"{open_mark}{piece}{close_mark}" if run_sup else piece)

    for token, label in zip(tokens.input_ids, tokens.labels):
        if token == IMAGE_TOKEN_INDEX:
            flush()
            run, run_sup = [], None
            out.append(DEFAULT_IMAGE_TOKEN)
            continue
        sup = label != IGNORE_INDEX
        if sup != run_sup:
            flush()
            run, run_sup = [], sup
        run.append(token)
    flush()
    return "".join(out)


def supervised_spans(tokens: Tokenized) -> list[list[int]]:
    """The token ids of each maximal run of supervised positions."""
    spans, current = [], []
    for token, label in zip(tokens.input_ids, tokens.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


__all__ = [
    "CHAT_TEMPLATE",
    "ConversationError",
    "Preprocessor",
    "Tokenized",
    "check_version",
    "chat_template_segments",
    "prepare_image_markers",
    "render_supervision",
    "supervised_spans",
    "template_segments",
    "truncate_to_fit",
]
