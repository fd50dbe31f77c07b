"""Vision tower registry and the tower module the LLaVA model holds (`model.vision_tower.vision_tower.*`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerSpec:
    """How to build one family of vision encoders and its image preprocessor."""

    model_cls: str  # attribute of `transformers`
    processor_cls: str  # attribute of `transformers` (PIL backends: no torchvision needed)
    has_cls_token: bool


# Keyed by the `model_type` of the tower's config (full model configs are reduced to their `vision_config`).
VISION_TOWERS: dict[str, TowerSpec] = {
    "clip_vision_model": TowerSpec("CLIPVisionModel", "CLIPImageProcessorPil", has_cls_token=True),
    "siglip_vision_model": TowerSpec("SiglipVisionModel", "SiglipImageProcessorPil", has_cls_token=False),
}
SELECT_FEATURES = ("patch", "cls_patch")


class VisionTowerNotFoundError(FileNotFoundError):
    """The vision tower named in `mm_vision_tower` is neither a local directory nor reachable on the hub."""


def _not_found(name: str, cause: Exception) -> VisionTowerNotFoundError:
    local = os.path.abspath(os.path.expanduser(name))
    return VisionTowerNotFoundError(
        f"Vision tower `{name}` (config field `mm_vision_tower`) could not be loaded. Tried the local directory "
        f"`{local}` ({'exists' if os.path.isdir(local) else 'does not exist'}) and the Hugging Face hub id `{name}` "
        f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'no detail'}). "
        "Download the tower once (e.g. `hf download openai/clip-vit-large-patch14-336 --local-dir ./clip-336`) and "
        "set `mm_vision_tower` in the checkpoint's config.json to that directory, or pass `vision_tower=DIR` to "
        "load_pretrained_model / `--vision_tower DIR` to training."
    )


def resolve_vision_config(name: str, stored: dict | None = None) -> PretrainedConfig:
    """The vision-encoder config for `name`: the copy stored in the LLaVA config, else the tower's own config."""
    if stored:
        stored = dict(stored)
        return AutoConfig.for_model(stored.pop("model_type"), **stored)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from err
    config = getattr(config, "vision_config", None) or config
    if config.model_type not in VISION_TOWERS:
        raise ValueError(
            f"Vision tower `{name}` has model type `{config.model_type}`, which has no entry in VISION_TOWERS. "
            f"Supported: {', '.join(sorted(VISION_TOWERS))}."
        )
    return config


def _transformers_attr(name: str):
    import transformers

    return getattr(transformers, name)


class VisionTower(nn.Module):
    """A Hugging Face vision encoder plus LLaVA's feature selection (layer and CLS handling)."""

    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"Unexpected `mm_vision_select_feature` `{self.select_feature}`; valid: {', '.join(SELECT_FEATURES)}."
            )
        self.cfg_only = resolve_vision_config(vision_tower, getattr(args, "mm_vision_tower_config", None))
        self.spec = VISION_TOWERS[self.cfg_only.model_type]
        model_cls = _transformers_attr(self.spec.model_cls)
        # Built from the config only; weights come from the checkpoint or from `load_model()`.
        self.vision_tower = model_cls(self.cfg_only)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = False
        self._image_processor = None

    # -- loading ---------------------------------------------------------------------------------------------------
    def load_model(self, device_map=None) -> None:
        """Load the tower's pretrained weights from `vision_tower_name` (a local dir or a hub id)."""
        model_cls = _transformers_attr(self.spec.model_cls)
        try:
            loaded = model_cls.from_pretrained(self.vision_tower_name, config=self.cfg_only)
        except OSError as err:
            raise _not_found(self.vision_tower_name, err) from err
        own = self.vision_tower.state_dict()
        missing = sorted(set(own) - set(loaded.state_dict()))
        if missing:
            raise ValueError(f"Vision tower `{self.vision_tower_name}` lacks weights: {missing[:5]}")
        ref = next(self.vision_tower.parameters())
        self.vision_tower.load_state_dict(loaded.state_dict())
        self.vision_tower.to(device=ref.device if ref.device.type != "meta" else "cpu", dtype=ref.dtype)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = build_image_processor(self.vision_tower_name, self.cfg_only)
        return self._image_processor

    # -- features --------------------------------------------------------------------------------------------------
    def feature_select(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        features = hidden_states[self.select_layer]  # (N, 1 + P, C) for CLIP
        if self.select_feature == "patch" and self.spec.has_cls_token:
            features = features[:, 1:]
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixel values -> (N, P, C) features of the selected layer."""
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(out.hidden_states)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    @property
    def config(self) -> PretrainedConfig:
        return self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.cfg_only.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.cfg_only.image_size // self.cfg_only.patch_size

    @property
    def num_patches(self) -> int:
        """Features per image after selection."""
        extra = 1 if (self.select_feature == "cls_patch" and self.spec.has_cls_token) else 0
        return self.num_patches_per_side**2 + extra


# The original's class name, kept for code that imports it.
CLIPVisionTower = VisionTower


def build_image_processor(name: str, vision_config: PretrainedConfig):
    """The tower's own preprocessor config when present, else one derived from the vision config."""
    processor_cls = _transformers_attr(VISION_TOWERS[vision_config.model_type].processor_cls)
    # transformers 5 processors save `processor_config.json` (image settings nested); older dirs have
    # `preprocessor_config.json`. `from_pretrained` reads either.
    if any(os.path.isfile(os.path.join(name, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        return processor_cls.from_pretrained(name)
    if not os.path.isdir(name):
        try:
            return processor_cls.from_pretrained(name)
        except OSError:
            logger.info("No preprocessor config for `%s`; deriving one from its vision config.", name)
    side = vision_config.image_size
    return processor_cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def build_vision_tower(config, delay_load: bool = False, **kwargs) -> VisionTower:
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("The config names no vision tower (`mm_vision_tower`).")
    return VisionTower(name, args=config, delay_load=delay_load)
