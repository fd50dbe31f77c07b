"""LLaVA on LLaMA decoders (Vicuna, LLaMA-2/3): `LlavaLlamaForCausalLM`."""

from __future__ import annotations

from llava.model.language_model.registry import define_family

SPEC = define_family("llama", __name__, "Llama", config_name="LlavaConfig", llava_model_types=("llava_llama", "llava"))
LlavaConfig, LlavaLlamaModel, LlavaLlamaForCausalLM = SPEC.classes
