"""Sequence packing (`--packing True`): several samples per row, each with its own positions and attention.

The samples' exact lengths (tokens after image expansion, `LazySupervisedDataset.token_lengths`) are packed into
rows of at most `--model_max_length` positions by best-fit decreasing. A row carries `position_ids` that restart at 0
for every sample and no `attention_mask`: from that, transformers' mask builder (`masking_utils`, SDPA / eager /
flex) makes the block-diagonal causal mask, and flash-attention 2 its variable-length kernel, so no token attends
across a sample boundary. The model's image splice (`prepare_inputs_labels_for_multimodal`) keeps those positions,
giving each image's features the positions that follow its marker. The first label of every sample is ignored, so
no sample is trained to predict the next one's first token. Each sample's loss is then the one it has alone.

With `--group_by_modality_length`, samples with images and text-only samples go to separate rows, so the
modality-grouped sampler still hands out batches of one modality.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from llava.constants import IGNORE_INDEX
from llava.train.data import LazySupervisedDataset


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of total length <= `capacity`: longest first, each into the fullest bin it fits.

    Runs in O(n log n + n * distinct free sizes) with a sorted list of the free sizes in use (at most `capacity`).
    """
    if capacity < 1:
        raise ValueError(f"Packing capacity must be positive, got {capacity}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free positions -> bins with exactly that much room
    free_sizes: list[int] = []  # sorted keys of `by_free`
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"Sample {i} has {n} positions, more than the row length {capacity}.")
        k = bisect.bisect_left(free_sizes, n)
        if k == len(free_sizes):
            bins.append([])
            b, free = len(bins) - 1, capacity
        else:
            free = free_sizes[k]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_sizes.pop(k)
        bins[b].append(i)
        rest = free - n
        if rest not in by_free:
            by_free[rest] = []
            bisect.insort(free_sizes, rest)
        by_free[rest].append(b)
    return bins


def pack_samples(lengths: Sequence[int], capacity: int, by_modality: bool = False) -> list[list[int]]:
    """Bins of sample indices; `lengths` are positive for samples with images, negative for text-only ones.
    With `by_modality`, a bin holds samples of one kind only."""
    sizes = [max(1, abs(n)) for n in lengths]
    if not by_modality:
        return best_fit_decreasing(sizes, capacity)
    bins = []
    for keep in (lambda n: n > 0, lambda n: n <= 0):
        subset = [i for i, n in enumerate(lengths) if keep(n)]
        bins += [[subset[j] for j in b] for b in best_fit_decreasing([sizes[i] for i in subset], capacity)]
    return bins


class PackedDataset(Dataset):
    """A `LazySupervisedDataset` seen as packed rows: item `i` is the samples of bin `i` laid end to end."""

    def __init__(self, dataset: LazySupervisedDataset, capacity: int | None = None, by_modality: bool = False):
        self.dataset = dataset
        self.capacity = capacity or dataset.max_length
        if self.capacity < dataset.max_length:
            raise ValueError(
                f"Packed rows of {self.capacity} positions cannot hold samples of up to {dataset.max_length} "
                "(--model_max_length); give the rows at least that length."
            )
        self.sample_lengths = dataset.token_lengths()  # one tokenizer pass; signed as `modality_lengths`
        self.bins = pack_samples(self.sample_lengths, self.capacity, by_modality)
        self.skipped_before_training = dataset.skipped_before_training

    def __len__(self) -> int:
        return len(self.bins)

    def token_lengths(self) -> list[int]:
        """Positions used by each row, positive for rows holding an image and negative for text-only ones."""
        out = []
        for b in self.bins:
            total = sum(abs(self.sample_lengths[i]) for i in b)
            out.append(total if any(self.sample_lengths[i] > 0 for i in b) else -total)
        return out

    @property
    def modality_lengths(self) -> list[int]:
        return self.token_lengths()

    @property
    def lengths(self) -> list[int]:
        return [abs(n) for n in self.token_lengths()]

    def describe(self, index: int, tokenizer: Any) -> str:
        """Row `index` decoded sample by sample, supervised spans in [[...]]."""
        parts = [self.dataset.describe(i, tokenizer) for i in self.bins[index]]
        return "\n".join(f"--- packed sample {k} ---\n{p}" for k, p in enumerate(parts))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Row `index`: `input_ids`, `labels` (each sample's first label ignored), `position_ids` (0.. per sample),
        the samples' images in order, and `skipped_records` (records dropped with `--skip_bad_records`)."""
        items, skipped = [], []
        for i in self.bins[index]:
            item = self.dataset[i]
            if "skipped_record" in item:
                skipped.append(item["skipped_record"])
            else:
                items.append(item)
        return concatenate_samples(items, skipped)


def concatenate_samples(items: Sequence[dict[str, Any]], skipped: Sequence[int] = ()) -> dict[str, Any]:
    """Samples (dataset items) as one packed row (see `PackedDataset.__getitem__`)."""
    ids, labels, positions, images, sizes = [], [], [], [], []
    for item in items:
        n = len(item["input_ids"])
        lab = item["labels"].clone()
        lab[0] = IGNORE_INDEX  # a sample's first token is never a target: the previous sample must not predict it
        ids.append(item["input_ids"])
        labels.append(lab)
        positions.append(torch.arange(n, dtype=torch.long))
        images += item.get("images", [])
        sizes += item.get("image_sizes", [])
    empty = torch.zeros(0, dtype=torch.long)
    row: dict[str, Any] = {
        "input_ids": torch.cat(ids) if ids else empty,
        "labels": torch.cat(labels) if labels else empty,
        "position_ids": torch.cat(positions) if positions else empty,
        "images": images,
        "image_sizes": sizes,
        "skipped_records": list(skipped),
    }
    return row


@dataclasses.dataclass
class PackedCollator:
    """Packed rows -> a batch: rows padded to the longest, the padding a sample of its own (positions from 0, no
    labels) so that no attention mask is needed; images flattened in row order."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped = [r for row in rows for r in row.get("skipped_records", ())]
        rows = [row for row in rows if len(row["input_ids"])]
        placeholder = not rows
        if placeholder:  # every record of the batch was dropped: one pad token, nothing supervised (as data.py)
            rows = [
                concatenate_samples([{"input_ids": torch.tensor([self.pad_token_id]), "labels": torch.tensor([0])}])
            ]
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, :n] = row["input_ids"]
            labels[b, :n] = row["labels"]
            position_ids[b, :n] = row["position_ids"]
            position_ids[b, n:] = torch.arange(width - n)
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        images = [im for row in rows for im in row["images"]]
        if images:
            same = all(im.shape == images[0].shape for im in images)
            batch["images"] = torch.stack(images) if same else images
            batch["image_sizes"] = [size for row in rows for size in row["image_sizes"]]
        if skipped:
            batch["skipped_records"] = skipped
            batch["placeholder_batch"] = placeholder
        return batch


__all__ = ["PackedCollator", "PackedDataset", "best_fit_decreasing", "pack_samples"]
