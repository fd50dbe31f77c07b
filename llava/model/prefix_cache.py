"""A bounded LRU cache of the decoder's keys and values for prompt prefixes that end with an image.

A chat prompt is `system prompt, USER: <image> question ASSISTANT:`. Everything up to and including the image (in
LLaVA-1.5 about 40 text tokens and 576 image tokens) is the same whenever the same image is asked about again: a
demo's example pictures, a multi-turn chat that resends its image every turn, many users asking about one upload.
The batching decoder (`llava.inference.BatchDecoder`) stores the keys and values it computed for such a prefix and,
when a later request has the same prefix, prefills only the question after it.

The key is the prefix's token ids plus a content hash of each image in it (its pixels, size and mode), so a hit is
the very prefix the model would otherwise compute. Entries are dropped when any weight of the model changes, as in
`llava.model.feature_cache`.

    engine.enable_prefix_cache(max_bytes=256 << 20)     # what the model worker's --prefix-cache-mb sets
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from PIL import Image

from llava.model.feature_cache import weights_fingerprint

# One cached prefix: per decoder layer, keys and values of shape (1, kv_heads, prefix_len, head_dim).
PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


def image_digest(image: Image.Image) -> bytes:
    """A 16-byte hash of an image's pixels, size and mode."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((image.size, image.mode)).encode())
    h.update(image.tobytes())
    return h.digest()


def prefix_key(input_ids: Sequence[int], images: Sequence[Image.Image], image_token: int) -> tuple | None:
    """The cache key of a prompt's prefix through its last image marker, and the number of ids after it; None when
    the prompt has no image or nothing follows the last one (then there is no question to prefill on its own)."""
    last = max((i for i, t in enumerate(input_ids) if t == image_token), default=-1)
    if last < 0 or last == len(input_ids) - 1:
        return None
    return (tuple(input_ids[: last + 1]), tuple(image_digest(im) for im in images)), len(input_ids) - last - 1


class PrefixKVCache:
    """LRU map from a prefix key to its per-layer keys and values, bounded in bytes. Thread-safe."""

    def __init__(self, model: torch.nn.Module, max_bytes: int = 256 << 20):
        if max_bytes < 0:
            raise ValueError(f"`max_bytes`={max_bytes}; use 0 to keep nothing or a positive byte budget.")
        self.model = model
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, PrefixKV] = OrderedDict()
        self._bytes = 0
        self._fingerprint: tuple | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _check_weights(self) -> None:
        fingerprint = weights_fingerprint([self.model])
        if fingerprint != self._fingerprint:
            self._entries.clear()
            self._bytes = 0
            self._fingerprint = fingerprint

    def get(self, key: tuple) -> PrefixKV | None:
        with self._lock:
            self._check_weights()
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple, layers: PrefixKV) -> None:
        """Store `layers` (tensors the cache now owns: pass copies, not views of a live batch cache)."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:
            return
        with self._lock:
            self._check_weights()
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = layers
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in old)

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}
