"""LLaVA on Qwen2 decoders (Qwen2 / Qwen2.5 instruct models): `LlavaQwen2ForCausalLM`."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from llava.model.language_model.registry import DecoderSpec, register_decoder
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaQwen2Config(Qwen2Config):
    model_type = "llava_qwen2"


class LlavaQwen2Model(LlavaMetaModel, Qwen2Model):
    config_class = LlavaQwen2Config


class LlavaQwen2ForCausalLM(LlavaMetaForCausalLM, Qwen2ForCausalLM):
    config_class = LlavaQwen2Config
    llava_model_class = LlavaQwen2Model
    decoder_pretrained_class = Qwen2PreTrainedModel


register_decoder(
    DecoderSpec(
        family="qwen2",
        config_cls=LlavaQwen2Config,
        causal_lm_cls=LlavaQwen2ForCausalLM,
        base_model_types=("qwen2",),
        llava_model_types=("llava_qwen2", "llava_qwen"),
        decoder_layer_cls="Qwen2DecoderLayer",
    )
)
