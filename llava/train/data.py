"""Dataset formats (LLaVA JSON/JSONL, HF `messages`/`images`), the lazy training dataset and its collator.

Records are read and validated up front (schema, `<image>` count, image files), so a bad record stops the run before
step 1 with its file, index and image path, unless `--skip_bad_records` drops it. Images are opened lazily, in
`__getitem__`; with `--skip_bad_records` a record whose image fails to load then is dropped from its batch by the
collator (never replaced by another record).

A little over the house's ~450 lines on purpose: a record's whole way from file to batch (both formats, validation,
the lazy dataset, the collator) and the `--skip_bad_records` rules that cross all of them stay in one file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.mm_utils import process_images
from llava.prompting import content_text
from llava.train.preprocess import (
    ConversationError,
    Preprocessor,
    Tokenized,
    check_order,
    render_supervision,
    truncate_to_fit,
)

logger = logging.getLogger(__name__)

# Role names seen in LLaVA / ShareGPT / HF data, mapped to ours.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
IMAGE_CHECKS = ("header", "full", "exists", "none")
# Length given to an image in `modality_lengths` (the original's constant; only the grouping uses it).
IMAGE_LENGTH_ESTIMATE = 128


@dataclasses.dataclass
class Record:
    """One conversation, built by `normalize_record` (which checks the message order): `messages` are (role, text)
    with roles system/user/assistant; `images` are full paths."""

    index: int
    id: str
    images: list[str]
    messages: list[tuple[str, str]]


class BadRecordError(ValueError):
    """A dataset record that cannot be trained on; the message names the file, the record index and the cause."""

    def __init__(self, source: str, index: int, reason: str, path: str | None = None):
        self.source, self.index, self.reason, self.path = source, index, reason, path
        where = f"`{source}` record {index}"
        super().__init__(f"{where}: {reason}" + (f" (image `{path}`)" if path else ""))


class DatasetError(ValueError):
    """The dataset has bad records and `--skip_bad_records` was not given."""


# ------------------------------------------------------------------------------------------------------- reading


def read_records(path: str) -> list[Any]:
    """The raw records of a `.json` list or a `.jsonl` file (one record per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Dataset `{path}` (--data_path) does not exist.")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            out = []
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"`{path}` line {n} is not valid JSON: {err}") from err
            return out
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{path}` is not valid JSON ({err}); JSON Lines files must end in `.jsonl`.") from err
    if not isinstance(data, list):
        raise ValueError(f"`{path}` must hold a JSON list of records, got a {type(data).__name__}.")
    return data


def _image_list(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConversationError(f"`{field}` must be a path or a list of paths, got `{value!r:.80}`.")


def _hf_content(content: Any) -> str:
    """HF message content (a string or a list of parts) as text with `<image>` markers."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConversationError(f"Message content must be a string or a list of parts, got `{content!r:.80}`.")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("image", "text"):
            raise ConversationError(f"Unknown content part `{part!r:.80}`; expected type `image` or `text`.")
        parts.append((kind, part.get("text", "") if kind == "text" else ""))
    return content_text(parts, compact=True)  # where the markers go: llava.prompting


def _messages(raw: dict) -> tuple[list[tuple[str, str]], list[str]]:
    if "conversations" in raw:
        turns = raw["conversations"]
        if not isinstance(turns, list):
            raise ConversationError("`conversations` must be a list of {from, value} turns.")
        pairs = []
        for t in turns:
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise ConversationError(f"Turn `{t!r:.80}` lacks `from` or `value`.")
            pairs.append((t["from"], t["value"]))
        images = _image_list(raw.get("image"), "image")
    elif "messages" in raw:
        turns = raw["messages"]
        if not isinstance(turns, list):
            raise ConversationError("`messages` must be a list of {role, content} messages.")
        pairs = []
        for t in turns:
            if not isinstance(t, dict) or "role" not in t or "content" not in t:
                raise ConversationError(f"Message `{t!r:.80}` lacks `role` or `content`.")
            pairs.append((t["role"], _hf_content(t["content"])))
        images = _image_list(raw.get("images", raw.get("image")), "images")
    else:
        raise ConversationError("The record has neither `conversations` (LLaVA format) nor `messages` (HF format).")
    messages = []
    for role, text in pairs:
        if str(role).lower() not in ROLE_ALIASES:
            raise ConversationError(f"Unknown role `{role}`; expected one of {', '.join(sorted(ROLE_ALIASES))}.")
        if not isinstance(text, str):
            raise ConversationError(f"A `{role}` turn's text is {type(text).__name__}, not a string.")
        messages.append((ROLE_ALIASES[str(role).lower()], text))
    # As the original: a conversation that opens with the assistant starts at the first user turn.
    head = 1 if messages and messages[0][0] == "system" else 0
    while len(messages) > head and messages[head][0] == "assistant":
        del messages[head]
    return messages, images


def normalize_record(raw: Any, index: int, source: str, image_folder: str | None = None) -> Record:
    """A raw record (either format) as a `Record`, or a `BadRecordError` saying what is wrong with it."""
    if not isinstance(raw, dict):
        raise BadRecordError(source, index, f"a record must be a JSON object, got `{raw!r:.80}`")
    try:
        messages, images = _messages(raw)
        check_order(messages)
    except ConversationError as err:
        raise BadRecordError(source, index, str(err)) from err
    markers = sum(text.count(DEFAULT_IMAGE_TOKEN) for _, text in messages)
    if markers != len(images):
        raise BadRecordError(
            source,
            index,
            f"{markers} `<image>` marker(s) in the text but {len(images)} image(s); put one `<image>` in the "
            "conversation for each image",
        )
    paths = [p if os.path.isabs(p) or not image_folder else os.path.join(image_folder, p) for p in images]
    return Record(index=index, id=str(raw.get("id", index)), images=paths, messages=messages)


def check_image(path: str, mode: str = "header") -> str | None:
    """None when the image at `path` passes the `mode` check, else what is wrong with it."""
    if mode == "none":
        return None
    if not os.path.isfile(path):
        return "image file is missing"
    if mode == "exists":
        return None
    try:
        with Image.open(path) as image:
            if mode == "full":
                image.convert("RGB")
    except Exception as err:  # PIL raises many types for bad files; each means "cannot train on this image"
        return f"image cannot be decoded ({type(err).__name__}: {err})"
    return None


def find_bad_images(records: Sequence[Record], mode: str = "header", workers: int = 16) -> list[tuple[int, str, str]]:
    """(record position, path, problem) for every image that fails `check_image`, checked in parallel threads."""
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"Unknown image check `{mode}`; valid: {', '.join(IMAGE_CHECKS)}.")
    jobs = [(pos, path) for pos, record in enumerate(records) for path in record.images]
    if mode == "none" or not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        results = pool.map(lambda job: check_image(job[1], mode), jobs)
        return [(pos, path, problem) for (pos, path), problem in zip(jobs, results) if problem]


def load_records(
    data_path: str,
    image_folder: str | None,
    image_check: str = "header",
    skip_bad: bool = False,
    skipped: list[BadRecordError] | None = None,
) -> list[Record]:
    """Read, normalize and validate a dataset; bad records stop the run (or are dropped with `skip_bad`, and
    appended to `skipped` when given)."""
    raw = read_records(data_path)
    records, problems = [], []
    for i, item in enumerate(raw):
        try:
            records.append(normalize_record(item, i, data_path, image_folder))
        except BadRecordError as err:
            problems.append(err)
    bad_images = _distributed_bad_images(records, image_check)
    bad_positions = {pos for pos, _, _ in bad_images}
    problems += [BadRecordError(data_path, records[pos].index, why, path) for pos, path, why in bad_images]
    records = [r for pos, r in enumerate(records) if pos not in bad_positions]
    if problems:
        problems.sort(key=lambda e: e.index)
        listing = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        if not skip_bad:
            raise DatasetError(
                f"{len(problems)} bad record(s) in `{data_path}`:\n{listing}{more}\nFix them (see `python -m "
                "llava.data.check --help`, which can also --fix wrong image extensions) or pass "
                "`--skip_bad_records True` to train without them."
            )
        logger.warning("Skipping %d bad record(s) of `%s`:\n%s%s", len(problems), data_path, listing, more)
        if skipped is not None:
            skipped += problems
    if not records:
        raise DatasetError(f"`{data_path}` has no usable records.")
    return records


def _distributed_bad_images(records: list[Record], mode: str) -> list[tuple[int, str, str]]:
    """Image check on rank 0 only, the result shared with every rank (all ranks must drop the same records)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return find_bad_images(records, mode)
    payload = [find_bad_images(records, mode) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


# -------------------------------------------------------------------------------------------------- image tokens


class ImageTokenCounter:
    """How many positions an image takes after splicing; a picklable stand-in for `model.num_image_tokens`."""

    def __init__(self, model):
        from types import SimpleNamespace

        cfg = model.config
        tower = model.get_vision_tower()
        self.config = SimpleNamespace(
            image_aspect_ratio=getattr(cfg, "image_aspect_ratio", None),
            image_grid_pinpoints=getattr(cfg, "image_grid_pinpoints", None),
            mm_patch_merge_type=getattr(cfg, "mm_patch_merge_type", "flat"),
        )
        self._tower = SimpleNamespace(
            num_patches=tower.num_patches,
            num_patches_per_side=tower.num_patches_per_side,
            config=SimpleNamespace(image_size=tower.config.image_size),
        )
        self.image_size = tower.config.image_size

    def get_vision_tower(self):
        return self._tower

    @property
    def depends_on_size(self) -> bool:
        return self.config.image_aspect_ratio == "anyres"

    def __call__(self, image_size: Sequence[int] | None = None) -> int:
        from llava.model.llava_arch import LlavaMetaForCausalLM

        return LlavaMetaForCausalLM.num_image_tokens(self, image_size)


# ------------------------------------------------------------------------------------------------------- dataset


class LazySupervisedDataset(Dataset):
    """Records -> model inputs, one at a time: images opened and tokenization done in `__getitem__`."""

    def __init__(
        self,
        records: list[Record],
        preprocessor: Preprocessor,
        max_length: int,
        image_processor: Any = None,
        image_tokens: ImageTokenCounter | Callable | None = None,
        image_config: dict | None = None,
        source: str = "dataset",
        skip_bad: bool = False,
    ):
        if any(r.images for r in records) and (image_processor is None or image_tokens is None):
            raise ValueError("The dataset has images but the model has no vision tower; pass --vision_tower.")
        self.records = records
        self.preprocessor = preprocessor
        self.max_length = max_length
        self.image_processor = image_processor
        self.image_tokens = image_tokens
        self.image_config = image_config or {"image_aspect_ratio": "square"}
        self.source = source
        self.skip_bad = skip_bad
        self.skipped_before_training: list[int] = []  # record indices `load_records` dropped (set by the caller)

    def __len__(self) -> int:
        return len(self.records)

    def _word_length(self, record: Record) -> int:
        return sum(len(text.split()) for _, text in record.messages)

    @property
    def lengths(self) -> list[int]:
        """Rough sample lengths (words, plus a constant per image set), as the original, for length grouping."""
        return [self._word_length(r) + (IMAGE_LENGTH_ESTIMATE if r.images else 0) for r in self.records]

    @property
    def modality_lengths(self) -> list[int]:
        """Word lengths, positive for samples with images and negative for text-only ones."""
        return [self._word_length(r) if r.images else -self._word_length(r) for r in self.records]

    def token_lengths(self) -> list[int]:
        """Exact sample lengths (tokens after image expansion and truncation), positive for samples with images and
        negative for text-only ones: one tokenizer pass over every record (about 0.3 ms each), so the length-grouped
        sampler uses them for datasets up to `llava_trainer.EXACT_LENGTHS_MAX` records."""
        out = []
        for i, record in enumerate(self.records):
            tokens, kept = self.tokenize(i)
            n = len(tokens.input_ids)
            if kept:
                sizes = [_image_size(p) for p in record.images[:kept]] if self.image_tokens.depends_on_size else None
                n += sum(self.image_tokens(size) - 1 for size in (sizes or [None] * kept))
            out.append(n if record.images else -n)
        return out

    def open_images(self, record: Record) -> list[Image.Image]:
        images = []
        for path in record.images:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except Exception as err:  # any failure to read the file means this record cannot be used
                raise BadRecordError(self.source, record.index, f"image cannot be loaded ({err})", path) from err
        return images

    def tokenize(self, index: int, image_sizes: Sequence[Sequence[int]] | None = None) -> tuple[Tokenized, int]:
        """Tokenized sample `index`, cut to `max_length` after image expansion, and how many images it keeps."""
        record = self.records[index]
        tokens = self.preprocessor(record.messages, len(record.images), validated=True)  # checked when read
        if record.images:
            if image_sizes is None and self.image_tokens.depends_on_size:
                image_sizes = [_image_size(p) for p in record.images]
            counts = [self.image_tokens(size) for size in (image_sizes or [None] * len(record.images))]
        else:
            counts = []
        return truncate_to_fit(tokens, counts, self.max_length)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample `index`; with `skip_bad`, a record that fails to load gives `{"skipped_record": <record index>}`,
        which the collator leaves out of the batch (the record is dropped, not replaced)."""
        try:
            return self._item(index)
        except BadRecordError as err:
            if not self.skip_bad:
                raise
            logger.warning("Dropping a bad record during training: %s", err)
            return {"skipped_record": self.records[index].index}

    def _item(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        images = self.open_images(record) if record.images else []
        tokens, kept = self.tokenize(index, [im.size for im in images])
        images = images[:kept]
        item: dict[str, Any] = {
            "input_ids": torch.tensor(tokens.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokens.labels, dtype=torch.long),
            "images": [],
            "image_sizes": [list(im.size) for im in images],
        }
        if images:
            pixels = process_images(images, self.image_processor, self.image_config)
            item["images"] = list(pixels)  # one (C, H, W) or (tiles, C, H, W) tensor per image
        return item

    def describe(self, index: int, tokenizer: Any) -> str:
        """Sample `index` decoded, its supervised spans in [[...]]."""
        tokens, _ = self.tokenize(index)
        return render_supervision(tokenizer, tokens)


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def scan_supervision(dataset: LazySupervisedDataset, limit: int = 2000, seed: int = 0) -> tuple[int, list[int]]:
    """Tokenize up to `limit` samples (all when fewer); returns (samples checked, indices with nothing supervised)."""
    indices = list(range(len(dataset)))
    if len(indices) > limit:
        indices = sorted(random.Random(seed).sample(indices, limit))
    masked = [i for i in indices if dataset.tokenize(i)[0].num_supervised == 0]
    return len(indices), masked


# ------------------------------------------------------------------------------------------------------ collator


@dataclasses.dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads ids and labels, builds the attention mask from lengths, and flattens the batch's images."""

    pad_token_id: int

    def __call__(self, instances: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped = [x["skipped_record"] for x in instances if "skipped_record" in x]
        instances = [x for x in instances if "skipped_record" not in x]
        placeholder = not instances
        if placeholder:
            # Every record of this batch was dropped. The step still runs (each rank of a distributed run must take
            # the same number of steps), on one pad token with nothing supervised: it adds nothing to the loss or
            # the gradient.
            instances = [{"input_ids": torch.tensor([self.pad_token_id]), "labels": torch.tensor([IGNORE_INDEX])}]
        batch = self._pad(instances)
        if skipped:
            batch["skipped_records"] = skipped  # popped by LLaVATrainer.training_step, which counts them
            batch["placeholder_batch"] = placeholder
        return batch

    def _pad(self, instances: Sequence[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(x["input_ids"]) for x in instances]
        width = max(lengths)
        input_ids = torch.full((len(instances), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(instances), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(instances), width), dtype=torch.long)
        for row, (x, n) in enumerate(zip(instances, lengths)):
            input_ids[row, :n] = x["input_ids"]
            labels[row, :n] = x["labels"]
            attention_mask[row, :n] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [im for x in instances for im in x.get("images", [])]
        if images:
            same = all(im.shape == images[0].shape for im in images)
            batch["images"] = torch.stack(images) if same else images
            batch["image_sizes"] = [size for x in instances for size in x["image_sizes"]]
        return batch
