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

    @property
    def classes(self) -> tuple[type, type, type]:
        """(config, base model, causal LM): the family's public LLaVA classes."""
        return self.config_cls, self.causal_lm_cls.llava_model_class, self.causal_lm_cls


DECODERS: dict[str, DecoderSpec] = {}


def define_family(
    family: str,
    module: str,
    prefix: str,
    *,
    config_name: str | None = None,
    llava_model_types: tuple[str, ...] = (),
    decoder_layer_cls: str | None = None,
    causal_lm_mixin: type | None = None,
) -> DecoderSpec:
    """Define and register LLaVA's three classes for one decoder family in `module` (`__name__` of its file):
    `Llava{prefix}Config` (or `config_name`) with `model_type` `llava_{family}`, `Llava{prefix}Model` (transformers'
    `{prefix}Model` with `LlavaMetaModel` mixed in) and `Llava{prefix}ForCausalLM` (`{prefix}ForCausalLM` with
    `LlavaMetaForCausalLM` and, first, `causal_lm_mixin` for the family's quirks)."""
    import transformers

    from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel

    def base(suffix: str) -> type:
        return getattr(transformers, f"{prefix}{suffix}")

    model_type = f"llava_{family}"
    config_cls = type(config_name or f"Llava{prefix}Config", (base("Config"),), {"model_type": model_type})
    model_cls = type(f"Llava{prefix}Model", (LlavaMetaModel, base("Model")), {"config_class": config_cls})
    causal_lm_cls = type(
        f"Llava{prefix}ForCausalLM",
        (*((causal_lm_mixin,) if causal_lm_mixin else ()), LlavaMetaForCausalLM, base("ForCausalLM")),
        {
            "config_class": config_cls,
            "llava_model_class": model_cls,
            "decoder_pretrained_class": base("PreTrainedModel"),
        },
    )
    for cls in (config_cls, model_cls, causal_lm_cls):
        cls.__module__ = module
    return register_decoder(
        DecoderSpec(
            family=family,
            config_cls=config_cls,
            causal_lm_cls=causal_lm_cls,
            base_model_types=(family,),
            llava_model_types=llava_model_types or (model_type,),
            decoder_layer_cls=decoder_layer_cls or f"{prefix}DecoderLayer",
        )
    )


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
