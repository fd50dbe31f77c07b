"""Length- and modality-grouped sampling: batches of similar length (and one modality) in a reproducible order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

# Length grouping sorts pools of this many runs (batch x ranks x accumulation) by length before cutting batches: as in
# transformers' length-grouped sampler, large enough that padding stays a few percent of the tokens.
LENGTH_GROUP_POOL = 50
# Up to this many records the grouped sampler measures every sample's length with the tokenizer (seconds); larger
# datasets use the word-count estimates, as the original does.
EXACT_LENGTHS_MAX = 50_000


def _chunks(seq: Sequence[int], size: int) -> list[list[int]]:
    return [list(seq[i : i + size]) for i in range(0, len(seq), size)]


def _split_balanced(indices: list[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Split `indices` into `parts` lists of equal size (the last ones may be short) with similar total length."""
    if len(indices) % parts:
        return _chunks(indices, -(-len(indices) // parts))
    cap = len(indices) // parts
    out: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(indices, key=lambda k: -abs(lengths[k])):
        j = min((j for j in range(parts) if len(out[j]) < cap), key=lambda j: totals[j])
        out[j].append(i)
        totals[j] += abs(lengths[i])
    return out


def length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    groups: int,
    generator: torch.Generator,
    subset: list[int] | None = None,
    pool: int | None = None,
) -> list[int]:
    """A random order of `subset` (default: all) in which each run of `batch_size * groups` holds similar lengths.

    Each run is `groups` consecutive batches (one per rank and accumulation step) balanced by total length. Runs
    are cut from pools of `pool` runs (default `LENGTH_GROUP_POOL`) sorted by length, so a batch pads to a length
    close to its own samples'; the runs are then shuffled, except that the one holding the longest sample comes first
    (running out of memory shows at step 1, not hours in) and a short last run stays last.
    """
    subset = list(range(len(lengths))) if subset is None else subset
    perm = [subset[i] for i in torch.randperm(len(subset), generator=generator).tolist()]
    mega = batch_size * groups
    runs = []
    for chunk in _chunks(perm, mega * (pool or LENGTH_GROUP_POOL)):
        chunk.sort(key=lambda k: -abs(lengths[k]))
        runs += _chunks(chunk, mega)
    last = runs.pop() if runs and len(runs[-1]) < mega else None
    runs = [runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()]
    if runs:
        longest = max(range(len(runs)), key=lambda r: abs(lengths[runs[r][0]]))
        runs.insert(0, runs.pop(longest))
    out = []
    for run in runs + ([last] if last else []):
        for part in _split_balanced(run, lengths, groups):
            out += part
    return out


def modality_grouped_indices(
    lengths: Sequence[int], batch_size: int, groups: int, generator: torch.Generator
) -> list[int]:
    """Like `length_grouped_indices`, but each run of `batch_size * groups` is all-image or all-text.

    `lengths` are positive for samples with images and negative for text-only ones. The two leftover partial runs
    are joined into one mixed run at the end. All-image or all-text data is plain length grouping.
    """
    image = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n <= 0]
    if not image or not text:
        return length_grouped_indices(lengths, batch_size, groups, generator)
    mega = batch_size * groups
    runs, leftover = [], []
    for subset in (image, text):
        order = _chunks(length_grouped_indices(lengths, batch_size, groups, generator, subset), mega)
        if order and len(order[-1]) < mega:
            leftover += order.pop()
        runs += order
    out = [i for r in torch.randperm(len(runs), generator=generator).tolist() for i in runs[r]]
    return out + leftover


class LengthGroupedSampler(Sampler[int]):
    """Random order with length-grouped (and, with `group_by_modality`, single-modality) batches; reproducible
    from `seed` and the epoch, so a resumed run sees the same order."""

    def __init__(self, batch_size: int, groups: int, lengths: Sequence[int], group_by_modality: bool, seed: int = 0):
        self.batch_size, self.groups = batch_size, groups
        self.lengths = list(lengths)
        self.group_by_modality = group_by_modality
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        fn = modality_grouped_indices if self.group_by_modality else length_grouped_indices
        return iter(fn(self.lengths, self.batch_size, self.groups, g))


# The original's helper names (haotian-liu/LLaVA llava/train/llava_trainer.py), with its signatures and contract: a
# permutation of the samples in which each run of `batch_size * world_size` holds similar lengths (and, for the
# modality version, one modality). The order within that contract is this module's, not the original's.


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """`indices` split into `num_chunks` lists: equal sizes with similar total length, or dealt out in turn when the
    count does not divide evenly (as the original does)."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    return _split_balanced(indices, lengths, num_chunks)


def get_length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    world_size: int,
    generator: torch.Generator | None = None,
    merge: bool = True,
) -> list[int]:
    """`length_grouped_indices` under the original's name; `merge` is accepted and has no effect (as there)."""
    return length_grouped_indices(lengths, batch_size, world_size, generator)


def get_modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """`modality_grouped_indices` under the original's name (positive lengths: image samples, negative: text)."""
    return modality_grouped_indices(lengths, batch_size, world_size, generator)
