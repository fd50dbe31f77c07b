"""Rebuild a LLaVA checkpoint from a published delta and its base model (the inverse of `make_delta`).

    python -m llava.model.apply_delta --base-model-path ./llama-7b --target-model-path ./llava-7b \
        --delta-path liuhaotian/LLaVA-7b-delta-v0
Tiny CPU run: tests/test_delta_tools.py (seconds).

Each decoder parameter the base also has becomes `delta + base` (the shared rows only, where the delta's vocabulary
is larger); multimodal parameters (projector, vision tower) are taken from the delta as-is. The result is saved in
the base's dtype unless `--dtype` says otherwise; the sum is computed in float32 or wider.
"""

from __future__ import annotations

import argparse
import logging

import torch

from llava.model.make_delta import DTYPES, copy_tokenizer, load_model, save_model, shift_by_base

logger = logging.getLogger(__name__)


def apply_delta(
    base_model_path: str,
    target_model_path: str,
    delta_path: str,
    *,
    dtype: torch.dtype | None = None,
) -> str:
    """Write `delta + base` to `target_model_path`, with the delta's config and tokenizer."""
    from llava.model.builder import resolve_local

    delta_dir = resolve_local(delta_path, "delta_path")  # a hub id is fetched once, for the model and its tokenizer
    logger.info("Loading base %s and delta %s", base_model_path, delta_dir)
    base, _ = load_model(base_model_path, decoder_only=True)
    delta, absent = load_model(delta_dir)
    out_dtype = dtype or base.dtype
    shift_by_base(delta, base.state_dict(), sign=1, out_dtype=out_dtype, source=delta_dir)
    save_model(delta, target_model_path, absent)
    copy_tokenizer(delta_dir, target_model_path)
    logger.info("Wrote %s (%s)", target_model_path, out_dtype)
    return target_model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model-path", required=True, help="the base model the delta was made against")
    parser.add_argument("--target-model-path", required=True, help="output directory")
    parser.add_argument("--delta-path", required=True, help="delta directory (or hub id)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the base's dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    apply_delta(
        args.base_model_path,
        args.target_model_path,
        args.delta_path,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )


if __name__ == "__main__":
    main()
