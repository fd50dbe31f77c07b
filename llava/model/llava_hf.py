"""The llava-hf layout (`transformers.LlavaForConditionalGeneration`) and its import into ours.

KEY_MAP names the same weights in both layouts (both directions use it); `import_from_hf` writes a llava-hf checkpoint
as an original-format full checkpoint, tower weights included. `llava.model.builder` loads llava-hf dirs through it;
the export direction (ours -> llava-hf) and the CLI are `llava.model.convert_hf`, which sits above the builder.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from llava.model.checkpoint_compat import finish_checkpoint_dir
from llava.model.language_model import DECODERS
from llava.model.multimodal_encoder.builder import VISION_TOWERS

logger = logging.getLogger(__name__)

# (our state_dict prefix, llava-hf state_dict prefix), first match wins. Both sides are the runtime `state_dict()`
# names; transformers itself maps the legacy llava-hf file keys (`language_model.model.*`, ...) on load and save.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
# Config keys of ours that are not decoder settings (dropped when building the llava-hf `text_config`).
_NOT_TEXT_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map")


class ConversionError(ValueError):
    """A checkpoint cannot be converted: a feature the other format cannot express, or an incomplete directory."""


# ---------------------------------------------------------------------------------------------------------------------
# Weight names
# ---------------------------------------------------------------------------------------------------------------------


def rename_key(key: str, to_hf: bool = True) -> str:
    """One state-dict key from our layout to llava-hf's (`to_hf`) or back."""
    for ours, theirs in KEY_MAP:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        if key.startswith(src):
            return dst + key[len(src) :]
    direction = "llava-hf" if to_hf else "the original LLaVA layout"
    raise ConversionError(f"Weight `{key}` has no counterpart in {direction}; known prefixes: {_prefixes(to_hf)}.")


def _prefixes(to_hf: bool) -> str:
    return ", ".join(f"`{pair[0 if to_hf else 1]}`" for pair in KEY_MAP)


def convert_state_dict(state: dict[str, torch.Tensor], to_hf: bool = True) -> dict[str, torch.Tensor]:
    return {rename_key(key, to_hf): value for key, value in state.items()}


def _load_into_empty(model_cls, config, state: dict[str, torch.Tensor], what: str):
    """Build `model_cls(config)` without allocating or initialising weights, then take `state`'s tensors as-is."""
    with torch.device("meta"):
        model = model_cls(config)
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ConversionError(
            f"The converted weights do not fit {what}: missing {missing[:8]}, unexpected {unexpected[:8]}."
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Import: llava-hf -> original
# ---------------------------------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def check_importable(hf_config, source: str = "config.json") -> tuple:
    """Validate a llava-hf config against what the original layout can express; returns (decoder spec, tower spec)."""
    problems = []
    vision_type = getattr(hf_config.vision_config, "model_type", None)
    tower_spec = VISION_TOWERS.get(vision_type)
    if tower_spec is None:
        problems.append(f"vision model type `{vision_type}` is not one of {', '.join(sorted(VISION_TOWERS))}")
    text_type = getattr(hf_config.text_config, "model_type", None)
    spec = next((s for s in DECODERS.values() if text_type in s.base_model_types), None)
    if spec is None:
        known = sorted(t for s in DECODERS.values() for t in s.base_model_types)
        problems.append(f"text model type `{text_type}` has no LLaVA decoder (registered: {', '.join(known)})")
    if not isinstance(hf_config.vision_feature_layer, int):
        problems.append(
            f"`vision_feature_layer` is {hf_config.vision_feature_layer}: the original selects one layer, not several"
        )
    if hf_config.projector_hidden_act != "gelu":
        problems.append(f"`projector_hidden_act` is `{hf_config.projector_hidden_act}`; `mlp2x_gelu` is exact GELU")
    if not getattr(hf_config, "multimodal_projector_bias", True):
        problems.append("`multimodal_projector_bias` is false; the original projector has biases")
    if (
        tower_spec is not None
        and not tower_spec.has_cls_token
        and hf_config.vision_feature_select_strategy == "default"
    ):
        problems.append(
            f"`vision_feature_select_strategy` is `default` on a tower without a CLS token (`{vision_type}`): it drops "
            "the first patch, which the original cannot express"
        )
    if problems:
        raise ConversionError(
            f"`{source}` cannot be imported to the original LLaVA layout: " + "; ".join(problems) + "."
        )
    return spec, tower_spec


def _hf_aspect_ratio(src: str) -> str:
    """`pad` when the llava-hf image processor pads to a square first, else `square`."""
    if not any(os.path.isfile(os.path.join(src, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        logger.info("`%s` has no image processor config; assuming image_aspect_ratio `square`.", src)
        return "square"
    from transformers import AutoImageProcessor

    return "pad" if getattr(AutoImageProcessor.from_pretrained(src), "do_pad", False) else "square"


def _hf_chat_template(src: str, tokenizer) -> str | None:
    if os.path.isfile(os.path.join(src, "chat_template.jinja")):
        with open(os.path.join(src, "chat_template.jinja")) as f:
            return f.read()
    if os.path.isfile(os.path.join(src, "chat_template.json")):
        return _read_json(os.path.join(src, "chat_template.json")).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def match_conv_template(chat_template: str | None, names: Iterable[str] | None = None) -> str | None:
    """The name of our template whose Hugging Face form is exactly `chat_template` (what export writes), if any."""
    if not chat_template:
        return None
    from llava.conversation import conv_templates, to_chat_template_jinja

    for name in names or sorted(conv_templates):
        try:
            if to_chat_template_jinja(name) == chat_template:
                return name
        except ValueError:
            continue
    return None


def _tower_image_processor(src: str, tower_spec, vision_config):
    """The tower's own image processor (no padding: `image_aspect_ratio` does that in the original)."""
    import transformers

    processor_cls = getattr(transformers, tower_spec.processor_cls)
    try:
        processor = processor_cls.from_pretrained(src)
    except OSError:
        side = vision_config.image_size
        return processor_cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    settings = {k: v for k, v in processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    settings.pop("do_pad", None)
    return processor_cls(**settings)


def import_from_hf(src: str, dst: str, *, dtype: torch.dtype | str = "auto") -> str:
    """Write the llava-hf checkpoint `src` as an original-format full checkpoint `dst` (tower weights included).

    `mm_vision_tower` names `src` (its image processor config is there); `mm_vision_tower_config` lets the tower be
    rebuilt from `dst` alone. `dtype="auto"` keeps the stored dtype.
    """
    src = os.path.abspath(os.path.expanduser(src))
    config_file = os.path.join(src, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"`{src}` has no config.json; is it a llava-hf checkpoint directory?")
    raw = _read_json(config_file)
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "llava" or (archs and "LlavaForConditionalGeneration" not in archs):
        raise ConversionError(
            f"`{config_file}` describes model_type `{raw.get('model_type')}`, architectures {archs}; import handles "
            "`LlavaForConditionalGeneration` (model_type `llava`) only (LLaVA-NeXT and others are not supported)."
        )
    hf_model = LlavaForConditionalGeneration.from_pretrained(src, dtype=dtype)
    hf_config = hf_model.config
    spec, tower_spec = check_importable(hf_config, config_file)
    tokenizer = AutoTokenizer.from_pretrained(src)

    text = hf_config.text_config
    values = {k: v for k, v in text.to_dict().items() if k not in _NOT_TEXT_KEYS}
    vision = hf_config.vision_config
    has_cls = tower_spec.has_cls_token
    strategy = hf_config.vision_feature_select_strategy
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    values.update(
        mm_vision_tower=src,
        mm_vision_tower_config=vision.to_dict(),
        mm_hidden_size=vision.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=hf_config.vision_feature_layer,
        mm_vision_select_feature="cls_patch" if strategy == "full" and has_cls else "patch",
        mm_patch_merge_type="flat",
        image_aspect_ratio=_hf_aspect_ratio(src),
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
        tokenizer_model_max_length=max_length or text.max_position_embeddings,
        tokenizer_padding_side="right",
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        # The tower weights are part of the llava-hf model: the loader must use the stored copy, not reload it.
        unfreeze_mm_vision_tower=True,
    )
    conv_mode = match_conv_template(_hf_chat_template(src, tokenizer))
    if conv_mode:
        values["conv_template"] = conv_mode
    config = spec.config_cls(**values)
    config.architectures = [spec.architecture]

    state = convert_state_dict(hf_model.state_dict(), to_hf=False)
    model = _load_into_empty(spec.causal_lm_cls, config, state, spec.architecture)
    model.generation_config = copy.deepcopy(hf_model.generation_config)
    os.makedirs(dst, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    _tower_image_processor(src, tower_spec, vision).save_pretrained(dst)
    finish_checkpoint_dir(dst, tokenizer)
    logger.info("Imported llava-hf %s to the original layout in %s", src, dst)
    return dst
