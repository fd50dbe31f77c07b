"""The single quarantine for transformers' KV-cache internals (`DynamicCache`, its `layers`, their `keys`/`values`).

The batch decoder edits caches as tensors (rows joined, dropped and trimmed, prefixes copied out and seeded back);
transformers keeps those tensors in attributes that have moved between releases. Every access to them lives here,
so a transformers upgrade that renames them is fixed in this one file. Nothing else in `llava/` touches them.

Caches are left-padded: row `i`'s real tokens fill the right end of its columns, `mask[i]` says which columns hold
real tokens, and the cache's width never exceeds the longest row (after every change its first column holds some
row's first token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

# One prompt prefix's keys and values: per decoder layer, tensors of shape (1, kv_heads, prefix_len, head_dim).
PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]

_GROW = 64  # tokens of spare room a growing cache layer allocates at a time


class _GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends into spare capacity. `DynamicLayer` concatenates, copying the whole cache at
    every step, which dominates a large batch's decoding step on a CPU. Here keys and values are views of larger
    buffers; when they were replaced from outside (rows selected, columns trimmed, caches spliced) or the buffer is
    full, the next update copies them into a new buffer with room for `_GROW` more tokens."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _views: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        add = key_states.shape[-2]
        ours = self._views is not None and self._views[0] is self.keys and self._views[1] is self.values
        if not ours or n + add > self._buffers[0].shape[-2]:
            shape = [*key_states.shape[:-2], n + add + _GROW, key_states.shape[-1]]
            self._buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
            if n:
                self._buffers[0][..., :n, :] = self.keys
                self._buffers[1][..., :n, :] = self.values
        keys, values = self._buffers
        keys[..., n : n + add, :] = key_states  # (B, H, T, D)
        values[..., n : n + add, :] = value_states
        self.keys, self.values = keys[..., : n + add, :], values[..., : n + add, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values


def _set_cache_tensors(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):  # sliding-window layers count the tokens they have seen
        layer.cumulative_length = keys.shape[-2]


def new_cache(model) -> DynamicCache:
    """An empty cache for `model`'s decoder whose plain layers append in place (`_GrowingLayer`)."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def all_plain(cache) -> bool:
    """Whether every layer keeps the whole history with nothing else to keep consistent (no sliding window)."""
    return all(type(layer) is _GrowingLayer for layer in cache.layers)


def _splicable(cache, context_len: int) -> bool:
    """Whether rows can be spliced into / trimmed out of `cache` by editing its tensors.

    Plain dynamic layers always; sliding-window layers only when no sequence can outgrow the window (then they keep
    the whole history too).
    """
    for layer in getattr(cache, "layers", [None]):
        if type(layer) in (DynamicLayer, _GrowingLayer):
            continue
        if type(layer) is DynamicSlidingWindowLayer and not layer.record_past and context_len < layer.sliding_window:
            continue
        return False
    return True


def _splice_caches(cache_a, mask_a: torch.Tensor, cache_b, mask_b: torch.Tensor):
    """Stack two batches' caches (rows of `a` first), left-padding the shorter one with masked-out zeros."""
    length = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):
        keys = torch.cat([pad(layer_a.keys, 2), pad(layer_b.keys, 2).to(layer_a.keys.device)], dim=0)
        values = torch.cat([pad(layer_a.values, 2), pad(layer_b.values, 2).to(layer_a.values.device)], dim=0)
        _set_cache_tensors(layer_a, keys, values)
    mask = torch.cat([pad(mask_a, 1), pad(mask_b, 1).to(mask_a.device)], dim=0)
    return cache_a, mask


def select_rows(cache, mask: torch.Tensor, keep: Sequence[int], trim: bool) -> torch.Tensor:
    """Keep rows `keep` of `cache` (in place) and of `mask` (returned). With `trim`, columns that are padding in
    every remaining row are cut off the left of both."""
    index = torch.tensor(list(keep), dtype=torch.long)  # on the CPU: it indexes tensors on any device
    cache.batch_select_indices(index)
    mask = mask[index]
    if trim:
        first = int(mask.any(dim=0).long().argmax())
        if first > 0:
            for layer in cache.layers:
                _set_cache_tensors(layer, layer.keys[..., first:, :], layer.values[..., first:, :])
            mask = mask[:, first:]
    return mask


def copy_prefix(cache, row: int, start: int, length: int) -> PrefixKV:
    """Copies of row `row`'s keys and values in columns `[start, start + length)` of every layer."""
    return [
        (layer.keys[row : row + 1, :, start : start + length].clone(),
         layer.values[row : row + 1, :, start : start + length].clone())
        for layer in cache.layers
    ]  # fmt: skip


def seeded_cache(model, prefix: PrefixKV) -> DynamicCache:
    """A one-row cache holding `prefix` (never written to: the first update copies it into a fresh buffer)."""
    cache = new_cache(model)
    for layer, (keys, values) in zip(cache.layers, prefix):
        layer.lazy_initialization(keys, values)
        _set_cache_tensors(layer, keys, values)
    return cache


__all__ = [
    "PrefixKV",
    "all_plain",
    "copy_prefix",
    "new_cache",
    "seeded_cache",
    "select_rows",
]
