"""Decoder families, one file each; importing this package registers them all."""

from llava.model.language_model import llava_llama, llava_mistral, llava_mpt, llava_qwen2  # noqa: F401  (registration)
from llava.model.language_model.registry import DECODERS, DecoderSpec, decoder_for_config, register_decoder

__all__ = ["DECODERS", "DecoderSpec", "decoder_for_config", "register_decoder"]
