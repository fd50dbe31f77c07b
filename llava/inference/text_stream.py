"""The one incremental detokenizer: token ids in, the reply's text out, with stop strings and a stable prefix.

Decoding a reply's whole id list at every step costs O(length) per token (O(n^2) per reply). `TextStream` decodes
only a small window at each step: the last token already turned into text (the anchor) plus what came after it,
and appends the window's text beyond the anchor's own. That equals decoding everything because, for the decoders
LLaVA's tokenizers use (SentencePiece `Replace`/`ByteFallback`/`Fuse`/`Strip`, byte-level BPE), a token's text
depends only on itself, on the run of byte tokens it belongs to, and on whether it opens the reply. So:

- the anchor is always an ordinary token (not a byte-fallback piece, not a skipped special token), whose text does
  not change when tokens follow it;
- a trailing run of byte-fallback or special tokens is held back: such a run decodes as one group that a later byte
  can rewrite entirely (valid UTF-8, or one U+FFFD per byte), so it becomes text only once an ordinary token closes
  it (or the reply ends); text ending in U+FFFD (a character split across byte-level tokens) is held the same way;
- a tokenizer that post-processes decoded text across tokens (`clean_up_tokenization_spaces`) is decoded whole at
  each step instead, which is exact for it too.

Stop strings are looked for only where new text could complete one (the tail), and `stable_text` is the part of
the reply later tokens cannot change: no held tokens, no trailing whitespace (a decoder may merge it with what
follows), no trailing beginning of a stop string.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop string (the stop string itself removed)."""
    cut = len(text)
    for s in stops:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def _stable_length(text: str, stops: Sequence[str], start: int = 0) -> int:
    """The length of `stable_prefix(text, stops)`, looking only at `text[start:]` and what it may hold back."""
    end = len(text)
    while True:
        before = end
        while end > start and (text[end - 1] == _REPLACEMENT or text[end - 1].isspace()):
            end -= 1
        hold = 0
        for stop in stops:
            for k in range(min(len(stop) - 1, end - start), 0, -1):
                if text.endswith(stop[:k], start, end):
                    hold = max(hold, k)
                    break
        end -= hold
        if end == before:
            return end


def stable_prefix(text: str, stops: Sequence[str] = ()) -> str:
    """The part of a partial reply that later tokens cannot change: `text` without trailing half-decoded characters
    or whitespace (decoders may merge it with what follows) and without a trailing start of a stop string (which the
    next token may complete and cut)."""
    return text[: _stable_length(text, stops)]


class Detokenizer:
    """What incremental decoding needs to know about one tokenizer; `stream(stops)` starts one reply."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Post-processing across token boundaries ("a ." -> "a.") defeats window decoding: decode whole then.
        self.whole = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens (`<0x0A>` ...), whose runs decode as one group."""
        return frozenset(i for token, i in self.tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that decoding with `skip_special_tokens=True` drops."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return frozenset(self.tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}

    @functools.cached_property
    def held_ids(self) -> frozenset[int]:
        """Tokens that cannot anchor a window: byte-fallback pieces and skipped special tokens."""
        return self.byte_token_ids | self.special_token_ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, stops: Sequence[str] = ()) -> TextStream:
        return TextStream(self, stops)


class TextStream:
    """One reply's text, grown token by token in O(1) work per token (see the module docstring).

    stream = detokenizer.stream(stops)
    for token in tokens:
        stream.push(token)
        if stream.stopped: break
        show(stream.stable_text)
    reply = stream.finish()          # == cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
    """

    def __init__(self, detokenizer: Detokenizer, stops: Sequence[str] = ()):
        self.detokenizer = detokenizer
        self.stops = [s for s in stops if s]
        self._reach = max((len(s) for s in self.stops), default=0)  # a new stop ends at most this far back
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:_read], exactly
        self._anchor = 0  # ids[_anchor] is the last ordinary token already in `text` (when _anchor < _read)
        self._anchor_text = ""  # the anchor decoded on its own
        self._read = 0
        self._tail = ""  # the held tokens' current text (not final)
        self.stopped = False  # a stop string appeared; `text` is then cut before it
        self._stable = 0  # length of stable_text

    def _window(self) -> str:
        """The text of ids[_read:] as it stands (`text` + this == decoding all ids), or None if the anchor moved."""
        if self.detokenizer.whole:
            return self.detokenizer.decode(self.ids)[len(self.text) :]
        window = self.detokenizer.decode(self.ids[self._anchor :])
        if not window.startswith(self._anchor_text):  # not seen with LLaVA's tokenizers; decode whole to stay exact
            return self.detokenizer.decode(self.ids)[len(self.text) :]
        return window[len(self._anchor_text) :]

    def push(self, token: int) -> None:
        """Add one token; afterwards `stopped`, `text` and `stable_text` describe the reply so far."""
        if self.stopped:
            raise RuntimeError("This reply already ended at a stop string; start a new stream.")
        self.ids.append(token)
        tail = self._window()
        if token not in self.detokenizer.held_ids and not tail.endswith(_REPLACEMENT):
            self._commit(tail)
        else:
            self._tail = tail
            self._find_stop(tail)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.push(token)
            if self.stopped:
                return

    def _commit(self, tail: str) -> None:
        """Move everything pushed so far into `text` and make the last token the anchor."""
        if self._find_stop(tail):
            return
        self._tail = ""
        self._read = len(self.ids)
        if self.detokenizer.whole:
            self.text = self.detokenizer.decode(self.ids)
        else:
            self.text += tail
            self._anchor = self._read - 1
            self._anchor_text = self.detokenizer.decode(self.ids[self._anchor :])
        self._stable = _stable_length(self.text, self.stops, max(0, self._stable - self._reach))

    def _find_stop(self, tail: str) -> bool:
        """Look for a stop string ending in `tail`; on a hit, cut the reply before it and mark it stopped."""
        if not self.stops:
            return False
        start = max(0, len(self.text) - self._reach + 1)
        region = self.text[start:] + tail
        pos = min((p for p in (region.find(s) for s in self.stops) if p != -1), default=-1)
        if pos == -1:
            return False
        self.text = self.text[:start] + region[:pos]
        self._tail, self._read, self.stopped = "", len(self.ids), True
        self._stable = len(self.text)
        return True

    @property
    def stable_text(self) -> str:
        """The reply so far that later tokens cannot change (only ever grows); once stopped, the whole cut reply."""
        return self.text[: self._stable]

    def finish(self) -> str:
        """The whole reply: held tokens included, cut at the first stop string."""
        if not self.stopped and self._tail:
            self.text += self._tail
            self._tail = ""
            self._read = len(self.ids)
        return self.text
