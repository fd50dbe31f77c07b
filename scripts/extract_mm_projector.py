"""Extract the projector of a full LLaVA checkpoint into `mm_projector.bin` (stage-1 format, for --pretrain_mm_mlp_adapter).

python scripts/extract_mm_projector.py --model-path ./checkpoints/llava-v1.5-13b --output ./mm_projector.bin
"""

from __future__ import annotations

import argparse
import glob
import os

import torch

KEYS_TO_MATCH = ("mm_projector",)


def _weight_files(model_path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    files += sorted(glob.glob(os.path.join(model_path, "pytorch_model*.bin")))
    if not files:
        raise SystemExit(f"`{model_path}` has no *.safetensors or pytorch_model*.bin weight files.")
    return files


def extract(model_path: str, output: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(model_path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights = load_file(path)
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        state.update({k: v for k, v in weights.items() if any(key in k for key in KEYS_TO_MATCH)})
    if not state:
        raise SystemExit(f"No projector weights (keys containing {KEYS_TO_MATCH}) in `{model_path}`.")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save(state, output)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="A full LLaVA checkpoint directory.")
    parser.add_argument("--output", required=True, help="Where to write mm_projector.bin.")
    args = parser.parse_args()
    state = extract(args.model_path, args.output)
    print(f"Wrote {len(state)} tensors to {args.output}: {sorted(state)}")


if __name__ == "__main__":
    main()
