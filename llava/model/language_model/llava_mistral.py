"""LLaVA on Mistral decoders (BakLLaVA, LLaVA-1.6-Mistral): `LlavaMistralForCausalLM`."""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from llava.model.language_model.registry import DecoderSpec, register_decoder
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaMistralConfig(MistralConfig):
    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig


class LlavaMistralForCausalLM(LlavaMetaForCausalLM, MistralForCausalLM):
    config_class = LlavaMistralConfig
    llava_model_class = LlavaMistralModel
    decoder_pretrained_class = MistralPreTrainedModel


register_decoder(
    DecoderSpec(
        family="mistral",
        config_cls=LlavaMistralConfig,
        causal_lm_cls=LlavaMistralForCausalLM,
        base_model_types=("mistral",),
        llava_model_types=("llava_mistral",),
        decoder_layer_cls="MistralDecoderLayer",
    )
)
