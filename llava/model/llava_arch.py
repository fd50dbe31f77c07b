"""The multimodal core: encode images, project them, splice the features into the decoder's token embeddings."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape, parse_grid_pinpoints
from llava.model.checkpoint_format import (  # noqa: F401  (re-exported: their home before checkpoint_format)
    EMBEDDING_KEY_SUFFIXES,
    load_projector_weights,
    restore_token_rows,
)
from llava.model.feature_cache import weights_fingerprint
from llava.model.image_tokens import resize_embeddings_to_mean, start_end_token_ids  # noqa: F401  (re-exported)
from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_projector.builder import build_vision_projector

logger = logging.getLogger(__name__)

PATCH_MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
_FEATURE_CONFIG_KEYS = ("mm_patch_merge_type", "image_aspect_ratio", "image_grid_pinpoints")


def unpadded_hw(height: int, width: int, original_size: Sequence[int]) -> tuple[int, int, int, int]:
    """Rows/cols of a (height, width) feature grid that hold the image itself, not the letterbox padding.

    `original_size` is PIL's (width, height). Returns (top, bottom, left, right) as slice bounds.
    """
    orig_w, orig_h = original_size
    if orig_w / orig_h > width / height:  # wider than the grid: padding on top and bottom
        new_h = int(orig_h * (width / orig_w))
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(orig_w * (height / orig_h))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


def unpad_image(tensor: torch.Tensor, original_size: Sequence[int]) -> torch.Tensor:
    """(C, H, W) grid of features -> the part that covers the original image (original name kept)."""
    top, bottom, left, right = unpadded_hw(tensor.shape[1], tensor.shape[2], original_size)
    return tensor[:, top:bottom, left:right]


def check_patch_merge_type(value: str) -> str:
    if value not in PATCH_MERGE_TYPES:
        raise ValueError(f"Unknown `mm_patch_merge_type` `{value}`; valid: {', '.join(PATCH_MERGE_TYPES)}.")
    return value


class LlavaMetaModel:
    """Mixed into a decoder's base model (`LlamaModel`, ...): adds `vision_tower`, `mm_projector`, `image_newline`."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in check_patch_merge_type(getattr(config, "mm_patch_merge_type", "flat") or "flat"):
                self.image_newline = nn.Parameter(torch.empty(config.hidden_size))

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, model_args, fsdp=None) -> None:
        """Attach a pretrained vision tower and a (new or stage-1) projector, as `model_args` (the original's
        `ModelArguments` or a look-alike) says; `llava.model.assemble` does the work."""
        from llava.model.assemble import attach_vision_modules, specs_from_args

        vision, projector, _ = specs_from_args(model_args)
        attach_vision_modules(self, vision, projector)


def packed_position_ids(position_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Positions of a packed row (positions restart where a sample starts) after token i became `counts[i]`
    embeddings: an image's features continue its sample's positions, and the sample's later tokens shift along."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[1:] = position_ids[1:] - position_ids[:-1] != 1  # transformers' rule (masking_utils)
    first = torch.cumsum(counts, 0) - counts  # where each token's embeddings begin in the expanded row
    idx = torch.arange(int(counts.sum()), device=position_ids.device)
    base = torch.zeros_like(idx)
    base[first[starts]] = position_ids[starts]
    begin = torch.zeros_like(idx)
    begin[first[starts]] = first[starts]
    begin = begin.cummax(0).values  # expanded index where the current sample begins
    return base[begin] + idx - begin


def _restarts(position_ids: torch.Tensor | None) -> bool:
    """Whether positions restart inside a row: several samples packed into one (see `packed_position_ids`)."""
    return position_ids is not None and bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any())


def _right_padded(attention_mask: torch.Tensor | None) -> bool:
    """Whether every row of a (B, T) mask is real tokens followed only by padding."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _as_image_list(images) -> list[torch.Tensor]:
    """Normalise `images` to one tensor per image, each (k, C, H, W) (k = 1, or 1 + anyres tiles)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            return list(images.unsqueeze(1))
        if images.ndim == 5:
            return list(images)
        raise ValueError(f"`images` must be (N, C, H, W) or (N, K, C, H, W); got shape {tuple(images.shape)}.")
    out = []
    for im in images:
        if im.ndim == 3:
            im = im.unsqueeze(0)
        if im.ndim != 4:
            raise ValueError(f"Each image must be (C, H, W) or (K, C, H, W); got shape {tuple(im.shape)}.")
        out.append(im)
    return out


class LlavaMetaForCausalLM:
    """Mixed into a decoder's causal-LM class: multimodal `forward` and `generate`.

    A family sets `llava_model_class` (its base model with `LlavaMetaModel` mixed in) and `decoder_pretrained_class`
    (the family's `PreTrainedModel`), so the decoder's own `__init__`, which builds a text-only model, is skipped.
    The base model is stored under the family's `base_model_prefix` (`model` for LLaMA, `transformer` for MPT), so
    weight keys are the family's own.
    """

    llava_model_class: type
    decoder_pretrained_class: type

    def __init__(self, config):
        self.decoder_pretrained_class.__init__(self, config)
        setattr(self, self.base_model_prefix, self.llava_model_class(config))
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self):
        return getattr(self, self.base_model_prefix)

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LlavaMetaModel) and getattr(module, "image_newline", None) is not None:
            nn.init.normal_(module.image_newline, std=1 / math.sqrt(self.config.hidden_size))

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """The model's parameters by part: `vision_tower`, `mm_projector` (with `image_newline`), `embeddings`,
        `llm`, `lm_head`, `lora` (adapter weights). Empty parts are left out (see `llava.model.assemble.PARTS`)."""
        from llava.model.assemble import parameter_parts

        params = dict(self.named_parameters())
        grouped: dict[str, list[nn.Parameter]] = {}
        for name, part in parameter_parts(self).items():
            grouped.setdefault(part, []).append(params[name])
        return grouped

    # -- images ----------------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, P, D): tower, then projector. No autograd through a frozen tower."""
        tower = self.get_vision_tower()
        if any(p.requires_grad for p in tower.parameters()):
            features = tower(images)
        else:
            with torch.no_grad():
                features = tower(images)
        return self.get_model().mm_projector(features)

    def image_features(self, images, image_sizes=None) -> list[torch.Tensor]:
        """One (n_i, D) tensor per image, anyres tiles merged per `mm_patch_merge_type`.

        With autograd off and an `image_feature_cache` attached (see `llava/model/feature_cache.py`), an image seen
        before is not encoded again.
        """
        per_image = _as_image_list(images)
        cache = getattr(self, "image_feature_cache", None)
        if cache is None or torch.is_grad_enabled():
            return self._image_features(per_image, image_sizes)
        model = self.get_model()
        cache.check_weights(
            weights_fingerprint([self.get_vision_tower(), model.mm_projector, getattr(model, "image_newline", None)])
        )
        # The merge of anyres tiles depends on these too, so they join every key.
        context = tuple(str(getattr(self.config, k, None)) for k in _FEATURE_CONFIG_KEYS)
        return cache.features(per_image, image_sizes, self._image_features, context)

    def _image_features(self, per_image: list[torch.Tensor], image_sizes=None) -> list[torch.Tensor]:
        if torch.is_grad_enabled():  # training: one batched call, the fastest
            counts = [im.shape[0] for im in per_image]
            encoded = self.encode_images(torch.cat(per_image, dim=0)).split(counts, dim=0)
        else:
            # Inference: each image on its own, so its features never depend on what it is batched with (matrix
            # kernels pick their blocking from the batch shape, and on some CPUs the rounding follows). This is what
            # makes the image-feature cache and batched serving give one-at-a-time features bit for bit.
            encoded = [self.encode_images(im) for im in per_image]
        merge = check_patch_merge_type(getattr(self.config, "mm_patch_merge_type", "flat") or "flat")
        out = []
        for i, feats in enumerate(encoded):  # feats: (k, P, D)
            if merge == "flat":
                out.append(feats.flatten(0, 1))
                continue
            if feats.shape[0] == 1:
                merged = feats[0]
            else:
                if image_sizes is None:
                    raise ValueError(f"`mm_patch_merge_type={merge}` needs `image_sizes` for anyres images.")
                merged = self._merge_spatial(feats, image_sizes[i], unpad="unpad" in merge)
            if "unpad" in merge and feats.shape[0] == 1:
                merged = torch.cat([merged, self.get_model().image_newline[None].to(merged.dtype)], dim=0)
            out.append(merged)
        return out

    def num_image_tokens(self, image_size: Sequence[int] | None = None) -> int:
        """How many embeddings one image of PIL size (width, height) becomes, computed from the config alone."""
        tower = self.get_vision_tower()
        per_tile = tower.num_patches
        merge = check_patch_merge_type(getattr(self.config, "mm_patch_merge_type", "flat") or "flat")
        if getattr(self.config, "image_aspect_ratio", None) != "anyres":
            return per_tile + (1 if "unpad" in merge else 0)
        if image_size is None:
            raise ValueError("anyres: the image size decides the token count; pass `image_size` (width, height).")
        patch = tower.config.image_size
        pinpoints = parse_grid_pinpoints(self.config.image_grid_pinpoints, patch)
        cols, rows = get_anyres_image_grid_shape(image_size, pinpoints, patch)
        if merge == "flat":
            return per_tile * (1 + rows * cols)
        side = tower.num_patches_per_side
        height, width = rows * side, cols * side
        if "unpad" not in merge:
            return per_tile + height * width
        top, bottom, left, right = unpadded_hw(height, width, image_size)
        return per_tile + (bottom - top) * (right - left + 1)

    def _merge_spatial(self, feats: torch.Tensor, image_size, unpad: bool) -> torch.Tensor:
        tower = self.get_vision_tower()
        side = tower.num_patches_per_side
        base, tiles = feats[0], feats[1:]
        if tiles.shape[1] != side * side:
            raise ValueError(
                f"Spatial patch merging needs {side * side} features per tile, got {tiles.shape[1]} "
                "(use `mm_vision_select_feature=patch`)."
            )
        pinpoints = parse_grid_pinpoints(self.config.image_grid_pinpoints, tower.config.image_size)
        cols, rows = get_anyres_image_grid_shape(image_size, pinpoints, tower.config.image_size)
        dim = tiles.shape[-1]
        grid = tiles.view(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
        if unpad:
            grid = unpad_image(grid, image_size)
            newline = self.get_model().image_newline.to(grid.dtype)[:, None, None].expand(dim, grid.shape[1], 1)
            grid = torch.cat([grid, newline], dim=-1)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)

    # -- splicing --------------------------------------------------------------------------------------------------
    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images,
        image_sizes=None,
        padding_side: str | None = None,
    ):
        """Replace each IMAGE_TOKEN_INDEX in `input_ids` by that image's features.

        Returns `(None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)` (the original's
        contract). Image features are consumed in order across the batch; the spliced sequences are truncated to
        `tokenizer_model_max_length` and re-padded on `padding_side` (default: the config's).
        """
        n_markers = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        n_images = 0 if images is None else len(_as_image_list(images))
        if self.get_vision_tower() is None or (images is None and n_markers == 0):
            if n_markers:
                raise ValueError("The prompt has image markers but this model has no vision tower.")
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if n_markers != n_images:
            raise ValueError(
                f"Image count mismatch: the batch's prompts hold {n_markers} `<image>` markers but {n_images} "
                "images were given. Put one `<image>` in the prompt for each image."
            )

        features = self.image_features(images, image_sizes) if n_images else []
        embed = self.get_input_embeddings()
        # Packed rows (--packing, llava/train/packing.py): positions restart per sample and there is no mask.
        packed = position_ids is not None and attention_mask is None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        labels_given = labels is not None
        if not labels_given:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        # One embedding call for the whole batch; the sentinel rows are discarded below.
        text_embeds = embed(input_ids.clamp(min=0))

        rows_embeds, rows_labels, rows_positions = [], [], []
        next_image = 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b]
            ids, lab, emb = input_ids[b][keep], labels[b][keep], text_embeds[b][keep]
            marks = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            pieces_e, pieces_l, start = [], [], 0
            counts = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
            for m in marks:
                pieces_e.append(emb[start:m])
                pieces_l.append(lab[start:m])
                feat = features[next_image].to(device=emb.device, dtype=emb.dtype)
                next_image += 1
                counts[m] = feat.shape[0]
                pieces_e.append(feat)
                pieces_l.append(torch.full((feat.shape[0],), IGNORE_INDEX, device=lab.device, dtype=lab.dtype))
                start = m + 1
            pieces_e.append(emb[start:])
            pieces_l.append(lab[start:])
            rows_embeds.append(torch.cat(pieces_e))
            rows_labels.append(torch.cat(pieces_l))
            if packed:
                rows_positions.append(packed_position_ids(position_ids.expand(input_ids.shape[0], -1)[b], counts))

        max_len = getattr(self.config, "tokenizer_model_max_length", None)
        if max_len is not None:
            rows_embeds = [e[:max_len] for e in rows_embeds]
            rows_labels = [lab[:max_len] for lab in rows_labels]
            rows_positions = [pos[:max_len] for pos in rows_positions]

        side = padding_side or getattr(self.config, "tokenizer_padding_side", "right") or "right"
        width = max(e.shape[0] for e in rows_embeds)
        batch = len(rows_embeds)
        dim = rows_embeds[0].shape[1]
        ref = rows_embeds[0]
        embeds = ref.new_zeros(batch, width, dim)
        new_labels = torch.full((batch, width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        new_mask = torch.zeros(batch, width, dtype=torch.bool, device=attention_mask.device)
        for b, (e, lab) in enumerate(zip(rows_embeds, rows_labels)):
            n = e.shape[0]
            sl = slice(width - n, width) if side == "left" else slice(0, n)
            embeds[b, sl] = e
            new_labels[b, sl] = lab
            new_mask[b, sl] = True
        new_position_ids = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
        if packed:  # each sample keeps its positions; the padding becomes a sample of its own (positions from 0)
            new_position_ids = (~new_mask).long().cumsum(-1) - 1
            for b, pos in enumerate(rows_positions):
                new_position_ids[b, new_mask[b]] = pos.to(new_position_ids.device)
        return (
            None,
            new_position_ids if position_ids is not None else None,
            None if packed else new_mask,
            past_key_values,
            embeds,
            new_labels if labels_given else None,
        )

    # -- entry points ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        images=None,
        image_sizes=None,
        **kwargs,
    ):
        # transformers >= 5.25 names the KV cache `cache` (`past_key_values` goes away in 5.40); `past_key_values` is
        # still accepted here, from callers written for the original LLaVA, and passed on under the new name.
        cache = kwargs.pop("cache", None)
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("Pass the KV cache once: as `cache` (transformers 5.25+), not also `past_key_values`.")
            cache = past_key_values
        if inputs_embeds is None and input_ids is not None:
            (input_ids, position_ids, attention_mask, cache, inputs_embeds, labels) = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, cache, labels, images, image_sizes
                )
            )
        if cache is None and attention_mask is None and _restarts(position_ids):
            # Packed rows (--packing): transformers builds the per-sample mask only when no KV cache is made.
            use_cache = False
        if labels is not None and cache is None and position_ids is None and _right_padded(attention_mask):
            # Causal attention never lets a real token see the padding after it, and padding carries no label, so a
            # right-padded training batch needs no mask: SDPA / flash attention then take their fast causal path.
            attention_mask = None
        if labels is not None and self.training and not {"logits_to_keep", "shift_labels"} & kwargs.keys():
            # Logits only where a label is predicted (replies: a fifth of the positions or less), not for image
            # features and prompts: the same loss without most of the (batch, length, vocabulary) float32 logits.
            shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            keep = shifted != IGNORE_INDEX
            kwargs["logits_to_keep"], kwargs["shift_labels"] = keep, shifted[keep]
        kwargs.pop("return_dict", None)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Like HF `generate`, with `images`; returns only the new tokens (the prompt is given as embeddings)."""
        if "inputs_embeds" in kwargs:
            raise ValueError("`inputs_embeds` is not supported here; pass `inputs` (token ids) and `images`.")
        if inputs is None:
            inputs = kwargs.pop("input_ids")
        kwargs.pop("position_ids", None)  # recomputed from the attention mask by `generate`
        attention_mask = kwargs.pop("attention_mask", None)
        _, _, attention_mask, _, inputs_embeds, _ = self.prepare_inputs_labels_for_multimodal(
            inputs, None, attention_mask, None, None, images, image_sizes, padding_side="left"
        )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(inputs)
            if attention_mask is None:
                attention_mask = torch.ones(inputs.shape, dtype=torch.long, device=inputs.device)
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), **kwargs)

    # -- tokenizer -------------------------------------------------------------------------------------------------
    def initialize_vision_tokenizer(self, model_args, tokenizer) -> None:
        """Add `<im_patch>` / `<im_start>`, `<im_end>` when `model_args` asks for them (`llava.model.image_tokens`)."""
        from llava.model.image_tokens import add_image_tokens

        add_image_tokens(self, model_args, tokenizer)
