"""Build a LLaVA model from its parts (decoder, vision tower, projector) and say which parameter is which part.

`build_llava` is the one assembler: training (`llava.train.model_setup`), the test fixtures and the benchmarks call
it, and `LlavaMetaModel.initialize_vision_modules` (the original's name) goes through it. `multimodal_fields` is the
one place that decides what a checkpoint's config says about images and prompts. The decoder load path shared with
`llava.model.builder` (config object, attention, quantization, `from_pretrained` with its weight checks) lives here
too, so training and inference build models the same way. `part_of` / `parameter_parts` answer "is this parameter
the tower, the projector or the LLM" from the model's own modules, never from name substrings.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Parts of a LLaVA model, in the order logs list them. `lora` holds adapter weights wherever they sit.
PARTS = ("vision_tower", "mm_projector", "embeddings", "llm", "lm_head", "lora")
# Never quantized (matched from the start of module names): projector and tower under LLaMA-style (`model.`) and
# MPT (`transformer.`) base models, and the LM head.
QUANT_SKIP_MODULES = (
    "model.mm_projector",
    "model.vision_tower",
    "transformer.mm_projector",
    "transformer.vision_tower",
    "lm_head",
)


class WeightsMismatchError(ValueError):
    """Weights on disk do not fit the model their config describes (missing, or of another shape)."""


# ------------------------------------------------------------------------------------------------- specifications


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower: a CLIP/SigLIP dir or hub id, and which hidden layer / tokens feed the projector."""

    name_or_path: str
    select_layer: int = -1
    select_feature: str = "patch"


@dataclass(frozen=True)
class ProjectorSpec:
    """The projector (`linear`, `mlp2x_gelu`, ...), how anyres tiles merge, and stage-1 weights to start from."""

    type: str = "linear"
    patch_merge_type: str = "flat"
    pretrained: str | None = None  # a stage-1 `mm_projector.bin`


@dataclass(frozen=True)
class PromptSpec:
    """How images and prompts are prepared; recorded in the config so inference prepares them the same way."""

    image_aspect_ratio: str = "square"
    image_grid_pinpoints: Any = None
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int | None = 2048


def multimodal_fields(vision: VisionSpec, projector: ProjectorSpec, prompt: PromptSpec | None) -> dict[str, Any]:
    """Every multimodal config field a LLaVA checkpoint carries (the original's names), except the two read from
    the loaded tower (`mm_hidden_size`, `mm_vision_tower_config`). `prompt=None`: the tower and projector fields only
    (what the original's `initialize_vision_modules` writes)."""
    from llava.model.llava_arch import check_patch_merge_type

    fields: dict[str, Any] = {
        "mm_vision_tower": vision.name_or_path,
        "mm_vision_select_layer": vision.select_layer,
        "mm_vision_select_feature": vision.select_feature,
        "mm_projector_type": projector.type,
        "mm_patch_merge_type": check_patch_merge_type(projector.patch_merge_type),
        "use_mm_proj": True,
    }
    if prompt is not None:
        fields.update(
            image_aspect_ratio=prompt.image_aspect_ratio,
            image_grid_pinpoints=prompt.image_grid_pinpoints,
            mm_use_im_start_end=prompt.mm_use_im_start_end,
            mm_use_im_patch_token=prompt.mm_use_im_patch_token,
            tokenizer_padding_side=prompt.tokenizer_padding_side,
            tokenizer_model_max_length=prompt.tokenizer_model_max_length,
        )
    return fields


def specs_from_args(model_args, data_args=None) -> tuple[VisionSpec, ProjectorSpec, PromptSpec]:
    """The three specs from the original's argument objects (`ModelArguments`, `DataArguments` or look-alikes)."""
    vision = VisionSpec(
        model_args.vision_tower,
        getattr(model_args, "mm_vision_select_layer", -1),
        getattr(model_args, "mm_vision_select_feature", "patch") or "patch",
    )
    projector = ProjectorSpec(
        getattr(model_args, "mm_projector_type", "linear") or "linear",
        getattr(model_args, "mm_patch_merge_type", "flat") or "flat",
        getattr(model_args, "pretrain_mm_mlp_adapter", None),
    )
    prompt = PromptSpec(
        image_aspect_ratio=getattr(data_args, "image_aspect_ratio", "square"),
        image_grid_pinpoints=getattr(data_args, "image_grid_pinpoints", None),
        mm_use_im_start_end=getattr(model_args, "mm_use_im_start_end", False),
        mm_use_im_patch_token=getattr(model_args, "mm_use_im_patch_token", False),
    )
    return vision, projector, prompt


# ------------------------------------------------------------------------------------------------------ assembling


def build_llava(
    decoder: nn.Module | str,
    vision: VisionSpec,
    projector: ProjectorSpec = ProjectorSpec(),
    prompt: PromptSpec | None = PromptSpec(),
    *,
    record: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A LLaVA model: `decoder` (a LLaVA causal-LM instance, or a decoder's directory) with `vision`'s tower
    (pretrained weights loaded) and a projector (new, seeded by `seed` when given, or `projector.pretrained`'s).

    The config gets every multimodal field once (`multimodal_fields`, then the tower's width and config);
    `prompt=None` leaves the prompt fields as they are. `record` adds run facts to the config (training flags,
    `conv_template`).
    """
    model = _decoder_model(os.fspath(decoder)) if isinstance(decoder, str | os.PathLike) else decoder
    if seed is not None:
        torch.manual_seed(seed)
    attach_vision_modules(model.get_model(), vision, projector, prompt)
    for key, value in (record or {}).items():
        setattr(model.config, key, value)
    return model


def _decoder_model(path: str) -> nn.Module:
    from llava.model.builder import read_config
    from llava.model.language_model import decoder_for_config

    spec = decoder_for_config(read_config(path), os.path.join(path, "config.json"))
    return spec.causal_lm_cls.from_pretrained(path)


def attach_vision_modules(
    base_model: nn.Module, vision: VisionSpec, projector: ProjectorSpec, prompt: PromptSpec | None = None
) -> None:
    """Write the multimodal fields into the config, then build what they describe on the base model
    (`LlavaMetaModel`): the tower (kept when it is already `vision`'s), its weights, the projector, `image_newline`."""
    from llava.model.llava_arch import load_projector_weights
    from llava.model.multimodal_encoder.builder import build_vision_tower
    from llava.model.multimodal_projector.builder import build_vision_projector

    config = base_model.config
    for key, value in multimodal_fields(vision, projector, prompt).items():
        setattr(config, key, value)
    tower = base_model.get_vision_tower()
    if tower is None or tower.vision_tower_name != vision.name_or_path:
        config.mm_vision_tower_config = None
        tower = base_model.vision_tower = build_vision_tower(config)
    if not tower.is_loaded:
        tower.load_model()
    # Stored so a checkpoint that carries tower weights can be rebuilt without the tower directory.
    config.mm_vision_tower_config = tower.config.to_dict()
    config.mm_hidden_size = tower.hidden_size
    if getattr(base_model, "mm_projector", None) is None:
        base_model.mm_projector = build_vision_projector(config)
    base_model.mm_projector.requires_grad_(True)
    if "unpad" in config.mm_patch_merge_type and getattr(base_model, "image_newline", None) is None:
        std = 1 / math.sqrt(config.hidden_size)
        base_model.image_newline = nn.Parameter(torch.randn(config.hidden_size) * std)
    if projector.pretrained:
        state = torch.load(projector.pretrained, map_location="cpu", weights_only=True)
        load_projector_weights(base_model.mm_projector, state, source=projector.pretrained)


# ----------------------------------------------------------------------------------------------------------- parts


def llava_model_of(model: nn.Module) -> nn.Module:
    """The LLaVA model under PeftModel / DDP / DeepSpeed wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _part_roots(llava: nn.Module) -> dict[int, str]:
    """id of each module / parameter that roots a part -> the part's name."""
    roots: dict[int, str] = {}
    base = llava.get_model() if hasattr(llava, "get_model") else None
    for attr, part in (
        ("vision_tower", "vision_tower"),
        ("mm_projector", "mm_projector"),
        ("image_newline", "mm_projector"),
    ):
        obj = getattr(base, attr, None)
        if obj is not None:
            roots[id(obj)] = part
    roots[id(llava.get_input_embeddings())] = "embeddings"
    head = llava.get_output_embeddings()
    if head is not None:  # a head tied to the input embedding has no weight of its own (`named_parameters`)
        roots[id(head)] = "lm_head"
    for module in llava.modules():
        for name in getattr(module, "adapter_layer_names", ()):  # peft's LoRA layers: lora_A, lora_B, ...
            roots[id(getattr(module, name))] = "lora"
    return roots


def part_of(model: nn.Module, name: str, roots: dict[int, str] | None = None, lora: bool = True) -> str:
    """The part (one of PARTS) that the parameter, buffer or module `name` of `model` (wrapped or not) belongs to.

    Walks the attribute path from `model`: an adapter weight anywhere is `lora` (with `lora=False`: the part it
    sits in); otherwise the first part root on the way decides, and everything else is `llm`. A name `model` does
    not have is a KeyError."""
    roots = _part_roots(llava_model_of(model)) if roots is None else roots
    obj, found = model, "llm"
    for attr in name.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            raise KeyError(f"`{name}` is not a parameter, buffer or module of {type(model).__name__}.")
        part = roots.get(id(obj))
        if part == "lora" and lora:
            return part
        if part == "lora":
            continue
        if part and found == "llm":
            found = part
    return found


def parameter_parts(model: nn.Module, lora: bool = True) -> dict[str, str]:
    """Every named parameter of `model` (wrapped or not) -> its part (`lora`: as in `part_of`)."""
    roots = _part_roots(llava_model_of(model))
    return {name: part_of(model, name, roots, lora) for name, _ in model.named_parameters()}


def module_parts(model: nn.Module) -> dict[str, str]:
    """Every named module of `model` (wrapped or not) -> its part."""
    roots = _part_roots(llava_model_of(model))
    return {name: part_of(model, name, roots) for name, _ in model.named_modules() if name}


def parts_of_names(model: nn.Module, names: Iterable[str]) -> dict[str, set[str]]:
    """`names` (e.g. missing keys of a load) grouped by part."""
    roots = _part_roots(llava_model_of(model))
    grouped: dict[str, set[str]] = {}
    for name in names:
        grouped.setdefault(part_of(model, name, roots), set()).add(name)
    return grouped


# -------------------------------------------------------------------------------------------- decoder load path


def config_object(spec, raw: dict, vision_tower: str | None = None):
    """The family's config class built from a config.json dict; `vision_tower` replaces a LLaVA checkpoint's
    `mm_vision_tower` (e.g. a local copy of the hub tower), whose stored tower config is then re-read."""
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    if vision_tower and fields.get("mm_vision_tower") and fields["mm_vision_tower"] != vision_tower:
        fields["mm_vision_tower"] = vision_tower
        fields.pop("mm_vision_tower_config", None)
    return spec.config_cls(**fields)


def attn_implementation(use_flash_attn: bool) -> str:
    """`flash_attention_2` when asked for and installed, else PyTorch SDPA."""
    if not use_flash_attn:
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        logger.warning("flash-attn is not installed (pip install 'llava[flash]'); using PyTorch SDPA attention.")
        return "sdpa"
    return "flash_attention_2"


def quantization_config(bits: int, compute_dtype: torch.dtype, double_quant: bool = True, quant_type: str = "nf4"):
    """bitsandbytes settings for a 4- or 8-bit LLM; projector, tower and LM head stay full precision."""
    if bits not in (4, 8):
        raise ValueError(f"Quantization takes 4 or 8 bits, got `{bits}`.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("8/4-bit loading needs bitsandbytes: pip install 'llava[quant]'.")
    from transformers import BitsAndBytesConfig

    skip = list(QUANT_SKIP_MODULES)  # matched from the start of module names (transformers 5)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
        llm_int8_skip_modules=skip,
    )


def from_pretrained_kwargs(
    dtype: torch.dtype,
    attn: str,
    device_map: Any = None,
    bits: int = 16,
    double_quant: bool = True,
    quant_type: str = "nf4",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for a LLaVA decoder: dtype, attention, placement, quantization."""
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if bits in (4, 8):
        kwargs["quantization_config"] = quantization_config(bits, dtype, double_quant, quant_type)
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    return kwargs


def load_weights(causal_lm_cls, weights_dir: str, config, kwargs: dict) -> tuple[nn.Module, dict[str, set[str]]]:
    """`from_pretrained`, with weights of the wrong shape an error naming them and both shapes; returns the model
    and its missing weights grouped by part (the caller decides which parts may be absent)."""
    model, info = causal_lm_cls.from_pretrained(
        weights_dir, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
    )
    if info["mismatched_keys"]:
        wrong = [
            f"{key}: file {tuple(saved)} vs model {tuple(own)}" for key, saved, own in sorted(info["mismatched_keys"])
        ]
        raise WeightsMismatchError(
            f"Weights in `{weights_dir}` do not fit the model described by its config (size mismatch: "
            f"{'; '.join(wrong[:5])}). Check that config.json belongs to these weights."
        )
    if info["unexpected_keys"]:
        logger.info(
            "Ignored %d unexpected weights in %s: %s",
            len(info["unexpected_keys"]),
            weights_dir,
            sorted(info["unexpected_keys"])[:5],
        )
    return model, parts_of_names(model, info["missing_keys"])
