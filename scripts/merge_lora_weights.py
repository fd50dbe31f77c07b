"""Merge a LoRA / QLoRA run's adapter into its base and save a full checkpoint that loads without `--model-base`.

    python scripts/merge_lora_weights.py --model-path ./checkpoints/llava-v1.5-13b-lora \
        --model-base lmsys/vicuna-13b-v1.5 --save-model-path ./checkpoints/llava-v1.5-13b-merged
"""

from __future__ import annotations

import argparse
import os
import shutil

from llava.model.builder import load_pretrained_model
from llava.model.checkpoint_compat import SPM_FILE, finish_checkpoint_dir, sentencepiece_file


def merge_lora(args: argparse.Namespace) -> None:
    # On the CPU the merge runs in fp32 (no GPU needed); on CUDA in the loader's default bf16/fp16.
    tokenizer, model, _, _ = load_pretrained_model(args.model_path, args.model_base, None, device=args.device)
    if hasattr(model, "peft_config"):
        raise SystemExit(f"`{args.model_path}` was not merged; is it a LoRA checkpoint?")
    model.save_pretrained(args.save_model_path)
    tokenizer.save_pretrained(args.save_model_path)
    base_spm = os.path.join(os.path.expanduser(args.model_base), SPM_FILE)
    if sentencepiece_file(tokenizer) is None and os.path.isfile(base_spm):
        shutil.copyfile(base_spm, os.path.join(args.save_model_path, SPM_FILE))
    # Legacy config keys, the SentencePiece file, a tokenizer.json of tokenizers 0.15's form: the original LLaVA code
    # loads the merged model too.
    finish_checkpoint_dir(args.save_model_path, tokenizer)
    print(f"Merged checkpoint written to {args.save_model_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="LoRA output dir (adapter + non_lora_trainables.bin).")
    parser.add_argument("--model-base", required=True, help="The decoder the LoRA was trained on.")
    parser.add_argument("--save-model-path", required=True, help="Where to write the merged model.")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda.")
    merge_lora(parser.parse_args())


if __name__ == "__main__":
    main()
