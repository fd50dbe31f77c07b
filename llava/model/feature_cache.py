"""A bounded LRU cache of projected image features keyed by image content, so a repeated image is encoded once.

Serving sees the same images again and again (a demo's example pictures, a multi-turn chat that resends its image
every turn, many users asking about one upload). The key is a hash of the preprocessed pixel tensor (its bytes,
shape and dtype) plus what the merge of anyres tiles depends on, so a hit returns exactly the features the model
would compute for that input. The cache holds only features computed with autograd off, and it empties itself
when the tower or projector weights change (an optimizer step, `load_state_dict`, `.to()`), so it can never serve
features of other weights.

    model.image_feature_cache = ImageFeatureCache(max_bytes=256 << 20)   # LlavaEngine.enable_image_feature_cache
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn


def tensor_digest(tensor: torch.Tensor, *extra) -> bytes:
    """A 16-byte content hash of `tensor` (values, shape, dtype) and of `extra` (anything with a stable repr)."""
    data = tensor.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(data.shape), str(data.dtype), extra)).encode())
    if data.numel():
        h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return h.digest()


def weights_fingerprint(modules: Sequence[nn.Module | nn.Parameter | None]) -> tuple:
    """Changes whenever a parameter of `modules` is modified in place or replaced (storage, version, dtype)."""
    out = []
    for module in modules:
        if module is None:
            continue
        params = [module] if isinstance(module, torch.Tensor) else list(module.parameters())
        out += [(p.data_ptr(), p._version, p.dtype) for p in params]
    return tuple(out)


def _nbytes(value) -> int:
    """Bytes held by a tensor, or by the tensors of a (nested) list or tuple."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


class BoundedLRU:
    """LRU map bounded in the bytes of its tensor values, emptied when the weights it was filled with change.
    Thread-safe. Values are tensors or (nested) lists/tuples of tensors."""

    def __init__(self, max_bytes: int = 256 << 20):
        if max_bytes < 0:
            raise ValueError(f"`max_bytes`={max_bytes}; use 0 to keep nothing or a positive byte budget.")
        self.max_bytes = max_bytes
        self._entries: OrderedDict = OrderedDict()
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

    def stats(self) -> dict:
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def get(self, key):
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)

    def check_weights(self, fingerprint: tuple) -> None:
        """Empty the cache if the weights it was filled with have changed since."""
        with self._lock:
            if fingerprint != self._fingerprint:
                self._entries.clear()
                self._bytes = 0
                self._fingerprint = fingerprint


class ImageFeatureCache(BoundedLRU):
    """LRU map from an image's content hash to its projected features `(n_i, D)`, bounded in bytes. Thread-safe."""

    def put(self, key: bytes, value: torch.Tensor) -> None:
        super().put(key, value.detach())

    def features(
        self,
        per_image: Sequence[torch.Tensor],
        image_sizes: Sequence | None,
        compute: Callable[[list[torch.Tensor], list | None], list[torch.Tensor]],
        context: tuple = (),
    ) -> list[torch.Tensor]:
        """One feature tensor per image: cached ones looked up, the rest computed by `compute` in one call (each
        distinct image once, even when it repeats within the batch) and stored. `context` joins every key."""
        keys = [
            tensor_digest(im, None if image_sizes is None else tuple(image_sizes[i]), context)
            for i, im in enumerate(per_image)
        ]
        found: dict[bytes, torch.Tensor] = {}
        todo: list[int] = []  # first index of each distinct image not in the cache
        pending: set[bytes] = set()
        for i, key in enumerate(keys):
            if key in found or key in pending:
                continue
            value = self.get(key)
            if value is None:
                todo.append(i)
                pending.add(key)
            else:
                found[key] = value
        if todo:
            sizes = None if image_sizes is None else [image_sizes[i] for i in todo]
            for i, value in zip(todo, compute([per_image[i] for i in todo], sizes)):
                found[keys[i]] = value
                self.put(keys[i], value)
        return [found[key] for key in keys]
