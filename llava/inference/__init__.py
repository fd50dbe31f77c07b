"""The one generation path: prompt + images -> text, batched or streamed (see `engine`); this package re-exports
its public names, so `from llava.inference import LlavaEngine, GenerationParams` works as before the split.

Modules, by job (imports run downward):
    params        GenerationParams and THE check of generation parameters; RequestError; EncodedRequest
    text_stream   the one incremental detokenizer (byte-token hold-back, stop strings, stable prefix)
    kv_cache      the only module that touches transformers' KV-cache internals
    prefix_cache  stored keys/values of prompt prefixes that end with an image
    decoder       continuous batching on token ids (model + caches + detokenizer, no engine)
    engine        LlavaEngine: load, build_prompt, encode, generate, stream; greedy_divergence
"""

from llava.inference.decoder import BatchDecoder, StepUpdate
from llava.inference.engine import GREEDY_TIE_TOLERANCE, LlavaEngine, greedy_divergence
from llava.inference.kv_cache import _GrowingLayer, _set_cache_tensors, _splicable, _splice_caches
from llava.inference.params import (
    ORIGINAL_WORKER_DEFAULTS,
    EncodedRequest,
    GenerationParams,
    PromptTooLongError,
    RequestError,
    read_param,
)
from llava.inference.prefix_cache import PrefixKVCache, prefix_key
from llava.inference.text_stream import Detokenizer, TextStream, cut_at_stop, stable_prefix

__all__ = [
    "GREEDY_TIE_TOLERANCE",
    "ORIGINAL_WORKER_DEFAULTS",
    "BatchDecoder",
    "Detokenizer",
    "EncodedRequest",
    "GenerationParams",
    "LlavaEngine",
    "PrefixKVCache",
    "PromptTooLongError",
    "RequestError",
    "StepUpdate",
    "TextStream",
    "_GrowingLayer",
    "_set_cache_tensors",
    "_splicable",
    "_splice_caches",
    "cut_at_stop",
    "greedy_divergence",
    "prefix_key",
    "read_param",
    "stable_prefix",
]
