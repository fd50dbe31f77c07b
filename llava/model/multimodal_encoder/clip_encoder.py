"""`CLIPVisionTower`, the original LLaVA's tower class, as a thin layer over our `VisionTower` for code that imports it.

The original's constructor loads the pretrained weights at once unless `delay_load=True` (or the config trains the
tower, `unfreeze_mm_vision_tower`); a second `load_model()` is a no-op; `forward` also takes a list of images and
returns a list of per-image features; features come back in the dtype of the input pixels. This class keeps those
behaviours. Everything else (feature selection, processors, any registered HF vision encoder, not only CLIP) is
our `llava.model.multimodal_encoder.builder.VisionTower`, and an instance is one (`isinstance` holds).
"""

from __future__ import annotations

import logging

import torch

from llava.model.multimodal_encoder.builder import VisionTower

logger = logging.getLogger(__name__)


class CLIPVisionTower(VisionTower):
    """`CLIPVisionTower(vision_tower, args, delay_load=False)` with the original's loading and `forward` behaviour.

    `vision_tower` is a local directory or hub id; `args` is any object with the `mm_vision_select_layer` /
    `mm_vision_select_feature` attributes (a model config or the training arguments).
    """

    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        super().__init__(vision_tower, args, delay_load=delay_load)
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()

    def load_model(self, device_map=None) -> None:
        if self.is_loaded:
            logger.info("%s is already loaded; `load_model` called again, skipping.", self.vision_tower_name)
            return
        super().load_model(device_map=device_map)

    @torch.no_grad()
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """(N, 3, H, W) -> (N, P, C) features, or a list of (3, H, W) images -> a list of (1, P, C) features."""
        if isinstance(images, list):
            return [super(CLIPVisionTower, self).forward(image.unsqueeze(0)).to(image.dtype) for image in images]
        return super().forward(images).to(images.dtype)


__all__ = ["CLIPVisionTower"]
