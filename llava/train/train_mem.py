"""Entry point of the seeds' scripts: `train()` with FlashAttention-2 when it is installed and usable, else SDPA.

deepspeed llava/train/train_mem.py --deepspeed ./scripts/zero2.json --model_name_or_path ... (scripts/v1_5/*.sh)
python llava/train/train_mem.py --model_name_or_path TINY_LLAMA ... --report_to none   # CPU, tiny models
"""

from __future__ import annotations

import importlib.util

import torch


def pick_attention() -> tuple[str, str]:
    """(attn_implementation, why) for this machine."""
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed (pip install flash-attn --no-build-isolation); using PyTorch SDPA"
    if not torch.cuda.is_available():
        return "sdpa", "flash-attn needs a CUDA GPU and there is none; using PyTorch SDPA"
    return "flash_attention_2", "flash-attn is installed and a CUDA GPU is present"


def main() -> None:
    from llava.train.train import close_distributed, train

    attn, why = pick_attention()
    train(attn_implementation=attn, attn_reason=why)
    close_distributed()


if __name__ == "__main__":
    main()
