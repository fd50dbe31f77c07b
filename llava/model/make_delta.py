"""Make a delta checkpoint (target minus base), to publish a fine-tune of a base whose licence forbids sharing it.

    python -m llava.model.make_delta --base-model-path ./llama-7b --target-model-path ./llava-7b \
        --delta-path ./llava-7b-delta
Tiny CPU run: tests/test_delta_tools.py (seconds). `apply_delta` (same flags) inverts it.

Every decoder parameter the base also has becomes `target - base`. Where the target grew the vocabulary
(`model.embed_tokens.weight`, `lm_head.weight` with extra rows), the shared rows get the difference and the extra
rows keep the target's values. Multimodal parameters (projector, vision tower, `image_newline`) are stored as-is.
A vision tower that the target's files do not hold is left out of the delta too.

The arithmetic runs in float32 (or wider). A delta stored in the weights' own dtype, as the original LLaVA did, can
be off by one unit in the last place after `apply_delta` where |base| is much larger than |target|. `--delta-dtype
float64` stores a delta that gives the target back bit for bit (unless |base| exceeds |target| by 2**29 or more).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from llava.model.language_model import decoder_for_config

logger = logging.getLogger(__name__)

MULTIMODAL_MARKERS = ("mm_projector.", "vision_tower.", "image_newline")
VOCAB_PARAMS = ("model.embed_tokens.weight", "lm_head.weight")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Fields that make a config multimodal; dropped when only the decoder of a checkpoint is wanted.
_MM_FIELDS = ("mm_vision_tower", "vision_tower", "mm_vision_tower_config")


class DeltaError(ValueError):
    """Base, target and delta do not fit together."""


def is_multimodal(name: str) -> bool:
    return any(marker in name for marker in MULTIMODAL_MARKERS)


def _read_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise DeltaError(f"`{path}` has no config.json; pass a model directory.")
    with open(config_file) as f:
        return json.load(f)


def load_model(path: str, dtype: torch.dtype | str = "auto", decoder_only: bool = False):
    """Load a LLaVA or plain decoder dir with our classes, on CPU.

    Returns `(model, absent)`: `absent` holds the vision-tower weights the files do not contain (left untouched and
    never saved). `decoder_only` ignores the vision tower and projector (for a base).
    """
    from llava.model.builder import resolve_local

    path = resolve_local(path)
    raw = _read_config(path)
    spec = decoder_for_config(raw, os.path.join(path, "config.json"))
    values = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    if decoder_only:
        values = {k: v for k, v in values.items() if k not in _MM_FIELDS}
    config = spec.config_cls(**values)
    model, info = spec.causal_lm_cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    missing = set(info["missing_keys"])
    absent = {k for k in missing if "vision_tower." in k}
    if missing - absent:
        raise DeltaError(f"`{path}` lacks weights its config calls for: {sorted(missing - absent)[:8]}.")
    model.eval()
    return model, absent


def shift_by_base(model, base_state: dict[str, torch.Tensor], sign: int, out_dtype: torch.dtype, source: str) -> None:
    """In place: add `sign * base` to each decoder parameter of `model` (its first rows where the vocab grew), then
    cast the whole model to `out_dtype`. Multimodal parameters are only cast."""
    results = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        if is_multimodal(name) or tensor.data_ptr() in seen:  # tied weights share storage: shift once
            continue
        seen.add(tensor.data_ptr())
        base = base_state.get(name)
        if base is None:
            raise DeltaError(
                f"`{name}` of `{source}` is not in the base model; is the base the model it was fine-tuned from?"
            )
        if base.shape != tensor.shape:
            grown = name in VOCAB_PARAMS and base.shape[1:] == tensor.shape[1:] and base.shape[0] <= tensor.shape[0]
            if not grown:
                raise DeltaError(
                    f"`{name}`: shape {tuple(tensor.shape)} in `{source}` vs {tuple(base.shape)} in the base. Only "
                    f"{' and '.join(VOCAB_PARAMS)} may differ, by extra vocabulary rows."
                )
        work = torch.promote_types(
            torch.promote_types(tensor.dtype, base.dtype), torch.promote_types(out_dtype, torch.float32)
        )
        value = tensor.to(work, copy=True)
        value[: base.shape[0]].add_(base.to(work), alpha=sign)
        results[name] = value.to(out_dtype)
    model.to(out_dtype)
    model.load_state_dict(results, strict=False)


def save_model(model, path: str, absent: set[str], **kwargs) -> None:
    state = {k: v for k, v in model.state_dict().items() if k not in absent}
    model.save_pretrained(path, state_dict=state, **kwargs)


def copy_tokenizer(src: str, dst: str, **kwargs) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src).save_pretrained(dst, **kwargs)


def make_delta(
    base_model_path: str,
    target_model_path: str,
    delta_path: str,
    hub_repo_id: str | None = None,
    *,
    delta_dtype: torch.dtype | None = None,
) -> str:
    """Write `target - base` to `delta_path` (in the target's dtype, or `delta_dtype`); see the module docstring."""
    logger.info("Loading base %s and target %s", base_model_path, target_model_path)
    base, _ = load_model(base_model_path, decoder_only=True)
    target, absent = load_model(target_model_path)
    out_dtype = delta_dtype or target.dtype
    shift_by_base(target, base.state_dict(), sign=-1, out_dtype=out_dtype, source=target_model_path)
    push = {"push_to_hub": True, "repo_id": hub_repo_id} if hub_repo_id else {}
    save_model(target, delta_path, absent, **push)
    copy_tokenizer(target_model_path, delta_path, **push)
    logger.info("Wrote delta %s (%s)", delta_path, out_dtype)
    return delta_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model-path", required=True, help="the model the target was fine-tuned from")
    parser.add_argument("--target-model-path", required=True, help="the fine-tuned LLaVA checkpoint")
    parser.add_argument("--delta-path", required=True, help="output directory")
    parser.add_argument("--hub-repo-id", default=None, help="also push the delta to this Hugging Face repo")
    parser.add_argument("--delta-dtype", choices=sorted(DTYPES), default=None, help="default: the target's dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_delta(
        args.base_model_path,
        args.target_model_path,
        args.delta_path,
        args.hub_repo_id,
        delta_dtype=DTYPES[args.delta_dtype] if args.delta_dtype else None,
    )


if __name__ == "__main__":
    main()
