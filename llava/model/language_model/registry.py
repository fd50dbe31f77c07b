"""Decoder registry: which LLaVA classes serve which decoder family, and how to recognise a config for them."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoConfig, AutoModelForCausalLM


@dataclass(frozen=True)
class DecoderSpec:
    """One decoder family (llama, mistral, ...) wrapped for LLaVA."""

    family: str
    config_cls: type
    causal_lm_cls: type
    # `model_type` of the plain decoder (what `--model_name_or_path` points at during training).
    base_model_types: tuple[str, ...]
    # `model_type` values that LLaVA checkpoints of this family carry ("llava" is what older LLaVA-1.5 configs say).
    llava_model_types: tuple[str, ...] = field(default_factory=tuple)
    # the `transformers` layer class, for FSDP wrapping and device maps
    decoder_layer_cls: str = ""

    @property
    def architecture(self) -> str:
        return self.causal_lm_cls.__name__


DECODERS: dict[str, DecoderSpec] = {}


def register_decoder(spec: DecoderSpec) -> DecoderSpec:
    if spec.family in DECODERS:
        raise ValueError(f"Decoder family `{spec.family}` is registered twice.")
    DECODERS[spec.family] = spec
    AutoConfig.register(spec.config_cls.model_type, spec.config_cls, exist_ok=True)
    AutoModelForCausalLM.register(spec.config_cls, spec.causal_lm_cls, exist_ok=True)
    return spec


def decoder_for_config(config: dict, source: str = "config.json") -> DecoderSpec:
    """Pick the family from a config dict: `architectures` first, then `model_type` (LLaVA or plain decoder)."""
    for arch in config.get("architectures") or []:
        for spec in DECODERS.values():
            if arch == spec.architecture:
                return spec
    model_type = config.get("model_type")
    for spec in DECODERS.values():
        if model_type in spec.llava_model_types or model_type in spec.base_model_types:
            return spec
    known = sorted({spec.architecture for spec in DECODERS.values()})
    raise ValueError(
        f"`{source}`: no LLaVA decoder for architectures={config.get('architectures')} model_type=`{model_type}`. "
        f"Registered: {', '.join(known)} (base model types: "
        f"{', '.join(sorted(t for s in DECODERS.values() for t in s.base_model_types))})."
    )
