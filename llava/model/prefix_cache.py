"""Moved to `llava.inference.prefix_cache` (the prefix cache belongs to the generation package); kept importable."""

from llava.inference.prefix_cache import PrefixKV, PrefixKVCache, image_digest, prefix_key

__all__ = ["PrefixKV", "PrefixKVCache", "image_digest", "prefix_key"]
