"""Re-save a LLaVA checkpoint as one self-contained full checkpoint that loads through the plain `full` path.

    python -m llava.model.consolidate --src ~/model_weights/llava-7b --dst ~/model_weights/llava-7b_consolidate
    python -m llava.model.consolidate --src ./checkpoints/llava-lora --model-base ./vicuna-7b-v1.5 --dst ./merged
Tiny CPU run: tests/test_delta_tools.py (seconds).

The source is loaded with `load_pretrained_model` (so old configs, stage-1 and LoRA outputs with `--model-base` all
work) and saved with our class name and model type, LoRA merged, the vision tower's weights and config
(`mm_vision_tower_config`) inside so the tower directory is no longer needed, and the chat template it is prompted
with recorded as `conv_template` (for old checkpoints, the template the original picked from the source's name, so
renaming the directory cannot change it). Weights keep the source's dtype unless `--dtype` says otherwise.
"""

from __future__ import annotations

import argparse
import logging

import torch

from llava.model.make_delta import DTYPES

logger = logging.getLogger(__name__)


def _stored_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.json has dtype `{name}`; pass --dtype with one of {', '.join(sorted(DTYPES))}.")
    return DTYPES[name]


def consolidate_ckpt(
    src_path: str,
    dst_path: str,
    model_base: str | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> str:
    """Load `src_path` (on `model_base` for stage-1/LoRA outputs) and save it to `dst_path` as a full checkpoint."""
    from llava.model.builder import get_conv_mode, load_pretrained_model, read_config, resolve_local

    src = resolve_local(src_path)
    dtype = dtype or _stored_dtype(read_config(src))
    tokenizer, model, image_processor, _ = load_pretrained_model(src, model_base, device="cpu", dtype=dtype)
    if hasattr(model, "get_base_model"):  # an unmerged PeftModel
        model = model.merge_and_unload()
    config = model.config
    tower = model.get_vision_tower() if hasattr(model, "get_vision_tower") else None
    if tower is not None:
        config.mm_vision_tower_config = tower.config.to_dict()
        config.conv_template = get_conv_mode(config, src_path)
    model.save_pretrained(dst_path)
    tokenizer.save_pretrained(dst_path)
    if image_processor is not None:
        image_processor.save_pretrained(dst_path)
    logger.info("Consolidated %s into %s (%s)", src_path, dst_path, dtype)
    return dst_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="LLaVA checkpoint directory (or hub id)")
    parser.add_argument("--dst", required=True, help="output directory")
    parser.add_argument("--model-base", default=None, help="the decoder a stage-1 or LoRA checkpoint was trained on")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the source's dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    consolidate_ckpt(args.src, args.dst, args.model_base, dtype=DTYPES[args.dtype] if args.dtype else None)


if __name__ == "__main__":
    main()
