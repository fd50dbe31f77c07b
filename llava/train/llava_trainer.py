"""LLaVATrainer: modality-grouped sampling, per-module learning rates, complete checkpoints at every save.

What a checkpoint holds follows from what trains (`checkpoint_format`):
  projector  stage 1 (only the projector learns): `mm_projector.bin` + `config.json`, loaded on `--model-base`
  lora       LoRA / QLoRA: adapter files + `non_lora_trainables.bin` (projector, ...) + `config.json`
  full       anything else: a complete model directory (`save_pretrained`)
Intermediate `checkpoint-N` directories use the same format (plus optimizer/scheduler/RNG state for resuming), so
each one loads with `llava.model.builder.load_pretrained_model` as it is. Under ZeRO-3 the trained weights are
gathered from all ranks before they are written.

A checkpoint is written into `<output_dir>/.saving-checkpoint-N/checkpoint-N` and moved to `<output_dir>/checkpoint-N`
only once every rank has finished writing, so an interrupted save never looks like a checkpoint; `resumable_checkpoint`
checks the files of the newest ones before a run resumes from them. A save that runs out of disk space stops with a
`CheckpointWriteError` naming the file, the directory, the free space and the intact previous checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.checkpoint_compat import finish_checkpoint_dir, write_legacy_config_keys
from llava.train.preprocess import Tokenized, render_supervision

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("projector", "lora", "full")
PROJECTOR_FILE = "mm_projector.bin"
NON_LORA_FILE = "non_lora_trainables.bin"
# Length grouping sorts pools of this many runs (batch x ranks x accumulation) by length before cutting batches: as in
# transformers' length-grouped sampler, large enough that padding stays a few percent of the tokens.
LENGTH_GROUP_POOL = 50
# Up to this many records the grouped sampler measures every sample's length with the tokenizer (seconds); larger
# datasets use the word-count estimates, as the original does.
EXACT_LENGTHS_MAX = 50_000
# Fully-masked samples are judged only after this many samples (a few early ones say little).
MASKED_CHECK_MIN_SAMPLES = 200


# ------------------------------------------------------------------------------------------------------ sampling


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


# ------------------------------------------------------------------------------------------------------- helpers


def param_numel(p: torch.nn.Parameter) -> int:
    """Parameter count, also for ZeRO-3-partitioned and 4-bit packed parameters."""
    n = getattr(p, "ds_numel", None) or p.numel()
    return n * 2 if type(p).__name__ == "Params4bit" else n


def module_group(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if "vision_tower" in name:
        return "vision_tower"
    if "mm_projector" in name or "image_newline" in name:
        return "mm_projector"
    return "llm"


def trainable_summary(model: torch.nn.Module) -> str:
    """A table of trainable / total parameters per part (vision tower, projector, LLM, LoRA)."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        row = rows.setdefault(module_group(name), [0, 0])
        row[1] += param_numel(p)
        row[0] += param_numel(p) if p.requires_grad else 0
    total = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())]
    lines = [f"{'part':<14}{'trainable':>16}{'total':>16}{'trained':>10}"]
    for part in ("vision_tower", "mm_projector", "llm", "lora"):
        if part in rows:
            t, n = rows[part]
            lines.append(f"{part:<14}{t:>16,}{n:>16,}{(100 * t / max(n, 1)):>9.1f}%")
    lines.append(f"{'all':<14}{total[0]:>16,}{total[1]:>16,}{(100 * total[0] / max(total[1], 1)):>9.1f}%")
    return "\n".join(lines)


def gathered(params: Sequence[torch.nn.Parameter]):
    """Context in which ZeRO-3-partitioned `params` hold their full values (a no-op otherwise)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def unwrap_llava(model: torch.nn.Module) -> torch.nn.Module:
    """The LLaVA model under a PeftModel / DDP / DeepSpeed wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint_config(model: torch.nn.Module, output_dir: str) -> None:
    """config.json describing the LLaVA model (never the quantization used while training), with the legacy keys
    the original LLaVA's transformers 4.37 reads (`rope_theta`, ...)."""
    base = unwrap_llava(model)
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.use_cache = True  # off while training; inference wants it
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tower = base.get_vision_tower() if hasattr(base, "get_vision_tower") else None
    if tower is not None and any(p.requires_grad for n, p in tower.named_parameters() if "lora_" not in n):
        # The stored tower weights are the run's own: loaders must use them, not reload `mm_vision_tower`.
        config.unfreeze_mm_vision_tower = True
    config.save_pretrained(output_dir)
    write_legacy_config_keys(output_dir)


# ---------------------------------------------------------------------------------------------- checkpoint safety

STAGING_PREFIX = ".saving-"  # checkpoint-N is written under <output_dir>/.saving-checkpoint-N/ and then moved up
STALE_PREFIX = ".stale-"  # an older checkpoint-N being replaced by a new save of the same step
WEIGHT_FILES = {
    "projector": ((PROJECTOR_FILE,),),
    "lora": (("adapter_config.json",), ("adapter_model.safetensors", "adapter_model.bin"), (NON_LORA_FILE,)),
    "full": (
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
}
# What PyTorch's zip writer says when a write comes up short (it does not report errno).
TORCH_SHORT_WRITE = re.compile(r"unexpected pos|iostream error|PytorchStreamWriter failed|file write failed")
# What libraries that do not raise OSError (the Rust `tokenizers`) say for ENOSPC / EDQUOT.
NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b")
# A failed write with less free space than this left on the filesystem is taken for a full disk.
NEARLY_FULL_BYTES = 1 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the disk is full); the message says where and what is left intact."""


def _torch_file_problem(path: str) -> str | None:
    """What is wrong with a `torch.save` file (zip format), or None; a cut-off zip lacks its central directory."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # the legacy (pickle) format: no cheap completeness check
    try:
        with zipfile.ZipFile(path) as archive:
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                return f"is cut short ({size} bytes)"
    except zipfile.BadZipFile as err:
        return f"is cut short ({size} bytes: {err})"
    return None


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes, no header)"
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return f"is cut short ({size} bytes, header of {n})"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"has an unreadable header ({type(err).__name__})"
    if 8 + n + end > size:
        return f"is cut short ({size} of {8 + n + end} bytes)"
    return None


def _json_problem(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        return "is empty" if os.path.getsize(path) == 0 else f"is not valid JSON ({err})"
    return None


FILE_CHECKS = {".bin": _torch_file_problem, ".pt": _torch_file_problem, ".pth": _torch_file_problem}
FILE_CHECKS.update({".safetensors": _safetensors_problem, ".json": _json_problem})


def checkpoint_problems(path: str, checkpoint_format: str | None = None, optimizer: bool = True) -> list[str]:
    """Why `checkpoint-N` at `path` cannot be resumed from (empty when it can): trainer_state.json unreadable, the
    weight files of `checkpoint_format` (any format when None) or the optimizer / DeepSpeed state missing or cut
    short. Every `.json`, `.bin`, `.pt`, `.pth` and `.safetensors` file in it (and in DeepSpeed's `global_stepN`) is
    checked for completeness."""
    problems = []
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        problems.append("`trainer_state.json` is missing")
    else:
        bad = _json_problem(state_file)
        if bad is None:
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
            if not isinstance(state, dict) or "global_step" not in state:
                bad = "has no `global_step`"
        if bad:
            problems.append(f"`trainer_state.json` {bad}")
    formats = [checkpoint_format] if checkpoint_format else list(WEIGHT_FILES)
    missing_by_format = {
        fmt: [
            " or ".join(f"`{n}`" for n in names)
            for names in WEIGHT_FILES[fmt]
            if not any(os.path.isfile(os.path.join(path, n)) for n in names)
        ]
        for fmt in formats
    }
    if all(missing_by_format.values()):
        problems.append(f"weights missing: {', '.join(missing_by_format[formats[0]])}")
    files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):  # DeepSpeed: latest names the global_stepN folder holding model and optimizer state
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        tag_dir = os.path.join(path, tag)
        names = sorted(os.listdir(tag_dir)) if tag and os.path.isdir(tag_dir) else []
        for kind in ("model_states.pt", "optim_states.pt"):
            if optimizer and not any(n.endswith(kind) for n in names):
                problems.append(f"DeepSpeed state `{tag or '(latest is empty)'}/*{kind}` is missing")
        files += [os.path.join(tag_dir, n) for n in names]
    elif optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not os.path.isfile(os.path.join(path, name)):
                problems.append(f"`{name}` is missing")
    for file in files:
        check = FILE_CHECKS.get(os.path.splitext(file)[1])
        if check is not None and os.path.isfile(file) and os.path.basename(file) != "trainer_state.json":
            bad = check(file)
            if bad:
                problems.append(f"`{os.path.relpath(file, path)}` {bad}")
    return problems


def numbered_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` directories in `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def resumable_checkpoint(output_dir: str, checkpoint_format: str | None = None, optimizer: bool = True) -> str | None:
    """The newest `checkpoint-N` in `output_dir` whose files are complete; each newer broken one is named in a
    warning with what is wrong with it (it is left in place for the user to look at or delete)."""
    for path in numbered_checkpoints(output_dir):
        problems = checkpoint_problems(path, checkpoint_format, optimizer)
        if not problems:
            return path
        logger.warning(
            "Not resuming from `%s`: it is incomplete (a save interrupted or a full disk?): %s. Trying an older one.",
            path,
            "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else ""),
        )
    return None


def remove_unfinished_saves(output_dir: str) -> None:
    """Delete the staging folders an interrupted save left in `output_dir` (never a `checkpoint-N`)."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        if name.startswith((STAGING_PREFIX + PREFIX_CHECKPOINT_DIR, STALE_PREFIX + PREFIX_CHECKPOINT_DIR)):
            logger.warning("Removing `%s`, left by a save that did not finish.", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _newest_file(directory: str) -> str | None:
    newest = None
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            stamp = os.stat(path).st_mtime_ns
            if newest is None or stamp >= newest[0]:
                newest = (stamp, path)
    return newest[1] if newest else None


def _existing_parent(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def disk_full_reason(err: BaseException, directory: str) -> str | None:
    """A description of `err` when it means the disk under `directory` is full, else None. PyTorch's zip writer
    reports a short write as `unexpected pos ...` / `iostream error` without errno, so free space decides too."""
    free = shutil.disk_usage(_existing_parent(directory)).free
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(err.errno)
    text = str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__
    if NO_SPACE_TEXT.search(str(err)):
        return text
    if isinstance(err, (OSError, RuntimeError)) and (TORCH_SHORT_WRITE.search(str(err)) or free < NEARLY_FULL_BYTES):
        return f"a short write: {text}"
    return None


@contextlib.contextmanager
def disk_full_errors(directory: str, what: str, previous: str | None, cleanup: str | None = None):
    """Turn a write failure under `directory` caused by a full disk into a `CheckpointWriteError` that names the
    file, the directory, the free space and `previous` (the checkpoint still intact); `cleanup` (a staging folder)
    is removed first, which gives the space of the unfinished save back."""
    try:
        yield
    except Exception as err:  # writers raise OSError, RuntimeError (torch) or plain Exception (tokenizers)
        reason = disk_full_reason(err, directory)
        if reason is None or isinstance(err, CheckpointWriteError):
            raise
        file = getattr(err, "filename", None) or _newest_file(directory) or "(unknown)"
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        usage = shutil.disk_usage(_existing_parent(directory))
        head = (
            "No space left on device"
            if usage.free < NEARLY_FULL_BYTES or "short write" not in reason
            else ("A write failed (a full disk or quota?)")
        )
        intact = (
            f"The previous checkpoint `{previous}` is intact; free some space (or point --output_dir at a larger "
            "disk) and run the same command again to resume from it."
            if previous
            else "There is no earlier checkpoint to resume from; free some space and start again."
        )
        raise CheckpointWriteError(
            f"{head} while saving {what}: writing `{file}` in `{directory}` failed ({reason}); "
            f"{_human_bytes(usage.free)} free of {_human_bytes(usage.total)} on that filesystem"
            + (" (the unfinished save was removed)" if cleanup else "")
            + f". {intact}"
        ) from err


class SkippedRecords(TrainerCallback):
    """The dataset records left out of training (`--skip_bad_records True`): those found bad before step 1 and those
    whose images failed to load during training. LLaVATrainer writes `state()` into trainer_state.json
    (`stateful_callbacks.SkippedRecords`) with each checkpoint; a resumed run reads it back, so the count covers the
    whole run. (Not an `ExportableState`: transformers would rebuild it from the saved attributes and replace it.)"""

    def __init__(self, before_training: Sequence[int] = ()):
        self.before_training = sorted(set(before_training))
        self.during_training: set[int] = set()

    @property
    def count(self) -> int:
        return len(set(self.before_training) | self.during_training)

    def state(self) -> dict:
        return {
            "args": {},
            "attributes": {
                "count": self.count,
                "before_training": list(self.before_training),
                "during_training": sorted(self.during_training),
            },
        }

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):  # resumed: keep the records the first part of the run skipped
            self.during_training |= set(saved.get("attributes", {}).get("during_training", []))

    def gather(self) -> None:
        """Union of every rank's records (each rank loads different samples); collective: call on all ranks."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            lists: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(lists, sorted(self.during_training))
            self.during_training = {i for part in lists for i in part}


# -------------------------------------------------------------------------------------------------------- trainer


class LLaVATrainer(Trainer):
    """HF Trainer with LLaVA's sampling, optimizer groups, checkpoint formats and supervision checks."""

    def __init__(self, *args, checkpoint_format: str = "full", max_masked_fraction: float = 0.01, **kwargs):
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"Unknown checkpoint format `{checkpoint_format}`; valid: {', '.join(CHECKPOINT_FORMATS)}."
            )
        super().__init__(*args, **kwargs)
        self.checkpoint_format = checkpoint_format
        self.max_masked_fraction = max_masked_fraction
        self._samples_seen = 0
        self._masked_seen = 0
        self._masked_example: Tokenized | None = None
        self._placeholder_batch = False
        self._staging_dir: str | None = None
        self.skipped_records = SkippedRecords(getattr(self.train_dataset, "skipped_before_training", ()))
        self.add_callback(self.skipped_records)

    # -- sampling --------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        by_modality = getattr(self.args, "group_by_modality_length", False)
        by_length = self.args.train_sampling_strategy == "group_by_length"
        if (by_modality or by_length) and hasattr(dataset, "modality_lengths"):
            if len(dataset) <= EXACT_LENGTHS_MAX and hasattr(dataset, "token_lengths"):
                lengths = dataset.token_lengths()  # exact: batches pad less than with word-count estimates
                lengths = lengths if by_modality else [abs(n) for n in lengths]
            else:
                lengths = dataset.modality_lengths if by_modality else dataset.lengths
            return LengthGroupedSampler(
                batch_size=self.args.train_batch_size,
                groups=self.args.world_size * self.args.gradient_accumulation_steps,
                lengths=lengths,
                group_by_modality=by_modality,
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    # -- optimizer -------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """AdamW groups: {projector, vision tower, rest} x {decay, no decay}, with `--mm_projector_lr` /
        `--mm_vision_tower_lr` for the first two when given."""
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        special = {"mm_projector": self.args.mm_projector_lr, "vision_tower": self.args.mm_vision_tower_lr}
        if all(lr is None for lr in special.values()):
            return super().create_optimizer(model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[str, bool], list] = {}
        for name, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            part = next((k for k, lr in special.items() if lr is not None and k in name), "rest")
            groups.setdefault((part, name in decay), []).append(p)
        param_groups = []
        for (part, has_decay), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
            if part != "rest":
                group["lr"] = special[part]
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # -- loss ------------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        # The collator reports records it dropped (`--skip_bad_records`); a batch left with none is a placeholder.
        inputs = dict(inputs)
        self.skipped_records.during_training.update(inputs.pop("skipped_records", ()))
        self._placeholder_batch = bool(inputs.pop("placeholder_batch", False))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._needs_dummy_image(inputs):
            inputs = self._with_dummy_image(inputs)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.clamp(min=1)  # nothing supervised: loss 0, not 0/0
        labels = inputs.get("labels")
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if labels is not None and model.training and not self._placeholder_batch:
            self._track_masked(inputs, labels)
        return out

    def _needs_dummy_image(self, inputs) -> bool:
        """A text-only batch in a distributed run must still use the vision path (see `_with_dummy_image`)."""
        if self.args.world_size <= 1 or inputs.get("images") is not None or not self.model.training:
            return False
        base = unwrap_llava(self.model)
        return hasattr(base, "get_vision_tower") and base.get_vision_tower() is not None

    def _with_dummy_image(self, inputs: dict) -> dict:
        """`inputs` plus a black image spliced in after the last token of the shortest row.

        Under DDP every trainable parameter needs a gradient on every rank, and under ZeRO-3 every rank must gather
        the same parameters in the same order, so a rank whose batch has no image still runs the tower and the
        projector, at the very place a batch with images runs them. The image sits after the row's last token with
        ignored labels: causal attention keeps it out of every supervised prediction, so the loss is unchanged and
        the projector's gradient from it is exactly zero.
        """
        tower = unwrap_llava(self.model).get_vision_tower()
        ids, labels = inputs["input_ids"], inputs["labels"]
        if inputs.get("attention_mask") is None and "position_ids" in inputs:
            # Packed rows (--packing) have no mask: the image becomes a sample of its own (position 0) at the end of
            # row 0, and every other row gets a one-token padding sample, so no other position attends to it.
            extra = {"position_ids": torch.cat([inputs["position_ids"], torch.zeros_like(ids[:, :1])], dim=1)}
            mask = torch.ones_like(ids)
        else:
            extra, mask = {}, inputs["attention_mask"]
        row = int(mask.sum(dim=1).argmin())
        ids_col = torch.full_like(ids[:, :1], self.processing_class.pad_token_id)
        ids_col[row] = IMAGE_TOKEN_INDEX
        mask_col = torch.zeros_like(mask[:, :1])
        mask_col[row] = 1
        side = tower.config.image_size
        return {
            **inputs,
            "input_ids": torch.cat([ids, ids_col], dim=1),
            "attention_mask": torch.cat([mask, mask_col], dim=1) if not extra else None,
            "labels": torch.cat([labels, torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1),
            "images": torch.zeros(1, 3, side, side, device=ids.device),
            "image_sizes": [[side, side]],
            **extra,
        }

    def _track_masked(self, inputs, labels: torch.Tensor) -> None:
        masked = ((labels != IGNORE_INDEX).sum(dim=1) == 0).nonzero().flatten().tolist()
        self._samples_seen += labels.shape[0]
        self._masked_seen += len(masked)
        if masked and self._masked_example is None:
            row = masked[0]
            mask = inputs.get("attention_mask")
            keep = mask[row].bool() if mask is not None else torch.ones_like(labels[row], dtype=torch.bool)
            self._masked_example = Tokenized(inputs["input_ids"][row][keep].tolist(), labels[row][keep].tolist())
        too_many = self._masked_seen > self.max_masked_fraction * self._samples_seen
        if self._samples_seen >= MASKED_CHECK_MIN_SAMPLES and too_many:
            example = render_supervision(self.processing_class, self._masked_example)
            raise RuntimeError(
                f"{self._masked_seen} of {self._samples_seen} training samples so far have no supervised token "
                f"(more than --max_masked_fraction {self.max_masked_fraction}). Usually the template (--version) "
                f"does not fit the data or --model_max_length cuts the replies off. One of them:\n{example}"
            )

    # -- saving ----------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.checkpoint_format == "full":
            super().save_model(output_dir, _internal_call=_internal_call)
            if self.args.should_save:
                save_checkpoint_config(self.model, output_dir)
                # A trained tower's keys move to the original's layout in the final output only: `checkpoint-N`
                # dirs are resumed with a plain load_state_dict (both layouts load with load_pretrained_model).
                finish_checkpoint_dir(output_dir, self.processing_class, tower_keys=not _internal_call)
            return
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with gathered([p for _, p in named]):
            state = {n: p.detach().to("cpu", copy=True) for n, p in named}
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.checkpoint_format == "projector":
            torch.save(state, os.path.join(output_dir, PROJECTOR_FILE))
        else:
            lora = {n: t for n, t in state.items() if "lora_" in n}
            self.model.save_pretrained(output_dir, state_dict=lora, save_embedding_layers=False)
            torch.save({n: t for n, t in state.items() if "lora_" not in n}, os.path.join(output_dir, NON_LORA_FILE))
        save_checkpoint_config(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        finish_checkpoint_dir(output_dir, self.processing_class)  # tokenizer.model, a peft-0.10 adapter config
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        logger.info("Saved a `%s` checkpoint to %s", self.checkpoint_format, output_dir)

    def _get_output_dir(self, trial) -> str:
        # While `_save_checkpoint` runs, transformers writes `checkpoint-N` under the staging folder.
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' save of `checkpoint-N` (weights, optimizer, RNG, DeepSpeed's `global_stepN`, trainer state)
        into `<output_dir>/.saving-checkpoint-N/`, then, once every rank is done, moved to `<output_dir>/checkpoint-N`
        by the saving rank; a full disk stops the run with a `CheckpointWriteError`."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        previous = resumable_checkpoint(run_dir, self.checkpoint_format) if self.args.should_save else None
        self.skipped_records.gather()
        self.state.stateful_callbacks[type(self.skipped_records).__name__] = self.skipped_records.state()
        self._staging_dir = staging
        try:
            cleanup = staging if self.args.should_save else None
            with disk_full_errors(staging, f"`{name}`", previous, cleanup):
                super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its files (DeepSpeed: its own shards)
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            if os.path.exists(final):  # a resumed run saving a step again (e.g. over a broken checkpoint-N)
                stale = os.path.join(run_dir, STALE_PREFIX + name)
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(os.path.join(staging, name), final)
            os.rmdir(staging)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if self.checkpoint_format == "projector":
            state = torch.load(os.path.join(resume_from_checkpoint, PROJECTOR_FILE), map_location="cpu")
            _load_partial(model, state, os.path.join(resume_from_checkpoint, PROJECTOR_FILE))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.checkpoint_format == "lora":
            path = os.path.join(resume_from_checkpoint, NON_LORA_FILE)
            _load_partial(model, torch.load(path, map_location="cpu"), path)

    # -- start -----------------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        if self.args.should_log:
            logger.info(
                "Trainable parameters (checkpoint format `%s`):\n%s",
                self.checkpoint_format,
                trainable_summary(self.model),
            )
            if hasattr(self.train_dataset, "describe") and len(self.train_dataset):
                example = self.train_dataset.describe(0, self.processing_class)
                logger.info("Sample 0 as the model sees it, supervised spans in [[...]]:\n%s", example)
        result = super().train(*args, **kwargs)
        skipped = self.skipped_records
        skipped.gather()
        self.state.stateful_callbacks[type(skipped).__name__] = skipped.state()  # for the final trainer_state.json
        if skipped.count and self.args.should_log:
            logger.warning(
                "Skipped %d bad record(s) of the dataset in this run (%d found before step 1, %d while training: "
                "records %s); the list is in trainer_state.json under `stateful_callbacks.SkippedRecords`.",
                skipped.count,
                len(skipped.before_training),
                len(skipped.during_training),
                sorted(set(skipped.before_training) | skipped.during_training)[:20],
            )
        return result


def _load_partial(model: torch.nn.Module, state: dict, source: str) -> None:
    own = dict(model.named_parameters())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"`{source}` holds weights this model does not have: {unknown[:5]}.")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
