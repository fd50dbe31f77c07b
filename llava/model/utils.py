"""`auto_upgrade`, the original LLaVA's in-place upgrade of a v0 checkpoint config, for code that imports it.

LLaVA v0 checkpoints were saved as plain LLaMA (`model_type: llama`) although they hold a projector. The original
asked on stdin and then rewrote `config.json` with `model_type: llava` and `architectures: [LlavaLlamaForCausalLM]`;
this module does the same (reading and writing the JSON file itself, not through a transformers config class).
"""

from __future__ import annotations

import json
import os

LEGACY_ARCHITECTURE = "LlavaLlamaForCausalLM"


def needs_upgrade(config: str) -> bool:
    """True when `config` (a checkpoint directory) has `llava` in its path but a non-LLaVA `model_type`."""
    cfg = _read_config(config)
    return "llava" in config and "llava" not in cfg.get("model_type", "")


def _read_config(config: str) -> dict:
    path = os.path.join(config, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"auto_upgrade: `{path}` does not exist; pass a checkpoint directory.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def auto_upgrade(config: str, confirm: bool | None = None) -> bool:
    """Rewrite the v0 checkpoint config in directory `config` as a LLaVA config; True when it was rewritten.

    As the original: only a path containing `llava` whose `model_type` lacks `llava` is upgraded, and the model
    type must be `llama` with exactly one architecture. `confirm=None` asks on stdin (the original's behaviour);
    True/False answers for scripts. Declining exits with status 1, as the original did.
    """
    if not needs_upgrade(config):
        return False
    cfg = _read_config(config)
    if cfg.get("model_type") != "llama":
        raise ValueError(
            f"auto_upgrade: `{config}` has model_type `{cfg.get('model_type')}`; only LLaMA-based v0 checkpoints "
            "(`model_type: llama`) can be upgraded."
        )
    architectures = cfg.get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"auto_upgrade: `{config}` lists {len(architectures)} architectures; expected exactly one.")
    print("This checkpoint was saved by LLaVA v0 code (model_type `llama`); its config can be upgraded in place.")
    if confirm is None:
        confirm = input("Upgrade the checkpoint config now? [Y/N]").strip().lower() in ("y", "yes")
    if not confirm:
        print("Checkpoint upgrade aborted.")
        raise SystemExit(1)
    cfg["model_type"] = "llava"
    cfg["architectures"] = [LEGACY_ARCHITECTURE]
    with open(os.path.join(config, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    print("Checkpoint upgraded.")
    return True


__all__ = ["auto_upgrade", "needs_upgrade"]
