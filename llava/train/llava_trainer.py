"""LLaVATrainer: modality-grouped sampling, per-module learning rates, complete checkpoints at every save.

What a checkpoint holds follows from what trains (formats: `llava.model.checkpoint_format`):
  projector  stage 1 (only the projector learns): `mm_projector.bin` + `config.json`, loaded on `--model-base`
  lora       LoRA / QLoRA: adapter files + `non_lora_trainables.bin` (projector, ...) + `config.json`
  full       anything else: a complete model directory (`save_pretrained`)
Intermediate `checkpoint-N` directories use the same format (plus optimizer/scheduler/RNG state for resuming), so
each one loads with `llava.model.builder.load_pretrained_model` as it is. Under ZeRO-3 the trained weights are
gathered from all ranks before they are written. Saves are staged and checked (`llava.train.checkpoint_io`);
batches are grouped by `llava.train.sampler`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.checkpoint_format import (  # noqa: F401  (re-exported: earlier home of these names)
    NON_LORA_FILE,
    PROJECTOR_FILE,
    TRAINER_KINDS,
    TRAINING_ARGS_FILE,
    finish_full_checkpoint,
    load_trained_state,
    read_trained_state,
    save_checkpoint_config,
    unwrap_llava,
    write_trained_state,
)
from llava.train.checkpoint_io import (  # noqa: F401  (re-exported: earlier home of these names)
    CheckpointWriteError,
    checkpoint_problems,
    complete_checkpoint,
    disk_full_errors,
    disk_full_reason,
    numbered_checkpoints,
    publish_checkpoint,
    remove_unfinished_saves,
    resumable_checkpoint,
    staging_dir,
)
from llava.train.preprocess import Tokenized, render_supervision
from llava.train.sampler import (  # noqa: F401  (re-exported: earlier home of these names)
    EXACT_LENGTHS_MAX,
    LENGTH_GROUP_POOL,
    LengthGroupedSampler,
    get_length_grouped_indices,
    get_modality_length_grouped_indices,
    length_grouped_indices,
    modality_grouped_indices,
    split_to_even_chunks,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = TRAINER_KINDS
# Fully-masked samples are judged only after this many samples (a few early ones say little).
MASKED_CHECK_MIN_SAMPLES = 200


# ------------------------------------------------------------------------------------------------------- helpers


def param_numel(p: torch.nn.Parameter) -> int:
    """Parameter count, also for ZeRO-3-partitioned and 4-bit packed parameters."""
    n = getattr(p, "ds_numel", None) or p.numel()
    return n * 2 if type(p).__name__ == "Params4bit" else n


def trainable_summary(model: torch.nn.Module) -> str:
    """A table of trainable / total parameters per part (`llava.model.assemble.PARTS`: tower, projector, LLM, ...)."""
    from llava.model.assemble import PARTS, parameter_parts

    rows: dict[str, list[int]] = {}
    parts = parameter_parts(model)
    for name, p in model.named_parameters():
        row = rows.setdefault(parts[name], [0, 0])
        row[1] += param_numel(p)
        row[0] += param_numel(p) if p.requires_grad else 0
    total = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())]
    lines = [f"{'part':<14}{'trainable':>16}{'total':>16}{'trained':>10}"]
    for part in PARTS:
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
        from llava.model.assemble import parameter_parts

        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        special = {"mm_projector": self.args.mm_projector_lr, "vision_tower": self.args.mm_vision_tower_lr}
        if all(lr is None for lr in special.values()):
            return super().create_optimizer(model)
        decay = set(self.get_decay_parameter_names(opt_model))
        parts = parameter_parts(opt_model, lora=False)  # adapters on the tower learn at the tower's rate
        groups: dict[tuple[str, bool], list] = {}
        for name, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            part = parts[name] if special.get(parts[name]) is not None else "rest"
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
                finish_full_checkpoint(self.model, output_dir, self.processing_class, final=not _internal_call)
            return
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with gathered([p for _, p in named]):
            state = {n: p.detach().to("cpu", copy=True) for n, p in named}
        if not self.args.should_save:
            return
        write_trained_state(self.model, state, output_dir, self.checkpoint_format, self.processing_class)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
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
        staging = staging_dir(run_dir, name)
        # the checkpoint a disk-full message can point to; checked quietly (resume already warned about broken ones)
        previous = complete_checkpoint(run_dir, self.checkpoint_format) if self.args.should_save else None
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
        if self.args.should_save:
            publish_checkpoint(run_dir, name)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if self.checkpoint_format != "projector":
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.checkpoint_format != "full":  # the trained weights beside the adapter / the base model
            state, source = read_trained_state(resume_from_checkpoint, self.checkpoint_format)
            load_trained_state(model, state, source, require_projector=False)

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
