"""Model-side multimodal helpers: image preprocessing (square/pad/anyres), prompt tokenization, stopping criteria."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

# Image loading lives in `llava.image_io`; its names stay importable from here, where the original and our
# servers import them. The private ones are used by `llava.serve` (the API server's fetch, the web UI's messages).
from llava.image_io import (  # noqa: F401
    DEFAULT_DOWNLOAD_TIMEOUT,
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGE_SIDE,
    DEFAULT_MAX_REQUEST_PIXELS,
    ImageLimits,
    ImageLoadError,
    _decode_image,
    _describe,
    _guarded_download,
    _refused_kind,
    expand2square,
    load_image,
    load_image_from_base64,
    load_images,
)

__all__ = [
    "ASPECT_RATIOS",
    "ImageLimits",
    "ImageLoadError",
    "KeywordsStoppingCriteria",
    "divide_to_patches",
    "expand2square",
    "get_anyres_image_grid_shape",
    "get_model_name_from_path",
    "load_image",
    "load_image_from_base64",
    "load_images",
    "parse_grid_pinpoints",
    "process_anyres_image",
    "process_images",
    "resize_and_pad_image",
    "select_best_resolution",
    "tokenizer_image_token",
]

# `model_cfg.image_aspect_ratio` values process_images understands; None means "square".
ASPECT_RATIOS = (None, "square", "resize", "pad", "anyres")

_GRID_RE = re.compile(r"\((\d+)\s*x\s*(\d+)\)")


# ---------------------------------------------------------------------------------------------------------------------
# Image geometry and preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def _fit(image: Image.Image, side: int = DEFAULT_MAX_IMAGE_SIDE) -> Image.Image:
    """`image` shrunk (aspect kept) so that its long side is at most `side`; unchanged when it already is, so
    padding a very long image never builds a huge square canvas."""
    if max(image.size) <= side:
        return image
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def select_best_resolution(
    original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the resolution that keeps the most of the image's pixels, then wastes the least canvas.

    Sizes are (width, height), like `PIL.Image.size` and the original LLaVA-NeXT code. The image is scaled to fit
    each candidate keeping its aspect ratio; the effective resolution is the scaled pixel count capped at the
    original pixel count (upscaling gains nothing), the waste is the candidate's area minus that.
    """
    if not possible_resolutions:
        raise ValueError("`possible_resolutions` is empty; pass at least one [width, height] pair.")
    original_width, original_height = original_size
    best, best_key = None, None
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        scaled = int(original_width * scale) * int(original_height * scale)
        effective = min(scaled, original_width * original_height)
        key = (effective, -(width * height - effective))
        if best_key is None or key > best_key:
            best, best_key = (int(width), int(height)), key
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: tuple[int, int]) -> Image.Image:
    """Resize `image` to fit (width, height) `target_resolution` keeping its aspect ratio; pad black, centred."""
    target_width, target_height = target_resolution
    original_width, original_height = image.size
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(original_width * scale_h), target_width), target_height
    resized = image.resize((new_width, new_height))
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Cut `image` into `patch_size` squares, row by row; edge patches past the image are filled black."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def parse_grid_pinpoints(value: Any, patch_size: int | None = None) -> list[tuple[int, int]]:
    """Normalise `image_grid_pinpoints` to a list of (width, height) pixel pairs.

    Accepts a list of pairs, the string form of such a list (`"[[336, 672], [672, 336]]"`), or the LLaVA-NeXT grid
    form in units of `patch_size`: `"(1x1),...,(3x3)"` is every grid from 1x1 to 3x3, `"(1x2),(2x1)"` just those.
    """
    if isinstance(value, str):
        text = value.strip()
        grids = _GRID_RE.findall(text)
        if grids:
            if patch_size is None:
                raise ValueError(
                    f"Grid pinpoints `{value}` are in patch units; pass `patch_size` (the vision tower's input size)."
                )
            cells = [(int(a), int(b)) for a, b in grids]
            if "..." in text:
                (first_a, first_b), (last_a, last_b) = cells[0], cells[-1]
                cells = [(a, b) for a in range(first_a, last_a + 1) for b in range(first_b, last_b + 1)]
            return [(a * patch_size, b * patch_size) for a, b in cells]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(
                f"Cannot parse grid pinpoints `{value}`; use a list like `[[336, 672], [672, 336]]` "
                "or a range like `(1x1),...,(3x3)`."
            ) from exc
    try:
        pairs = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"Grid pinpoints `{value!r}` are not a list of [width, height] pairs; use e.g. `[[336, 672], [672, 336]]`."
        ) from exc
    if not pairs or any(a <= 0 or b <= 0 for a, b in pairs):
        raise ValueError(f"Grid pinpoints `{value!r}` must be a non-empty list of positive [width, height] pairs.")
    return pairs


def _processor_size(processor: Any) -> tuple[int, int]:
    """(height, width) the image processor outputs: its crop size, else its size."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if size is None:
            continue
        get = size.get if hasattr(size, "get") else lambda key, s=size: getattr(s, key, None)
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
        if isinstance(size, int):
            return size, size
    raise ValueError(
        f"Cannot tell the output size of image processor {type(processor).__name__}: it has no `crop_size` or "
        "`size` with height/width or shortest_edge."
    )


def _patch_size(processor: Any) -> int:
    height, width = _processor_size(processor)
    if height != width:
        raise ValueError(f"anyres needs a square processor crop size, got {height}x{width} (height x width).")
    return height


def get_anyres_image_grid_shape(image_size: tuple[int, int], grid_pinpoints: Any, patch_size: int) -> tuple[int, int]:
    """Number of patches (across, down) anyres cuts an image of (width, height) `image_size` into."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def _pixel_values(processor: Any, images: Image.Image | list[Image.Image]) -> torch.Tensor:
    return processor.preprocess(images, return_tensors="pt")["pixel_values"]


def process_anyres_image(image: Image.Image, processor: Any, grid_pinpoints: Any) -> torch.Tensor:
    """Whole image at the processor's size, then the patches of its best-fit grid: (1 + n_patches, C, H, W)."""
    patch_size = _patch_size(processor)
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    patches = divide_to_patches(resize_and_pad_image(image, best), patch_size)
    whole = image.resize((patch_size, patch_size))
    return _pixel_values(processor, [whole, *patches])  # (1 + n_patches, C, H, W)


def process_images(
    images: Sequence[Image.Image], image_processor: Any, model_cfg: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Preprocess images as `model_cfg.image_aspect_ratio` says; (N, C, H, W) when shapes agree, else a list.

    `model_cfg` is any object (or dict) with `image_aspect_ratio` and, for anyres, `image_grid_pinpoints`.
    """
    cfg = model_cfg.get if isinstance(model_cfg, dict) else lambda key, default=None: getattr(model_cfg, key, default)
    aspect = cfg("image_aspect_ratio", None)
    if aspect not in ASPECT_RATIOS:
        raise ValueError(
            f"Unknown image_aspect_ratio `{aspect}`; use one of {', '.join(repr(a) for a in ASPECT_RATIOS)}."
        )
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("process_images got no images; pass at least one PIL image.")
    images = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    if aspect == "pad":
        fill = tuple(int(x * 255) for x in image_processor.image_mean)
        outputs = [_pixel_values(image_processor, expand2square(_fit(image), fill))[0] for image in images]
    elif aspect == "anyres":
        pinpoints = cfg("image_grid_pinpoints", None)
        if pinpoints is None:
            raise ValueError("image_aspect_ratio is `anyres` but model_cfg has no `image_grid_pinpoints`; set it.")
        outputs = [process_anyres_image(image, image_processor, pinpoints) for image in images]
    else:  # None / "square" / "resize": the processor alone decides
        outputs = [_pixel_values(image_processor, image)[0] for image in images]
    if all(out.shape == outputs[0].shape for out in outputs):
        return torch.stack(outputs, dim=0)
    return outputs


# ---------------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------------


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenize `prompt` with each `<image>` replaced by `image_token_index`.

    Each text chunk between images is tokenized on its own without special tokens; the BOS token, when the tokenizer
    adds one, is put once at the very start. Returns a list of ids, or a 1-D `torch.long` tensor for
    `return_tensors="pt"`.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"Unsupported return_tensors `{return_tensors}`; use None (a list) or 'pt'.")
    input_ids: list[int] = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            input_ids.append(image_token_index)
        if chunk:
            input_ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    return input_ids


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a row once its generated text (after the prompt) reaches any of `keywords`, as text or as tokens."""

    def __init__(self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor) -> None:
        if isinstance(keywords, str):
            keywords = [keywords]
        self.keywords = [k for k in keywords if k]
        if not self.keywords:
            raise ValueError(f"KeywordsStoppingCriteria needs at least one non-empty keyword, got `{keywords!r}`.")
        self.tokenizer = tokenizer
        self.keyword_ids = [tokenizer(k, add_special_tokens=False).input_ids for k in self.keywords]
        self.keyword_ids = [ids for ids in self.keyword_ids if ids]
        self.max_keyword_len = max((len(ids) for ids in self.keyword_ids), default=1)
        self.start_len = input_ids.shape[1]

    def _row_done(self, new_ids: torch.Tensor) -> bool:
        if new_ids.numel() == 0:
            return False
        tail = new_ids.tolist()
        for ids in self.keyword_ids:
            if len(tail) >= len(ids) and tail[-len(ids) :] == ids:
                return True
        # Tokens can merge a keyword with neighbouring text, so also look at the text of the last few new tokens.
        text = self.tokenizer.decode(tail[-(self.max_keyword_len + 1) :], skip_special_tokens=True)
        return any(keyword in text for keyword in self.keywords)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs) -> torch.Tensor:
        done = [self._row_done(row[self.start_len :]) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (batch,)


def get_model_name_from_path(model_path: str) -> str:
    """Model name from its directory: `a/b/checkpoint-100` -> `b_checkpoint-100`, else the last path component."""
    parts = [p for p in re.split(r"[/\\]", str(model_path).strip()) if p]
    if not parts:
        raise ValueError(f"Cannot get a model name from empty path `{model_path}`; pass the model directory or id.")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]
