"""The checkpoint formats, both directions: file names, what kind a directory is, and how each kind is written and read.

Kinds, decided from a directory's files and config (never from its name):
  full       an HF decoder dir whose config adds `mm_vision_tower` etc. (LLaVA-1.5/1.6 releases, our full fine-tunes)
  projector  stage-1 output: `config.json` + `mm_projector.bin`, loaded on top of a base decoder
  lora       `adapter_config.json` + adapter weights + `non_lora_trainables.bin`, loaded on top of a base decoder
  hf         llava-hf (`LlavaForConditionalGeneration`), converted to our classes on load (`llava.model.llava_hf`)
  text       a plain decoder with no vision tower (language-only)

`LLaVATrainer` writes `full`, `projector` and `lora` (its `checkpoint_format`) with `write_trained_state` /
`finish_full_checkpoint` and resumes from them with `read_trained_state` + `load_trained_state`;
`llava.model.builder.load_pretrained_model` detects the kind with `detect_checkpoint_kind` and reads the partial
kinds with the same two functions, so whatever the trainer writes loads as it is. `load_trained_state` is the one
loader of partial state dicts; `load_projector_weights` and `restore_token_rows` are its two checked steps, also used
on their own by `--pretrain_mm_mlp_adapter` (llava.model.llava_arch).
"""

from __future__ import annotations

import copy
import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llava.model.checkpoint_compat import finish_checkpoint_dir, write_legacy_config_keys

CONFIG_FILE = "config.json"
PROJECTOR_FILE = "mm_projector.bin"  # stage 1: the trainable weights (projector, <im_start>/<im_end> embedding)
NON_LORA_FILE = "non_lora_trainables.bin"  # LoRA runs: the trainable weights that are not LoRA (the projector, ...)
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin", "model*.bin")  # any shard of a full model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_ARGS_FILE = "training_args.bin"

KINDS = ("full", "projector", "lora", "hf", "text")
TRAINER_KINDS = ("projector", "lora", "full")  # what LLaVATrainer writes, chosen by what trains
# The weight files each kind the trainer writes needs: one file of each group.
REQUIRED_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "projector": ((PROJECTOR_FILE,),),
    "lora": ((ADAPTER_CONFIG_FILE,), ADAPTER_WEIGHT_FILES, (NON_LORA_FILE,)),
    "full": (FULL_WEIGHT_FILES,),
}
# Where a stage-1 file keeps the input embedding: LLaMA-style decoders, MPT.
EMBEDDING_KEY_SUFFIXES = (".embed_tokens.weight", ".wte.weight")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not fit the model it is loaded into."""


@dataclass
class CheckpointInfo:
    path: str
    kind: str  # one of KINDS
    config: dict


# ------------------------------------------------------------------------------------------------------- detection


def weight_files(path: str) -> list[str]:
    """The full-model weight files (all shards) in `path`."""
    return sorted(f for pattern in WEIGHT_PATTERNS for f in glob.glob(os.path.join(path, pattern)))


def read_config(path: str) -> dict:
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"`{path}` has no config.json; files there: {sorted(os.listdir(path))[:20]}.")
    with open(config_file) as f:
        return json.load(f)


def detect_checkpoint_kind(path: str) -> CheckpointInfo:
    """Classify a local checkpoint directory by its files and config."""
    files = set(os.listdir(path))
    if ADAPTER_CONFIG_FILE in files:
        return CheckpointInfo(path, "lora", read_config(path) if CONFIG_FILE in files else {})
    config = read_config(path)
    archs = config.get("architectures") or []
    if "LlavaForConditionalGeneration" in archs or (config.get("model_type") == "llava" and "text_config" in config):
        return CheckpointInfo(path, "hf", config)
    has_weights = bool(weight_files(path))
    if not config.get("mm_vision_tower"):
        if has_weights:
            return CheckpointInfo(path, "text", config)
        raise CheckpointError(f"`{path}` has a config.json but no weights and no `mm_vision_tower`.")
    if has_weights:
        return CheckpointInfo(path, "full", config)
    if PROJECTOR_FILE in files:
        return CheckpointInfo(path, "projector", config)
    raise CheckpointError(
        f"`{path}`: config.json names a vision tower but there are no model weights ({', '.join(WEIGHT_PATTERNS)}) "
        f"and no `{PROJECTOR_FILE}`. Is the directory complete?"
    )


def missing_weight_files(path: str, kind: str) -> list[str]:
    """The weight files of `kind` (one of TRAINER_KINDS) that `path` lacks, each as "`a` or `b`"."""
    return [
        " or ".join(f"`{n}`" for n in names)
        for names in REQUIRED_FILES[kind]
        if not any(os.path.isfile(os.path.join(path, n)) for n in names)
    ]


# --------------------------------------------------------------------------------------------------------- writing


def unwrap_llava(model: nn.Module) -> nn.Module:
    """The LLaVA model under a PeftModel / DDP / DeepSpeed wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint_config(model: nn.Module, output_dir: str) -> None:
    """config.json describing the LLaVA model (never the quantization used while training), with the legacy keys
    the original LLaVA's transformers 4.37 reads (`rope_theta`, ...)."""
    base = unwrap_llava(model)
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.use_cache = True  # off while training; inference wants it
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tower = base.get_vision_tower() if hasattr(base, "get_vision_tower") else None
    if tower is not None and any(p.requires_grad for p in base.parts().get("vision_tower", ())):  # LoRA: own part
        # The stored tower weights are the run's own: loaders must use them, not reload `mm_vision_tower`.
        config.unfreeze_mm_vision_tower = True
    config.save_pretrained(output_dir)
    write_legacy_config_keys(output_dir)


def finish_full_checkpoint(model: nn.Module, output_dir: str, tokenizer=None, final: bool = True) -> None:
    """After `save_pretrained` wrote a `full` checkpoint's weights: its config, and what the original code needs.
    A trained tower's keys move to the original's layout only in a `final` output: `checkpoint-N` dirs are resumed
    with a plain `load_state_dict` (`load_pretrained_model` reads both layouts)."""
    save_checkpoint_config(model, output_dir)
    finish_checkpoint_dir(output_dir, tokenizer, tower_keys=final)


def write_trained_state(
    model: nn.Module, state: dict[str, torch.Tensor], output_dir: str, kind: str, tokenizer=None
) -> None:
    """Write a `projector` or `lora` checkpoint: `state` (the trainable weights, on CPU, under `model`'s own names)
    as `mm_projector.bin`, or as the adapter files plus `non_lora_trainables.bin`; then config and tokenizer."""
    os.makedirs(output_dir, exist_ok=True)
    if kind == "projector":
        torch.save(state, os.path.join(output_dir, PROJECTOR_FILE))
    elif kind == "lora":
        lora = {n: t for n, t in state.items() if "lora_" in n}
        model.save_pretrained(output_dir, state_dict=lora, save_embedding_layers=False)
        torch.save({n: t for n, t in state.items() if "lora_" not in n}, os.path.join(output_dir, NON_LORA_FILE))
    else:
        raise ValueError(f"write_trained_state writes `projector` or `lora` checkpoints, not `{kind}`.")
    save_checkpoint_config(model, output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    finish_checkpoint_dir(output_dir, tokenizer)  # tokenizer.model, a peft-0.10 adapter config


# --------------------------------------------------------------------------------------------------------- reading


def read_trained_state(path: str, kind: str) -> tuple[dict[str, torch.Tensor], str]:
    """The trained weights a `projector` or `lora` checkpoint stores beside its base, and the file they came from."""
    if kind not in ("projector", "lora"):
        raise ValueError(f"read_trained_state reads `projector` or `lora` checkpoints, not `{kind}`.")
    name = PROJECTOR_FILE if kind == "projector" else NON_LORA_FILE
    source = os.path.join(path, name)
    if not os.path.isfile(source):
        what = "LoRA dir" if kind == "lora" else "Stage-1 dir"
        raise CheckpointError(f"{what} `{path}` has no `{name}` (the trained projector). Is the run complete?")
    return torch.load(source, map_location="cpu", weights_only=True), source


def load_projector_weights(projector: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `mm_projector.*` entries of a stage-1 / non-LoRA state dict; any missing or misshapen weight is an error."""
    prefix_keys = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not prefix_keys:
        raise ValueError(
            f"`{source}` holds no projector weights (no key containing `mm_projector.`; keys: {sorted(state)[:5]})."
        )
    own = projector.state_dict()
    missing = sorted(set(own) - set(prefix_keys))
    unexpected = sorted(set(prefix_keys) - set(own))
    wrong = [
        f"{k}: file {tuple(prefix_keys[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in prefix_keys and prefix_keys[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"Projector weights in `{source}` do not fit this model's `mm_projector` "
            f"(missing: {missing}, unexpected: {unexpected}, shape mismatches: {wrong}). Check that "
            "`mm_projector_type`, the vision tower and the decoder are the ones the projector was trained with."
        )
    ref = next(projector.parameters(), None)
    kwargs = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    projector.load_state_dict({k: v.to(**kwargs) for k, v in prefix_keys.items()})


def _embedding_keys(model: nn.Module, state: dict) -> list[str]:
    weight = model.get_input_embeddings().weight
    own_name = next((n for n, p in model.named_parameters() if p is weight), None)
    return [k for k in state if k == own_name or k.endswith(EMBEDDING_KEY_SUFFIXES)]


def restore_token_rows(model, state: dict[str, torch.Tensor], token_ids: Sequence[int], source: str) -> bool:
    """Copy the input-embedding rows of `token_ids` from a stage-1 state dict (`mm_projector.bin` of a run with
    `--mm_use_im_start_end`) into `model`. The file holds either the whole embedding (as this package and the
    original save it) or just those rows. Returns False when it holds no embedding; a misshapen one is an error."""
    weight = model.get_input_embeddings().weight
    keys = _embedding_keys(model, state)
    if not keys:
        return False
    saved = state[keys[0]]
    if saved.shape == weight.shape:
        rows = saved[list(token_ids)]
    elif saved.shape == (len(token_ids), weight.shape[1]):
        rows = saved
    else:
        raise ValueError(
            f"`{source}`: `{keys[0]}` has shape {tuple(saved.shape)}, but this model's input embedding is "
            f"{tuple(weight.shape)} (or the {len(token_ids)} added rows alone): it was trained with another "
            "tokenizer or decoder. Use the stage-1 output of this decoder."
        )
    with torch.no_grad():
        weight[list(token_ids)] = rows.to(device=weight.device, dtype=weight.dtype)
    return True


def own_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s keys relative to the LLaVA model: without a PeftModel's `base_model.model.` (older runs: `model.`)."""
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


@dataclass
class LoadedState:
    """What `load_trained_state` put into the model."""

    projector: bool = False
    token_rows: bool = False
    other: list[str] = field(default_factory=list)  # the remaining keys, copied whole


def load_trained_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    require_projector: bool = True,
    token_ids: Sequence[int] | None = None,
) -> LoadedState:
    """Load a partial state dict (`mm_projector.bin`, `non_lora_trainables.bin`) into `model` (bare or wrapped).

    The projector's weights must all be there and fit (`load_projector_weights`; with `require_projector=False` a
    state without any is fine). With `token_ids`, only those rows of a stored input embedding are taken (the
    original's reading of a stage-1 file, `restore_token_rows`; none for an empty sequence); with None (resuming,
    LoRA) the embedding is copied whole like every other key, which must name a weight of the model with the same
    shape.
    """
    base = unwrap_llava(model)
    state = own_names(state)
    loaded = LoadedState()
    if require_projector or any("mm_projector." in k for k in state):
        load_projector_weights(base.get_model().mm_projector, state, source)
        loaded.projector = True
    rest = {k: v for k, v in state.items() if "mm_projector." not in k}
    if token_ids is not None:
        loaded.token_rows = bool(token_ids) and restore_token_rows(base, rest, token_ids, source)
        embedding = set(_embedding_keys(base, rest))
        rest = {k: v for k, v in rest.items() if k not in embedding}
    if not rest:
        return loaded
    own = base.state_dict()
    unknown = sorted(k for k in rest if k not in own)
    if unknown:
        raise CheckpointError(f"`{source}` has weights this model does not have: {unknown[:5]}.")
    wrong = [
        f"{k}: file {tuple(rest[k].shape)} vs model {tuple(own[k].shape)}"
        for k in rest
        if own[k].shape != rest[k].shape
    ]
    if wrong:
        raise CheckpointError(f"`{source}`: shape mismatch for {wrong[:5]}.")
    with torch.no_grad():
        for name, value in rest.items():
            own[name].copy_(value.to(own[name].dtype))
    loaded.other = sorted(rest)
    return loaded
