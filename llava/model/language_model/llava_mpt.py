"""LLaVA on MPT decoders (LLaVA-Lightning-MPT-7B-preview, mosaicml/mpt-7b-chat): `LlavaMptForCausalLM`.

Built on transformers' own MPT classes, so the weight keys are the original's: `transformer.wte.*`,
`transformer.blocks.N.*`, `transformer.norm_f.*`, `transformer.mm_projector.*` (the LM head is tied to `wte`).
Original LLaVA-MPT configs say `model_type: llava_mpt` and `architectures: ["LlavaMPTForCausalLM"]`.

MPT adds ALiBi biases to its attention scores, which only transformers' eager attention implements: whatever
attention is asked for (SDPA, FlashAttention-2), an MPT model runs eager attention, and says so once.
"""

from __future__ import annotations

import logging

from llava.model.language_model.registry import define_family

logger = logging.getLogger(__name__)


class MptQuirks:
    """What MPT needs on top of the shared LLaVA causal LM: eager attention, no position ids."""

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention not in (None, "eager"):
            logger.info("MPT uses ALiBi attention biases, which only eager attention supports; `%s` is not used.",
                        requested_attention)  # fmt: skip
        return "eager"

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        # MPT's positions come from ALiBi, not position ids: `generate` computes them, MPT takes none.
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=None, **kwargs)


SPEC = define_family("mpt", __name__, "Mpt", decoder_layer_cls="MptBlock", causal_lm_mixin=MptQuirks)
LlavaMptConfig, LlavaMptModel, LlavaMptForCausalLM = SPEC.classes
