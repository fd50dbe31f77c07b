"""A bounded LRU cache of the decoder's keys and values for prompt prefixes that end with an image.

A chat prompt is `system prompt, USER: <image> question ASSISTANT:`. Everything up to and including the image (in
LLaVA-1.5 about 40 text tokens and 576 image tokens) is the same whenever the same image is asked about again: a
demo's example pictures, a multi-turn chat that resends its image every turn, many users asking about one upload.
The batching decoder (`llava.inference.decoder.BatchDecoder`) stores the keys and values it computed for such a prefix and,
when a later request has the same prefix, prefills only the question after it.

The key is the prefix's token ids plus a content hash of each image in it (its pixels, size and mode), so a hit is
the very prefix the model would otherwise compute. Entries are dropped when any weight of the model changes, as in
`llava.model.feature_cache`.

    engine.enable_prefix_cache(max_bytes=256 << 20)     # what the model worker's --prefix-cache-mb sets
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from PIL import Image

from llava.inference.kv_cache import PrefixKV
from llava.model.feature_cache import BoundedLRU, weights_fingerprint


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


class PrefixKVCache(BoundedLRU):
    """LRU map from a prefix key to its per-layer keys and values (`PrefixKV`), bounded in bytes, for `model`'s
    current weights. Thread-safe."""

    def __init__(self, model: torch.nn.Module, max_bytes: int = 256 << 20):
        super().__init__(max_bytes)
        self.model = model

    def get(self, key: tuple) -> PrefixKV | None:
        self.check_weights(weights_fingerprint([self.model]))
        return super().get(key)

    def put(self, key: tuple, layers: PrefixKV) -> None:
        """Store `layers` (tensors the cache now owns: pass copies, not views of a live batch cache)."""
        self.check_weights(weights_fingerprint([self.model]))
        super().put(key, layers)
