"""llava: train and serve LLaVA-style vision-language models."""

from __future__ import annotations

import importlib

# The thread policy's OpenMP wait setting must be in the environment before torch loads its OpenMP runtime.
from llava import runtime as _runtime  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE unless already set)

__version__ = "1.3.0"

# Names the original LLaVA exported from `llava` (its `from .model import LlavaLlamaForCausalLM`) and the other model
# classes of `llava.model`. Resolved on first access, so `import llava` stays light (no torch, no transformers).
_LAZY = {
    name: "llava.model"
    for name in (
        "LlavaConfig",
        "LlavaLlamaForCausalLM",
        "LlavaMistralConfig",
        "LlavaMistralForCausalLM",
        "LlavaMptConfig",
        "LlavaMptForCausalLM",
    )
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llava' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["LlavaLlamaForCausalLM", "__version__"]
