"""LLaVA on LLaMA decoders (Vicuna, LLaMA-2/3): `LlavaLlamaForCausalLM`."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from llava.model.language_model.registry import DecoderSpec, register_decoder
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaConfig(LlamaConfig):
    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig


class LlavaLlamaForCausalLM(LlavaMetaForCausalLM, LlamaForCausalLM):
    config_class = LlavaConfig
    llava_model_class = LlavaLlamaModel
    decoder_pretrained_class = LlamaPreTrainedModel


register_decoder(
    DecoderSpec(
        family="llama",
        config_cls=LlavaConfig,
        causal_lm_cls=LlavaLlamaForCausalLM,
        base_model_types=("llama",),
        llava_model_types=("llava_llama", "llava"),
        decoder_layer_cls="LlamaDecoderLayer",
    )
)
