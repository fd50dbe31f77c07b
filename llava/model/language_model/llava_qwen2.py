"""LLaVA on Qwen2 decoders (Qwen2 / Qwen2.5 instruct models): `LlavaQwen2ForCausalLM`."""

from __future__ import annotations

from llava.model.language_model.registry import define_family

SPEC = define_family("qwen2", __name__, "Qwen2", llava_model_types=("llava_qwen2", "llava_qwen"))
LlavaQwen2Config, LlavaQwen2Model, LlavaQwen2ForCausalLM = SPEC.classes
