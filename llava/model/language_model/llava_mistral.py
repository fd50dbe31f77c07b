"""LLaVA on Mistral decoders (BakLLaVA, LLaVA-1.6-Mistral): `LlavaMistralForCausalLM`."""

from __future__ import annotations

from llava.model.language_model.registry import define_family

SPEC = define_family("mistral", __name__, "Mistral")
LlavaMistralConfig, LlavaMistralModel, LlavaMistralForCausalLM = SPEC.classes
