"""Compatibility re-export only: the prefix cache moved to `llava.inference.prefix_cache` (it belongs to the
generation package); this path stays importable for code written against it.

This is the one import in `llava/model/` that points up a layer (docs/Architecture.md, "Layers"); nothing in `llava/`
imports this module, so the layering of the package itself is unchanged. New code imports `llava.inference`.
"""

from llava.inference.prefix_cache import PrefixKV, PrefixKVCache, image_digest, prefix_key

__all__ = ["PrefixKV", "PrefixKVCache", "image_digest", "prefix_key"]
