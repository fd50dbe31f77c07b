"""What a checkpoint directory needs so the original LLaVA code (transformers 4.37, peft 0.10) reads it too.

Our writers (the trainer, scripts/merge_lora_weights.py, the llava-hf import) call `finish_checkpoint_dir` after
saving. It adds, without changing what our own loader reads:
  config.json            the legacy rope keys (`rope_theta`, `rope_scaling`) beside transformers 5's `rope_parameters`
  tokenizer.model        the SentencePiece file of the tokenizer, when it has one (the original loads LLaMA-style
                         tokenizers with the slow, SentencePiece-only `LlamaTokenizer`)
  tokenizer_config.json  a `tokenizer_class` transformers 4.37 has, where transformers 5 wrote `TokenizersBackend`
  tokenizer.json         in the form tokenizers 0.15 reads, as the tokenizer our loader builds (tokenizer_compat)
  adapter_config.json    only the keys peft 0.10 knows, when every other key is at its default
  model*.safetensors     a trained tower's weights under transformers 4.x's `vision_model.` level
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

from llava.model.tokenizer_compat import write_legacy_tokenizer_json

logger = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
# The fields of peft 0.10.0's LoraConfig (the original's pin). Its `from_pretrained` passes every key of
# adapter_config.json to the dataclass, so any other key is a TypeError there.
PEFT_010_LORA_FIELDS = frozenset(
    (
        "alpha_pattern auto_mapping base_model_name_or_path bias fan_in_fan_out inference_mode init_lora_weights "
        "layer_replication layers_pattern layers_to_transform loftq_config lora_alpha lora_dropout megatron_config "
        "megatron_core modules_to_save peft_type r rank_pattern revision target_modules task_type use_dora use_rslora"
    ).split()
)
# Rope types transformers 4.37 understands in `rope_scaling` (`{"type": ..., "factor": ...}`).
LEGACY_ROPE_TYPES = ("linear", "dynamic")


def legacy_rope_keys(config: dict) -> dict:
    """`rope_theta` / `rope_scaling` as transformers 4.x reads them, from a transformers 5 `rope_parameters`."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    out: dict = {"rope_theta": rope["rope_theta"]}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        out["rope_scaling"] = None
    elif rope_type in LEGACY_ROPE_TYPES and set(rope) <= {"rope_theta", "rope_type", "type", "factor"}:
        out["rope_scaling"] = {"type": rope_type, "factor": rope["factor"]}
    else:
        logger.warning(
            "config.json: rope type `%s` (%s) has no form that transformers 4.37 (the original LLaVA's pin) reads; "
            "the original code would use unscaled rope for this checkpoint.",
            rope_type,
            rope,
        )
    return out


def write_legacy_config_keys(output_dir: str) -> None:
    """Add the legacy rope keys to `output_dir/config.json` (a no-op for configs without `rope_parameters`)."""
    path = os.path.join(output_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    extra = legacy_rope_keys(config)
    if not extra or all(config.get(k, object()) == v for k, v in extra.items()):
        return
    config.update(extra)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def sentencepiece_file(tokenizer) -> str | None:
    """The SentencePiece model file `tokenizer` was loaded from, if any."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    source = getattr(tokenizer, "name_or_path", None)
    if source:
        candidates.append(os.path.join(os.path.expanduser(source), SPM_FILE))
    for path in candidates:
        if isinstance(path, str) and os.path.basename(path) == SPM_FILE and os.path.isfile(path):
            return path
    return None


def write_legacy_tokenizer_class(output_dir: str) -> None:
    """transformers 5 may record `tokenizer_class: TokenizersBackend`, a class transformers 4.37 does not have: name
    the 4.x class that reads the same files (`LlamaTokenizer` beside a SentencePiece file, else the generic fast
    tokenizer)."""
    path = os.path.join(output_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        config = json.load(f)
    if config.get("tokenizer_class") != "TokenizersBackend":
        return
    has_spm = os.path.isfile(os.path.join(output_dir, SPM_FILE))
    config["tokenizer_class"] = "LlamaTokenizer" if has_spm else "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def copy_sentencepiece(tokenizer, output_dir: str) -> str | None:
    """Copy the tokenizer's `tokenizer.model` into `output_dir` (transformers 5 does not write it). Returns the copy."""
    source = sentencepiece_file(tokenizer)
    if source is None:
        return None
    target = os.path.join(output_dir, SPM_FILE)
    if not (os.path.exists(target) and os.path.samefile(source, target)):
        shutil.copyfile(source, target)
    return target


def legacy_adapter_config(config: dict, source: str = "adapter_config.json") -> dict:
    """`config` without the keys peft 0.10 rejects; such a key is kept (and logged) only when set to a non-default."""
    from peft import LoraConfig

    if config.get("peft_type", "LORA") != "LORA":
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING}
    defaults.update(
        {
            f.name: f.default_factory()
            for f in dataclasses.fields(LoraConfig)
            if f.default_factory is not dataclasses.MISSING
        }
    )
    out, kept = {}, []
    for key, value in config.items():
        if key in PEFT_010_LORA_FIELDS:
            out[key] = value
        elif key == "peft_version" or (key in defaults and value == defaults[key]):
            continue
        else:
            out[key] = value
            kept.append(key)
    if kept:
        logger.warning(
            "%s: %s set to non-default values that peft 0.10 (the original LLaVA's pin) does not know; the original "
            "code cannot load this adapter.",
            source,
            ", ".join(f"`{k}`" for k in kept),
        )
    return out


def write_legacy_adapter_config(output_dir: str) -> None:
    path = os.path.join(output_dir, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(legacy_adapter_config(config, path), f, indent=2, sort_keys=True)
        f.write("\n")


TOWER_PREFIX = "vision_tower.vision_tower."
# Towers whose transformers 4.x class nests its weights under `vision_model.` (transformers 5 flattened them).
NESTED_TOWER_TYPES = ("clip_vision_model", "siglip_vision_model")


def _legacy_tower_key(key: str) -> str:
    head, sep, rest = key.partition(TOWER_PREFIX)
    if not sep or rest.startswith("vision_model."):
        return key
    return f"{head}{TOWER_PREFIX}vision_model.{rest}"


def write_legacy_tower_keys(output_dir: str) -> None:
    """Store a trained tower under the key layout transformers 4.37 reads (`...vision_tower.vision_model.*`); the
    original loads stored tower weights for `unfreeze_mm_vision_tower` checkpoints and would otherwise leave them
    uninitialised. Our loader reads both layouts."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(output_dir, "config.json")) as f:
        config = json.load(f)
    tower_type = (config.get("mm_vision_tower_config") or {}).get("model_type", "clip_vision_model")
    if not config.get("unfreeze_mm_vision_tower") or tower_type not in NESTED_TOWER_TYPES:
        return
    renamed_any = False
    for name in sorted(os.listdir(output_dir)):
        if not (name.startswith("model") and name.endswith(".safetensors")):
            continue
        path = os.path.join(output_dir, name)
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            if all(_legacy_tower_key(k) == k for k in keys):
                continue
            metadata = f.metadata() or {"format": "pt"}
            state = {_legacy_tower_key(k): f.get_tensor(k) for k in keys}
        save_file(state, path, metadata=metadata)
        renamed_any = True
    index_file = os.path.join(output_dir, "model.safetensors.index.json")
    if renamed_any and os.path.isfile(index_file):
        with open(index_file) as f:
            index = json.load(f)
        index["weight_map"] = {_legacy_tower_key(k): v for k, v in index["weight_map"].items()}
        with open(index_file, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")


def finish_checkpoint_dir(output_dir: str, tokenizer=None, tower_keys: bool = True) -> None:
    """Make a checkpoint directory our writers just saved readable by the original LLaVA code as well.

    `tower_keys=False` keeps transformers 5's tower key layout (the trainer's intermediate `checkpoint-N` dirs,
    which resuming reloads with a plain `load_state_dict`)."""
    if os.path.isfile(os.path.join(output_dir, "config.json")):
        write_legacy_config_keys(output_dir)
        if tower_keys:
            write_legacy_tower_keys(output_dir)
    if tokenizer is not None:
        copy_sentencepiece(tokenizer, output_dir)
    write_legacy_tokenizer_class(output_dir)
    write_legacy_tokenizer_json(output_dir)  # after the class: it rewrites what our loader builds from the dir
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
        write_legacy_adapter_config(output_dir)
