"""LLaVA's added tokens (`<im_patch>`, `<im_start>`, `<im_end>`): adding them to a tokenizer and the embeddings."""

from __future__ import annotations

import logging

import torch

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.model.checkpoint_format import restore_token_rows

logger = logging.getLogger(__name__)


def resize_embeddings_to_mean(model, new_size: int, n_new: int) -> None:
    """Grow input/output embeddings to `new_size`, initialising the `n_new` last rows at the mean of the others."""
    model.resize_token_embeddings(new_size, mean_resizing=False)
    for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        with torch.no_grad():
            emb[-n_new:] = emb[:-n_new].mean(dim=0, keepdim=True)


def start_end_token_ids(tokenizer) -> list[int]:
    """Ids of `<im_start>`, `<im_end>` in `tokenizer` (which must hold them)."""
    ids = tokenizer.convert_tokens_to_ids([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"The tokenizer has no `{DEFAULT_IM_START_TOKEN}`/`{DEFAULT_IM_END_TOKEN}` tokens.")
    return list(ids)


def add_image_tokens(model, model_args, tokenizer) -> None:
    """Add `<im_patch>` / `<im_start>`, `<im_end>` when `model_args` asks for them; new rows start at the mean.

    Stage 1 (`tune_mm_mlp_adapter`) with start/end tokens lets the input embedding learn (the output head stays
    frozen unless it is the input embedding itself, as in MPT); with `pretrain_mm_mlp_adapter` (stage 2) the rows
    stage 1 learned come back from its projector file."""
    new_tokens = []
    if getattr(model_args, "mm_use_im_patch_token", False):
        new_tokens.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if getattr(model_args, "mm_use_im_start_end", False):
        new_tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    if not new_tokens:
        return
    added = tokenizer.add_tokens(new_tokens, special_tokens=True)
    if added:
        resize_embeddings_to_mean(model, len(tokenizer), added)
    if not getattr(model_args, "mm_use_im_start_end", False):
        return
    if getattr(model_args, "tune_mm_mlp_adapter", False):
        inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        inputs.requires_grad_(True)
        if outputs is not inputs:
            outputs.requires_grad_(False)
    adapter = getattr(model_args, "pretrain_mm_mlp_adapter", None)
    if adapter:
        state = torch.load(adapter, map_location="cpu", weights_only=True)
        if not restore_token_rows(model, state, start_end_token_ids(tokenizer), adapter):
            logger.warning(
                "`%s` holds no input-embedding rows (was stage 1 run without --mm_use_im_start_end?): "
                "<im_start>/<im_end> start from the mean embedding.",
                adapter,
            )
