"""`load_pretrained_model`: the one loader behind every entry point, for every checkpoint kind LLaVA users have.

Kinds, decided from the directory's files and config (never from its name) by `llava.model.checkpoint_format`:
  full       an HF decoder dir whose config adds `mm_vision_tower` etc. (LLaVA-1.5/1.6 releases, our full fine-tunes)
  projector  stage-1 output: `config.json` + `mm_projector.bin`, loaded on top of `model_base`
  lora       `adapter_config.json` + adapter weights + `non_lora_trainables.bin`, loaded on top of `model_base`
  hf         llava-hf (`LlavaForConditionalGeneration`), converted to our classes on load (`llava.model.llava_hf`)
  text       a plain decoder with no vision tower (language-only)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.conversation import conv_templates, guess_conv_mode
from llava.model.assemble import (  # noqa: F401  (QUANT_SKIP_MODULES: re-exported, its home before assemble)
    QUANT_SKIP_MODULES,
    WeightsMismatchError,
    attn_implementation,
    config_object,
    from_pretrained_kwargs,
    load_weights,
    parts_of_names,
)
from llava.model.checkpoint_format import (  # noqa: F401  (re-exported: their earlier home)
    TOKENIZER_FILES,
    WEIGHT_PATTERNS,
    CheckpointError,
    CheckpointInfo,
    detect_checkpoint_kind,
    load_trained_state,
    read_config,
    read_trained_state,
)
from llava.model.language_model import decoder_for_config
from llava.model.llava_arch import resize_embeddings_to_mean, start_end_token_ids
from llava.model.llava_hf import import_from_hf

logger = logging.getLogger(__name__)

# Architecture fields a LoRA's base must share with the model the LoRA was trained on.
BASE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def resolve_local(path_or_id: str, what: str = "model_path") -> str:
    """A local directory for `path_or_id`: itself if it is one, else a hub snapshot (needs network)."""
    expanded = os.path.expanduser(path_or_id)
    if os.path.isdir(expanded):
        return expanded
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_id)
    except Exception as err:  # hub errors come in many types; all mean the same thing to the user
        raise CheckpointError(
            f"`{path_or_id}` ({what}) is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Pass a local directory."
        ) from err


# The decoder load path is shared with training: `llava.model.assemble` owns it.
_config_object = config_object
_attn_implementation = attn_implementation


def best_device() -> str:
    """The fastest device this machine has: cuda, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _resolve_device(device: str | None) -> str:
    if device is None:
        chosen = best_device()
        logger.info("load_pretrained_model: no device given; using `%s`, the best one available.", chosen)
        return chosen
    if device == "auto":
        return best_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device=`{device}` was asked for but CUDA is not available; pass device='cpu' (--device cpu)."
        )
    return device


def _load_kwargs(load_8bit, load_4bit, device_map, device, use_flash_attn, dtype) -> dict:
    if load_8bit and load_4bit:
        raise ValueError("Choose one of load_8bit / load_4bit.")
    if device != "cuda":
        device_map = {"": device}
    if dtype is None:
        if device == "cpu":
            dtype = torch.float32
        elif device == "cuda" and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        else:
            dtype = torch.float16
    bits = 8 if load_8bit else 4 if load_4bit else 16
    return from_pretrained_kwargs(dtype, attn_implementation(use_flash_attn), device_map, bits)


def _from_pretrained(spec, weights_dir: str, config, kwargs: dict, expect_missing=("tower",)):
    """`from_pretrained` that turns missing/misshapen weights into errors; returns (model, missing tower?)."""
    try:
        model, missing = load_weights(spec.causal_lm_cls, weights_dir, config, kwargs)
    except WeightsMismatchError as err:
        raise CheckpointError(str(err)) from err
    projector_missing = missing.pop("mm_projector", set())
    tower_missing = missing.pop("vision_tower", set())
    if "projector" not in expect_missing and projector_missing:
        raise CheckpointError(
            f"`{weights_dir}` lacks projector weights {sorted(projector_missing)}: the checkpoint is incomplete "
            "(a stage-1 output needs `mm_projector.bin` and `--model-base`)."
        )
    other = set().union(*missing.values())
    if other:
        raise CheckpointError(f"`{weights_dir}` lacks weights the model needs: {sorted(other)[:8]}.")
    return model, bool(tower_missing)


LEGACY_SPM_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def tokenizer_kwargs(tokenizer_dir: str) -> dict:
    """`legacy=True` for a LLaMA SentencePiece tokenizer whose config does not choose: the default of the
    original's transformers 4.37 (a word after a special token written in the text, e.g. `</s>USER:` between
    turns, starts with its own `▁` piece), which transformers 5 no longer applies by itself."""
    config_file = os.path.join(tokenizer_dir, "tokenizer_config.json")
    config = json.load(open(config_file)) if os.path.isfile(config_file) else {}
    spm = os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.model"))
    if spm and "legacy" not in config and config.get("tokenizer_class", "LlamaTokenizer") in LEGACY_SPM_CLASSES:
        return {"legacy": True}
    return {}


def load_tokenizer(*dirs: str):
    """The tokenizer of the first of `dirs` that has tokenizer files, as the original's code would tokenize."""
    from transformers import AutoTokenizer

    for d in dirs:
        if d and any(os.path.exists(os.path.join(d, f)) for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(d, **tokenizer_kwargs(d))
    raise CheckpointError(f"No tokenizer files in {[d for d in dirs if d]}.")


_load_tokenizer = load_tokenizer


def _finish_multimodal(model, tokenizer, tower_missing: bool, trained_vocab: int | None = None):
    """Add LLaVA's tokens to the tokenizer and fit the embeddings; load the tower. `trained_vocab`: the embedding size
    the run had, for a stage-1 / LoRA dir loaded on its base (its added rows start at the mean, as in training)."""
    config = model.config
    new_tokens = []
    if getattr(config, "mm_use_im_patch_token", True):
        new_tokens.append(DEFAULT_IMAGE_PATCH_TOKEN)
    if getattr(config, "mm_use_im_start_end", False):
        new_tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    added = tokenizer.add_tokens(new_tokens, special_tokens=True) if new_tokens else 0
    rows = model.get_input_embeddings().weight.shape[0]
    if trained_vocab is not None and trained_vocab != rows:
        if not new_tokens:
            raise CheckpointError(
                f"The checkpoint was trained with {trained_vocab} token embeddings but its base has {rows}, and it "
                "added no LLaVA tokens: pass the decoder it was trained on as `model_base` (--model-base)."
            )
        resize_embeddings_to_mean(model, trained_vocab, len(new_tokens))
    elif added and len(tokenizer) > rows:
        resize_embeddings_to_mean(model, len(tokenizer), len(tokenizer) - rows)
    _load_tower(model.get_vision_tower(), config, tower_missing)
    tower = model.get_vision_tower()
    embed = model.get_input_embeddings().weight
    if tower.device != embed.device or tower.dtype != embed.dtype:
        tower.to(device=embed.device, dtype=embed.dtype)
    return tower.image_processor


def tower_weights_trained(config) -> bool:
    """Whether the tower weights a checkpoint stores are its own (the run trained the tower), not a copy of
    `mm_vision_tower`'s. Recorded by the trainer (and by the llava-hf import) as `unfreeze_mm_vision_tower`."""
    return bool(getattr(config, "unfreeze_mm_vision_tower", False))


def _load_tower(tower, config, stored_missing: bool) -> None:
    """Tower weights, the original's way: from `mm_vision_tower`, unless the run trained the tower and stored it."""
    from llava.model.multimodal_encoder.builder import VisionTowerNotFoundError

    if not stored_missing and tower_weights_trained(config):
        tower.is_loaded = True
        return
    try:
        tower.load_model()
    except VisionTowerNotFoundError as err:
        if stored_missing:
            raise
        logger.warning(
            "%s Using the tower weights stored in the checkpoint instead (the original LLaVA code would stop here).",
            str(err).split(". Download")[0],
        )
        tower.is_loaded = True


# Keyword arguments the original forwarded to `from_pretrained` that still mean something: `torch_dtype` (now
# `dtype`) and `low_cpu_mem_usage` (transformers 5 always loads that way). Any other is a TypeError.
ORIGINAL_FROM_PRETRAINED_KWARGS = ("torch_dtype", "low_cpu_mem_usage")


def _original_passthrough(kwargs: dict, dtype: torch.dtype | None) -> torch.dtype | None:
    unknown = sorted(set(kwargs) - set(ORIGINAL_FROM_PRETRAINED_KWARGS))
    if unknown:
        raise TypeError(
            f"load_pretrained_model() got unexpected keyword argument(s) {', '.join(f'`{k}`' for k in unknown)}; "
            "it takes model_path, model_base, model_name, load_8bit, load_4bit, device_map, device, use_flash_attn, "
            f"vision_tower, merge_lora, dtype (and the original's {', '.join(ORIGINAL_FROM_PRETRAINED_KWARGS)})."
        )
    torch_dtype = kwargs.get("torch_dtype")
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise TypeError(f"load_pretrained_model(): `torch_dtype={torch_dtype}` and `dtype={dtype}` disagree; pass one.")
    return dtype if dtype is not None else torch_dtype


def load_pretrained_model(
    model_path: str,
    model_base: str | None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = "auto",
    device: str | None = None,
    use_flash_attn: bool = False,
    *,
    vision_tower: str | None = None,
    merge_lora: bool = True,
    dtype: torch.dtype | None = None,
    **kwargs,
):
    """Load any LLaVA checkpoint. Returns `(tokenizer, model, image_processor, context_len)`.

    `model_name` is accepted for compatibility and only used to guess a chat template for old checkpoints that do
    not store one; it never decides how the checkpoint is loaded. `device`: None (the default, where the original
    said "cuda") picks the best device available (cuda, mps, cpu) and logs it; a device named explicitly must
    exist. `vision_tower` overrides the config's `mm_vision_tower` (e.g. a local copy of CLIP). `merge_lora=False`
    keeps a LoRA as a `PeftModel`. Of the `**kwargs` the original passed on to `from_pretrained`, `torch_dtype` (as
    `dtype`) and `low_cpu_mem_usage` are accepted; any other keyword is a TypeError naming it.

    The vision tower is loaded from `mm_vision_tower`, as the original does, even when the checkpoint also stores
    tower weights; stored tower weights are used when the config says the run trained the tower
    (`unfreeze_mm_vision_tower`), or, with a warning, when `mm_vision_tower` cannot be found.
    """
    dtype = _original_passthrough(kwargs, dtype)
    device = _resolve_device(device)
    path = resolve_local(model_path)
    info = detect_checkpoint_kind(path)
    load_kwargs = _load_kwargs(load_8bit, load_4bit, device_map, device, use_flash_attn, dtype)
    base = resolve_local(model_base, "model_base") if model_base else None

    if info.kind == "hf":
        with tempfile.TemporaryDirectory(prefix="llava-hf-import-") as tmp:
            import_from_hf(path, tmp)
            out = load_pretrained_model(
                tmp,
                None,
                model_name,
                load_8bit,
                load_4bit,
                device_map,
                device,
                use_flash_attn,
                vision_tower=vision_tower,
                dtype=dtype,
            )
            out[1].config.mm_vision_tower = path
            return out

    if info.kind == "text":
        from transformers import AutoModelForCausalLM

        tokenizer = _load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        return tokenizer, model, None, _context_len(model.config)

    if info.kind in ("projector", "lora") and base is None:
        what = "projector weights only (a stage-1 output)" if info.kind == "projector" else "a LoRA adapter"
        raise CheckpointError(
            f"`{model_path}` holds {what}; pass the decoder it was trained on as `model_base` (--model-base)."
        )
    if info.kind == "lora" and not info.config:
        raise CheckpointError(f"LoRA dir `{model_path}` has no config.json (the LLaVA config saved with the adapter).")

    spec = decoder_for_config(info.config, os.path.join(path, "config.json"))
    config = _config_object(spec, info.config, vision_tower)
    trained_vocab = None
    if info.kind in ("projector", "lora"):
        # The run saved the embedding size after adding its tokens; the base still has its own, so build with that.
        base_vocab = read_config(base).get("vocab_size")
        if base_vocab and getattr(config, "vocab_size", None) not in (None, base_vocab):
            trained_vocab, config.vocab_size = config.vocab_size, base_vocab

    stage1_state = None
    if info.kind == "full":
        model, tower_missing = _from_pretrained(spec, path, config, load_kwargs, expect_missing=("tower",))
        tokenizer = _load_tokenizer(path, base)
    elif info.kind == "projector":
        model, tower_missing = _from_pretrained(spec, base, config, load_kwargs, expect_missing=("tower", "projector"))
        stage1_state = read_trained_state(path, "projector")  # loaded once the embeddings have their final size
        tokenizer = _load_tokenizer(path, base)
    else:  # lora
        _check_lora_base(path, info.config, base)
        model, tower_missing = _from_pretrained(spec, base, config, load_kwargs, expect_missing=("tower", "projector"))
        tokenizer = _load_tokenizer(path, base)
        model, tower_stored = _apply_lora(model, path, merge_lora)
        tower_missing = tower_missing and not tower_stored

    image_processor = _finish_multimodal(_unwrap(model), tokenizer, tower_missing, trained_vocab)
    if stage1_state is not None:
        # A stage-1 run with --mm_use_im_start_end also trained the <im_start>/<im_end> embedding rows: only those
        # rows are taken, as the original's stage 2 does.
        start_end = getattr(config, "mm_use_im_start_end", False)
        state, source = stage1_state
        token_ids = start_end_token_ids(tokenizer) if start_end else ()
        if not load_trained_state(model, state, source, token_ids=token_ids).token_rows and start_end:
            raise CheckpointError(
                f"`{source}` comes from a run with `mm_use_im_start_end` but holds no input-embedding rows for "
                "<im_start>/<im_end>; the stage-1 run is incomplete."
            )
    model.eval()
    return tokenizer, model, image_processor, _context_len(_unwrap(model).config)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _context_len(config) -> int:
    for field in ("max_sequence_length", "tokenizer_model_max_length", "max_position_embeddings", "max_seq_len"):
        value = getattr(config, field, None)
        if value:
            return int(value)
    return 2048


def _check_lora_base(lora_dir: str, lora_config: dict, base_dir: str) -> None:
    base_config = read_config(base_dir)
    diffs = [
        f"{f}: LoRA was trained on {lora_config.get(f)}, base has {base_config.get(f)}"
        for f in BASE_FIELDS
        if f in lora_config and f in base_config and lora_config[f] != base_config[f]
    ]
    if diffs:
        adapter = json.load(open(os.path.join(lora_dir, "adapter_config.json")))
        raise CheckpointError(
            f"The LoRA in `{lora_dir}` does not match the base `{base_dir}` ({'; '.join(diffs)}). The adapter "
            f"names `{adapter.get('base_model_name_or_path')}` as its base; pass that as `model_base` (--model-base)."
        )


def adapter_module_names(lora_dir: str) -> list[str]:
    """Names (relative to the LLaVA model) of the modules the adapter in `lora_dir` holds LoRA weights for."""
    from peft.utils import load_peft_weights

    names = set()
    for key in load_peft_weights(lora_dir, device="cpu"):
        if ".lora_" not in key:
            continue
        module = key.split(".lora_", 1)[0].removeprefix("base_model.model.")
        names.add(module)
    if not names:
        raise CheckpointError(f"The adapter in `{lora_dir}` holds no LoRA weights (no `lora_` keys).")
    return sorted(names)


def _apply_lora(model, lora_dir: str, merge: bool):
    """Load `non_lora_trainables.bin` and the adapter onto `model`; returns (model, whether tower weights came
    with the non-LoRA weights)."""
    state, source = read_trained_state(lora_dir, "lora")
    loaded = load_trained_state(model, state, source)
    tower_stored = "vision_tower" in parts_of_names(model, loaded.other)

    from peft import PeftConfig, PeftModel

    peft_config = PeftConfig.from_pretrained(lora_dir)
    if peft_config.peft_type == "LORA":
        # Adapters name their targets by short names (`q_proj`, ...) that also match the CLIP tower's layers, which
        # the original never wraps (its tower does not exist yet at that point). Wrap exactly the adapted modules.
        peft_config.target_modules = adapter_module_names(lora_dir)
    model = PeftModel.from_pretrained(model, lora_dir, config=peft_config)
    if merge:
        model = model.merge_and_unload()
    return model, tower_stored


def get_conv_mode(model_config, model_path: str = "", override: str | None = None) -> str:
    """The chat template to prompt with: `override`, else the one stored at training, else a legacy name guess."""
    if override:
        if override not in conv_templates:
            raise ValueError(f"Unknown conversation template `{override}`; valid: {', '.join(sorted(conv_templates))}.")
        return override
    stored = getattr(model_config, "conv_template", None)
    if stored:
        return stored
    from llava.mm_utils import get_model_name_from_path

    guessed = guess_conv_mode(get_model_name_from_path(model_path) if model_path else "")
    logger.info("Checkpoint stores no chat template; guessed `%s` from its name (override with --conv-mode).", guessed)
    return guessed
