"""Entry point for GPUs without FlashAttention (V100, T4, other pre-Ampere cards): `train()` on PyTorch SDPA's
memory-efficient kernel, which replaces the original's xformers attention. flash-attn is never imported.

deepspeed llava/train/train_xformers.py --deepspeed ./scripts/zero2.json --bf16 False --tf32 False ...
(scripts/pretrain_xformers.sh; V100s have no bf16: train in fp32, or with `--fp16 True`)
"""

from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

# What SDPA may use here: the memory-efficient kernel (any CUDA GPU), and the math kernel where that cannot run
# (CPU, unsupported shapes). Not the flash kernel, which needs sm80+.
BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def main(argv: list[str] | None = None, callbacks=None):
    from llava.train.train import train

    with sdpa_kernel(BACKENDS):
        return train(
            argv,
            callbacks=callbacks,
            attn_implementation="sdpa",
            attn_reason="train_xformers.py: PyTorch SDPA, memory-efficient kernel (no flash-attn)",
        )


if __name__ == "__main__":
    from llava.train.train import close_distributed

    main()
    close_distributed()
