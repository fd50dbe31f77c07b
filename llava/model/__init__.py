"""LLaVA models: decoder families with a vision tower and projector, and the one checkpoint loader."""

from llava.model.language_model import DECODERS, decoder_for_config
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from llava.model.language_model.llava_mpt import LlavaMptConfig, LlavaMptForCausalLM
from llava.model.language_model.llava_qwen2 import LlavaQwen2Config, LlavaQwen2ForCausalLM

__all__ = [
    "DECODERS",
    "LlavaConfig",
    "LlavaLlamaForCausalLM",
    "LlavaMistralConfig",
    "LlavaMistralForCausalLM",
    "LlavaMptConfig",
    "LlavaMptForCausalLM",
    "LlavaQwen2Config",
    "LlavaQwen2ForCausalLM",
    "decoder_for_config",
]
