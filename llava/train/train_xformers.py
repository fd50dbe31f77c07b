"""The original's xformers entry point, kept for old scripts: PyTorch SDPA has replaced xformers' attention."""

from __future__ import annotations


def main() -> None:
    from llava.train.train import train

    train(attn_implementation="sdpa", attn_reason="train_xformers.py: PyTorch SDPA replaces xformers")


if __name__ == "__main__":
    main()
