"""Extract the projector of a LLaVA checkpoint into `mm_projector.bin` (stage-1 format, for --pretrain_mm_mlp_adapter).

python scripts/extract_mm_projector.py --model-path ./checkpoints/llava-v1.5-13b --output ./mm_projector.bin
python scripts/extract_mm_projector.py --model_name_or_path ./checkpoints/llava-lightning-7b-pretrain \
    --output ./checkpoints/mm_projector/llava-lightning-7b-pretrain.bin      # the original's spelling

A full checkpoint gives its projector weights, plus its input embedding when it was trained with
`mm_use_im_start_end` (stage 2 restores the <im_start>/<im_end> rows from it). A stage-1 directory (which already
holds only `mm_projector.bin`) is copied as it is.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch

KEYS_TO_MATCH = ("mm_projector",)
# The input embedding, kept when the model was trained with <im_start>/<im_end> (LLaMA-style decoders, MPT).
EMBEDDING_KEYS = ("embed_tokens", "transformer.wte")


def _weight_files(model_path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    files += sorted(glob.glob(os.path.join(model_path, "pytorch_model*.bin")))
    if not files:
        raise SystemExit(f"`{model_path}` has no *.safetensors or pytorch_model*.bin weight files.")
    return files


def extract(model_path: str, output: str) -> dict[str, torch.Tensor]:
    model_path = os.path.expanduser(model_path)
    stage1 = os.path.join(model_path, "mm_projector.bin")
    if os.path.isfile(stage1) and not glob.glob(os.path.join(model_path, "*.safetensors")):
        state = torch.load(stage1, map_location="cpu", weights_only=True)
        _save(state, output)
        return state
    keys = KEYS_TO_MATCH
    config_file = os.path.join(model_path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            if json.load(f).get("mm_use_im_start_end"):
                keys = KEYS_TO_MATCH + EMBEDDING_KEYS
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(model_path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights = load_file(path)
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        state.update({k: v for k, v in weights.items() if any(key in k for key in keys)})
    if not any(key in k for k in state for key in KEYS_TO_MATCH):
        raise SystemExit(f"No projector weights (keys containing {KEYS_TO_MATCH}) in `{model_path}`.")
    _save(state, output)
    return state


def _save(state: dict[str, torch.Tensor], output: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save(state, output)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-path", "--model_name_or_path", dest="model_path", required=True, help="A LLaVA checkpoint directory."
    )
    parser.add_argument("--output", required=True, help="Where to write mm_projector.bin.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    state = extract(args.model_path, args.output)
    print(f"Wrote {len(state)} tensors to {args.output}: {sorted(state)}")


if __name__ == "__main__":
    main()
