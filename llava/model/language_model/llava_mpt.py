"""LLaVA on MPT decoders (LLaVA-Lightning-MPT-7B-preview, mosaicml/mpt-7b-chat): `LlavaMptForCausalLM`.

Built on transformers' own MPT classes, so the weight keys are the original's: `transformer.wte.*`,
`transformer.blocks.N.*`, `transformer.norm_f.*`, `transformer.mm_projector.*` (the LM head is tied to `wte`).
Original LLaVA-MPT configs say `model_type: llava_mpt` and `architectures: ["LlavaMPTForCausalLM"]`.

MPT adds ALiBi biases to its attention scores, which only transformers' eager attention implements: whatever
attention is asked for (SDPA, FlashAttention-2), an MPT model runs eager attention, and says so once.
"""

from __future__ import annotations

import logging

from transformers import MptConfig, MptForCausalLM, MptModel
from transformers.models.mpt.modeling_mpt import MptPreTrainedModel

from llava.model.language_model.registry import DecoderSpec, register_decoder
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel

logger = logging.getLogger(__name__)


class LlavaMptConfig(MptConfig):
    model_type = "llava_mpt"


class LlavaMptModel(LlavaMetaModel, MptModel):
    config_class = LlavaMptConfig


class LlavaMptForCausalLM(LlavaMetaForCausalLM, MptForCausalLM):
    config_class = LlavaMptConfig
    llava_model_class = LlavaMptModel
    decoder_pretrained_class = MptPreTrainedModel

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention not in (None, "eager"):
            logger.info("MPT uses ALiBi attention biases, which only eager attention supports; `%s` is not used.",
                        requested_attention)  # fmt: skip
        return "eager"

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        # MPT's positions come from ALiBi, not position ids: `generate` computes them, MPT takes none.
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=None, **kwargs)


register_decoder(
    DecoderSpec(
        family="mpt",
        config_cls=LlavaMptConfig,
        causal_lm_cls=LlavaMptForCausalLM,
        base_model_types=("mpt",),
        llava_model_types=("llava_mpt",),
        decoder_layer_cls="MptBlock",
    )
)
