"""Training: entry points (`train.py`, `train_mem.py`), data formats, preprocessing and `LLaVATrainer`.

Nothing heavy is imported here; `from llava.train.train import train` is the programmatic entry.
"""
