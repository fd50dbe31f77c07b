"""Convert between original LLaVA checkpoints and llava-hf (`transformers.LlavaForConditionalGeneration`) dirs.

Export (original -> llava-hf); stage-1 and LoRA outputs work too, given the decoder they were trained on:
    python -m llava.model.convert_hf export --src ./checkpoints/llava-v1.5-7b --dst ./llava-v1.5-7b-hf
    python -m llava.model.convert_hf export --src ./checkpoints/llava-lora --model-base ./vicuna-7b-v1.5 --dst ./hf
Import (llava-hf -> original layout, vision tower weights included, so no tower directory is needed):
    python -m llava.model.convert_hf import --src ./llava-1.5-7b-hf --dst ./llava-v1.5-7b
Tiny CPU round trip: tests/test_convert_hf.py (same logits to 1e-4 in fp32, both ways, in a few seconds).

The two layouts hold the same numbers under other names (see KEY_MAP). llava-hf additionally has an `<image>` token
(repeated once per image feature in `input_ids`), which export adds to the tokenizer and embeddings; the original
marks an image with the sentinel id IMAGE_TOKEN_INDEX and needs no vocabulary entry, so import keeps the vocabulary
as it is. llava-hf can express only part of what the original can: one `Linear -> GELU -> Linear` projector, no
`<im_start>`/`<im_end>` tokens, no anyres tiling (that is LLaVA-NeXT). Export refuses the rest, naming the field.

This module is the export half and the CLI (it loads checkpoints with `llava.model.builder`); KEY_MAP and the import
half are `llava.model.llava_hf`, below the builder, which loads llava-hf dirs through it (re-exported here).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os

import torch
from transformers import AddedToken, AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.model.builder import get_conv_mode, load_pretrained_model, read_config, resolve_local
from llava.model.language_model import decoder_for_config
from llava.model.llava_hf import (  # noqa: F401  (re-exported: the import half and the key map lived here)
    _NOT_TEXT_KEYS,
    KEY_MAP,
    ConversionError,
    _load_into_empty,
    check_importable,
    convert_state_dict,
    import_from_hf,
    match_conv_template,
    rename_key,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# Export: original -> llava-hf
# ---------------------------------------------------------------------------------------------------------------------


def check_exportable(config: dict, source: str = "config.json") -> None:
    """Raise ConversionError naming every field of an original LLaVA config that llava-hf cannot express."""
    problems = []
    if not config.get("mm_vision_tower"):
        problems.append("it has no vision tower (`mm_vision_tower` is not set): a text-only model is not a Llava model")
    projector = config.get("mm_projector_type") or "linear"
    if projector != "mlp2x_gelu":
        problems.append(
            f"`mm_projector_type` is `{projector}`, but LlavaForConditionalGeneration's projector is "
            "Linear -> GELU -> Linear, i.e. `mlp2x_gelu` only"
        )
    if config.get("mm_use_im_start_end"):
        problems.append("`mm_use_im_start_end` is true: llava-hf has no `<im_start>`/`<im_end>` tokens around images")
    aspect = config.get("image_aspect_ratio")
    if aspect not in (None, "square", "resize", "pad"):
        hint = " (anyres tiling is LLaVA-NeXT: `LlavaNextForConditionalGeneration`)" if "anyres" in str(aspect) else ""
        problems.append(f"`image_aspect_ratio` is `{aspect}`; llava-hf Llava supports `square` and `pad`{hint}")
    merge = config.get("mm_patch_merge_type") or "flat"
    if "unpad" in merge:
        problems.append(
            f"`mm_patch_merge_type` is `{merge}`: its `image_newline` is LLaVA-NeXT (`LlavaNextForConditionalGeneration`)"
        )
    if problems:
        raise ConversionError(f"`{source}` cannot be exported to llava-hf: " + "; ".join(problems) + ".")


def _select_strategy(select_feature: str, has_cls_token: bool) -> str:
    """Original `mm_vision_select_feature` -> llava-hf `vision_feature_select_strategy` (which drops index 0)."""
    return "default" if select_feature == "patch" and has_cls_token else "full"


def _text_config(config, spec):
    """The plain decoder config (LlamaConfig, ...) inside one of our LLaVA configs."""
    model_type = spec.base_model_types[0]
    defaults = AutoConfig.for_model(model_type).to_dict()
    values = {k: v for k, v in config.to_dict().items() if k in defaults and k not in _NOT_TEXT_KEYS}
    return AutoConfig.for_model(model_type, **values)


def add_image_token(tokenizer, model) -> int:
    """Give the tokenizer an `<image>` token (and `<pad>` if it has no pad token); grow the embeddings to fit.

    New rows start at the mean of the existing ones. They change no other token's logit: an `<image>` row is always
    replaced by image features, and the pad token is masked. Returns the `<image>` id.
    """
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        from llava.model.llava_arch import resize_embeddings_to_mean

        resize_embeddings_to_mean(model, len(tokenizer), len(tokenizer) - rows)
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if tokenizer.encode(DEFAULT_IMAGE_TOKEN, add_special_tokens=False) != [image_id]:
        raise ConversionError(f"The tokenizer does not encode `{DEFAULT_IMAGE_TOKEN}` as one token after adding it.")
    return image_id


def _hf_image_processor(image_processor, aspect_ratio: str | None):
    """The tower's image processor; for `pad`, the llava-hf one that pads to a square with the mean colour first."""
    if aspect_ratio != "pad":
        return image_processor
    from transformers import LlavaImageProcessorPil

    settings = {
        k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "processor_class")
    }
    # Same result as mm_utils.expand2square (fill = int(mean * 255), image centred) followed by the tower's processor.
    return LlavaImageProcessorPil(**{**settings, "do_pad": True})


def _chat_template(conv_mode: str | None) -> str | None:
    if not conv_mode:
        return None
    from llava.conversation import to_chat_template_jinja

    try:
        return to_chat_template_jinja(conv_mode)
    except ValueError as err:
        logger.warning("No chat template written: template `%s` has no Hugging Face form (%s).", conv_mode, err)
        return None


def build_hf_model(model, tokenizer):
    """An in-memory `LlavaForConditionalGeneration` holding `model`'s weights (shared, not copied)."""
    config = model.config
    spec = decoder_for_config(config.to_dict())
    tower = model.get_vision_tower()
    image_id = add_image_token(tokenizer, model)
    text_config = _text_config(model.config, spec)
    text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    text_config.pad_token_id = tokenizer.pad_token_id
    strategy = _select_strategy(tower.select_feature, tower.spec.has_cls_token)
    hf_config = LlavaConfig(
        text_config=text_config,
        vision_config=copy.deepcopy(tower.config),
        image_token_index=image_id,
        image_seq_length=tower.num_patches,
        projector_hidden_act="gelu",
        vision_feature_layer=int(config.mm_vision_select_layer),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )
    hf_config.architectures = ["LlavaForConditionalGeneration"]
    hf_config.pad_token_id = tokenizer.pad_token_id
    state = convert_state_dict(model.state_dict(), to_hf=True)
    hf_model = _load_into_empty(LlavaForConditionalGeneration, hf_config, state, "LlavaForConditionalGeneration")
    hf_model.generation_config = copy.deepcopy(model.generation_config)
    if hf_model.generation_config.pad_token_id is None:
        hf_model.generation_config.pad_token_id = tokenizer.pad_token_id
    return hf_model


def export_to_hf(
    src: str,
    dst: str,
    model_base: str | None = None,
    *,
    conv_mode: str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the original-format checkpoint `src` (full, stage-1 or LoRA with `model_base`) as a llava-hf dir `dst`.

    Conversion runs on CPU in float32; `dtype` (e.g. torch.float16) sets the dtype of the saved weights. The chat
    template is `conv_mode`, else the one the checkpoint recorded, else the legacy guess from its name.
    """
    config = read_config(resolve_local(src))  # checked before any weight is read
    if config.get("model_type") == "llava" and "text_config" in config:
        raise ConversionError(
            f"`{src}` is already a llava-hf checkpoint; to go back to the original layout use import."
        )
    check_exportable(config, os.path.join(src, "config.json"))
    tokenizer, model, image_processor, _ = load_pretrained_model(src, model_base, device="cpu", dtype=torch.float32)
    if hasattr(model, "get_base_model"):  # an unmerged PeftModel: never the case with the default merge_lora=True
        model = model.merge_and_unload()
    check_exportable(model.config.to_dict(), os.path.join(src, "config.json"))
    hf_model = build_hf_model(model, tokenizer)
    if dtype is not None:
        hf_model.to(dtype)

    from transformers import LlavaProcessor

    tower = model.get_vision_tower()
    hf_image_processor = _hf_image_processor(image_processor, getattr(model.config, "image_aspect_ratio", None))
    processor = LlavaProcessor(
        image_processor=hf_image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=hf_model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if tower.spec.has_cls_token else 0,
        image_token=DEFAULT_IMAGE_TOKEN,
        chat_template=_chat_template(get_conv_mode(model.config, src, override=conv_mode)),
    )
    os.makedirs(dst, exist_ok=True)
    hf_model.save_pretrained(dst)
    processor.save_pretrained(dst)
    # Also the classic preprocessor_config.json: older readers (and our loader's tower-processor lookup) want it.
    hf_image_processor.save_pretrained(dst)
    logger.info("Exported %s to llava-hf format in %s", src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="original LLaVA checkpoint -> llava-hf (LlavaForConditionalGeneration)")
    exp.add_argument("--src", required=True, help="original checkpoint dir (full, stage-1 or LoRA)")
    exp.add_argument("--dst", required=True, help="output llava-hf dir")
    exp.add_argument("--model-base", default=None, help="the decoder a stage-1 or LoRA checkpoint was trained on")
    exp.add_argument("--conv-mode", default=None, help="chat template to write (default: recorded, else guessed)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    imp = sub.add_parser("import", help="llava-hf checkpoint -> original LLaVA layout")
    imp.add_argument("--src", required=True, help="llava-hf dir")
    imp.add_argument("--dst", required=True, help="output dir in the original layout")
    imp.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto keeps the stored dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "export":
        export_to_hf(args.src, args.dst, args.model_base, conv_mode=args.conv_mode, dtype=DTYPES[args.dtype])
    else:
        import_from_hf(args.src, args.dst, dtype=DTYPES.get(args.dtype, "auto"))
    print(f"Wrote {args.dst}")


if __name__ == "__main__":
    main()
