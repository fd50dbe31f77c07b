"""Train a LLaVA model: stage 1 (projector), stage 2 (full / LoRA / QLoRA), task fine-tuning. `train()` is the entry.

The seeds' commands run unchanged, e.g. stage 1 on 8 GPUs:
    deepspeed llava/train/train_mem.py --deepspeed ./scripts/zero2.json --model_name_or_path lmsys/vicuna-13b-v1.5 \
        --version plain --data_path blip_laion_cc_sbu_558k.json --image_folder images \
        --vision_tower openai/clip-vit-large-patch14-336 --mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter True \
        --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False --bf16 True \
        --output_dir ./checkpoints/llava-v1.5-13b-pretrain ... (see scripts/v1_5/pretrain.sh)
A tiny CPU run that finishes in seconds (tiny backbones: `llava.demo.backbones`; data: docs/CustomData.md):
    python -m llava.train.train --model_name_or_path TINY_LLAMA --vision_tower TINY_CLIP --version plain \
        --data_path data.json --image_folder images --tune_mm_mlp_adapter True --output_dir out --max_steps 5 \
        --per_device_train_batch_size 2 --report_to none
A run whose output_dir already holds checkpoints resumes from the newest complete one (`--overwrite_output_dir True`
starts afresh). Started by a launcher (torchrun, deepspeed), each rank stops when its launcher dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
import transformers

from llava.conversation import conv_templates
from llava.runtime import configure_threads
from llava.train.args import DataArguments, ModelArguments, TrainingArguments, parse_args  # noqa: F401  (public here)
from llava.train.checkpoint_io import final_save_errors, named_checkpoint
from llava.train.data import (
    DataCollatorForSupervisedDataset,
    DatasetError,
    ImageTokenCounter,
    LazySupervisedDataset,
    load_records,
    scan_supervision,
)
from llava.train.launcher import (  # noqa: F401  (re-exported: their home before launcher)
    LAUNCHER_GRACE_SECONDS,
    LAUNCHER_POLL_SECONDS,
    launched_by_launcher,
    stop_with_launcher,
)
from llava.train.llava_trainer import (
    LLaVATrainer,
    remove_unfinished_saves,
    resumable_checkpoint,
    unwrap_llava,
)
from llava.train.model_setup import (  # noqa: F401  (re-exported: their home before model_setup)
    LEGACY_LAYER_CLASSES,
    FsdpReport,
    Stage,
    apply_lora,
    attach_vision,
    check_fsdp,
    load_model,
    load_tokenizer,
    lora_target_modules,
    run_record,
    set_trainable,
    train_only_rows,
    trained_template_name,
    training_stage,
)
from llava.train.preprocess import Preprocessor, check_version

logger = logging.getLogger("llava.train")

# ------------------------------------------------------------------------------------------------------- resuming


def last_checkpoint(output_dir: str, checkpoint_format: str | None = None, optimizer: bool = True) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was written completely: trainer_state.json readable, the weight
    files of `checkpoint_format` and the optimizer (or DeepSpeed) state present and not cut short. Newer broken ones
    are skipped with a warning that says what is wrong with each."""
    return resumable_checkpoint(output_dir, checkpoint_format, optimizer)


def _resume_target(training_args: TrainingArguments, checkpoint_format: str | None = None) -> str | None:
    if training_args.should_save:
        remove_unfinished_saves(training_args.output_dir)  # an interrupted save's staging folders
    given = (training_args.resume_from_checkpoint or "").strip()
    if given.lower() in ("false", "no", "none"):
        return None
    if given and given.lower() not in ("true", "yes"):  # a checkpoint named: checked, never swapped for another
        return named_checkpoint(given, checkpoint_format, not training_args.save_only_model)
    if training_args.overwrite_output_dir:
        return None
    return last_checkpoint(training_args.output_dir, checkpoint_format, not training_args.save_only_model)


# ----------------------------------------------------------------------------------------------------------- train


def _setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    llava_logger = logging.getLogger("llava")
    llava_logger.setLevel(level)
    # Our own handler only when nothing configured logging (a script run); under an application or pytest that set up
    # the root logger, records propagate to it as usual.
    if not llava_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        llava_logger.addHandler(handler)
        llava_logger.propagate = False


def _write_run_config(model_args, data_args, training_args) -> None:
    if not training_args.should_save:
        return
    os.makedirs(training_args.output_dir, exist_ok=True)
    resolved = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "training": json.loads(training_args.to_json_string()),
    }
    with open(os.path.join(training_args.output_dir, "llava_run_config.json"), "w") as f:
        json.dump(resolved, f, indent=2, default=str)


def build_dataset(tokenizer, model, model_args, data_args, training_args) -> LazySupervisedDataset:
    base = unwrap_llava(model)
    tower = base.get_vision_tower() if hasattr(base, "get_vision_tower") else None
    skipped = []
    records = load_records(
        data_args.data_path, data_args.image_folder, data_args.validate_images, data_args.skip_bad_records, skipped
    )
    dataset = LazySupervisedDataset(
        records,
        Preprocessor(tokenizer, model_args.version, model_args.mm_use_im_start_end),
        max_length=training_args.model_max_length,
        image_processor=tower.image_processor if tower is not None else None,
        image_tokens=ImageTokenCounter(base) if tower is not None else None,
        image_config={
            "image_aspect_ratio": data_args.image_aspect_ratio,
            "image_grid_pinpoints": data_args.image_grid_pinpoints,
        },
        source=data_args.data_path,
        skip_bad=data_args.skip_bad_records,
    )
    dataset.skipped_before_training = [err.index for err in skipped]
    checked, masked = scan_supervision(dataset, seed=training_args.seed)
    if len(masked) > data_args.max_masked_fraction * checked:
        raise DatasetError(
            f"{len(masked)} of {checked} samples checked in `{data_args.data_path}` have no supervised token (more "
            f"than --max_masked_fraction {data_args.max_masked_fraction}); e.g. record {records[masked[0]].index}, "
            "as the model would see it (supervised spans would be in [[...]]):\n"
            f"{dataset.describe(masked[0], tokenizer)}\nCheck that --version fits the data and that "
            "--model_max_length leaves room for the replies after the image features."
        )
    return dataset


def train(
    argv: list[str] | None = None,
    attn_implementation: str | None = None,
    callbacks=None,
    attn_reason: str | None = None,
):
    """Parse the arguments (`argv`, default sys.argv), build model and data, train, and save the result.

    `attn_implementation` defaults to PyTorch SDPA; `attn_reason` says in the log why it was chosen.
    """
    model_args, data_args, training_args = parse_args(argv)
    configure_threads()  # intra-op threads by llava.runtime's policy (LLAVA_THREADS / OMP_NUM_THREADS override)
    _setup_logging(training_args)
    stop_with_launcher()
    for note in training_args.hardware_notes:
        logger.info(note)
    attn_implementation = attn_implementation or "sdpa"
    logger.info("Attention implementation: %s%s", attn_implementation, f" ({attn_reason})" if attn_reason else "")
    transformers.set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args, training_args)
    check_version(model_args.version, tokenizer)
    model = load_model(model_args, training_args, attn_implementation)
    if attach_vision(model, model_args, data_args, training_args, tokenizer) is not None:
        model.initialize_vision_tokenizer(model_args, tokenizer)
    else:  # text only: what `build_llava` records for a multimodal run
        model.config.update(run_record(model_args, training_args))
        model.config.tokenizer_padding_side = tokenizer.padding_side
        model.config.tokenizer_model_max_length = tokenizer.model_max_length

    if training_args.lora_enable:
        model = apply_lora(model, training_args)
    checkpoint_format = set_trainable(model, model_args, training_args, tokenizer).checkpoint_format
    if training_args.fsdp:
        check_fsdp(model, training_args, checkpoint_format)

    dataset = build_dataset(tokenizer, model, model_args, data_args, training_args)
    collator = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)
    if training_args.packing:
        from llava.train.packing import PackedCollator, PackedDataset

        dataset = PackedDataset(dataset, training_args.model_max_length, training_args.group_by_modality_length)
        collator = PackedCollator(tokenizer.pad_token_id)
        logger.info(
            "Packing: %d samples in %d rows of up to %d positions", len(dataset.dataset), len(dataset), dataset.capacity
        )
    _write_run_config(model_args, data_args, training_args)
    if training_args.fsdp:
        callbacks = [*(callbacks or []), FsdpReport()]
    trainer = LLaVATrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        checkpoint_format=checkpoint_format,
        max_masked_fraction=data_args.max_masked_fraction,
    )
    resume = _resume_target(training_args, checkpoint_format)
    if resume:
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    unwrap_llava(model).config.use_cache = True
    with final_save_errors(training_args.output_dir, checkpoint_format, not training_args.save_only_model):
        trainer.save_state()
        trainer.save_model(training_args.output_dir)
    return trainer


def close_distributed() -> None:
    """End the process group before exit: a gloo group left open can abort the process while it shuts down."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    train()
    close_distributed()


# ---------------------------------------------------------------------------------------------- original's helpers
# The helpers the original `llava/train/train.py` offered to code that imports them (forks, notebooks), with its call
# signatures, as thin layers over our preprocessing, dataset and trainer. Like the original, `preprocess` and
# `make_supervised_data_module` take the template from `llava.conversation.default_conversation` (set it to a
# `conv_templates` entry first, as the original's `train()` did) unless `version=` names one.


def rank0_print(*args) -> None:
    """`print` on the main process only (rank 0, or no process group)."""
    if (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0
    ):
        print(*args)


def _default_template_name() -> str:
    """The `conv_templates` name of `llava.conversation.default_conversation` (the original's global template)."""
    import llava.conversation as conversation_lib

    current = conversation_lib.default_conversation
    for match in (lambda conv: conv is current, lambda conv: conv == current):
        for name, conv in conv_templates.items():
            if match(conv):
                return name
    raise ValueError(
        "`llava.conversation.default_conversation` is not one of `conv_templates` (it was changed after copying?); "
        f"pass `version=` with a template name: {', '.join(sorted(conv_templates))}."
    )


_WRAPPED_IMAGE_MARKERS = {
    "<im_start><image><im_end>": "mm_use_im_start_end",  # DEFAULT_IM_START_TOKEN + marker + DEFAULT_IM_END_TOKEN
    "<Image><image></Image>": "mmtag",  # what `*_mmtag` templates put around the marker
}


def _unwrap_markers(text: str) -> tuple[str, bool]:
    """`text` with marker wrappers that `preprocess_multimodal` added removed (our preprocessor adds them again)."""
    start_end = False
    for wrapped, kind in _WRAPPED_IMAGE_MARKERS.items():
        if wrapped in text:
            text = text.replace(wrapped, "<image>")
            start_end = start_end or kind == "mm_use_im_start_end"
    return text, start_end


def preprocess_multimodal(sources: list[list[dict]], data_args) -> list[list[dict]]:
    """The original's image-marker placement, in place on LLaVA-format `sources` (lists of `{from, value}` turns).

    When `data_args.is_multimodal`, a turn holding `<image>` gets one marker at its start (`"<image>\\n" + text`,
    the others removed), written as `llava.prompting.image_marker_text` says for the default template's `mmtag`
    field and `data_args.mm_use_im_start_end`. `preprocess` accepts text in this form as well as the raw form.
    """
    import llava.conversation as conversation_lib
    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.prompting import IMAGE_PART_TEXT, wrap_image_markers

    if not getattr(data_args, "is_multimodal", False):
        return sources
    # Unlike `place_training_image_markers`, the original moves the markers of every turn (any image count) and
    # never reduces `plain` turns; what wraps the marker is the shared policy.
    mmtag = bool(getattr(conversation_lib.default_conversation, "mmtag", False))
    start_end = bool(getattr(data_args, "mm_use_im_start_end", False))
    for source in sources:
        for turn in source:
            text = turn["value"]
            if DEFAULT_IMAGE_TOKEN in text:
                text = (IMAGE_PART_TEXT + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
                turn["value"] = wrap_image_markers(text, mmtag=mmtag, mm_use_im_start_end=start_end)
    return sources


def preprocess(
    sources: list[list[dict]],
    tokenizer: transformers.PreTrainedTokenizerBase,
    has_image: bool = False,
    version: str | None = None,
) -> dict:
    """LLaVA-format conversations -> `{"input_ids": (B, T), "labels": (B, T)}` LongTensors, as the original's `preprocess`.

    Each source is a list of `{"from": "human"|"gpt", "value": ...}` turns. Tokens come from our one preprocessing
    path (`llava.train.preprocess.Preprocessor`): only assistant replies are supervised and `<image>` becomes
    IMAGE_TOKEN_INDEX. Several sources are right-padded to the longest (pad id / IGNORE_INDEX); nothing is truncated
    (our dataset truncates knowing each image's feature count). With `has_image=False` a conversation must not hold
    `<image>` (the original would tokenize it as text).
    """
    from llava.constants import IGNORE_INDEX
    from llava.train.data import _messages

    version = version or _default_template_name()
    rows = []
    for n, source in enumerate(sources):
        messages, start_end = [], False
        for role, text in _messages({"conversations": source})[0]:
            text, wrapped = _unwrap_markers(text)
            start_end = start_end or wrapped
            messages.append((role, text))
        num_images = sum(text.count("<image>") for _, text in messages)
        if num_images and not has_image:
            raise ValueError(
                f"preprocess: source {n} holds {num_images} `<image>` marker(s) but has_image=False; pass "
                "has_image=True (each marker becomes IMAGE_TOKEN_INDEX) or remove the markers."
            )
        rows.append(Preprocessor(tokenizer, version, start_end)(messages, num_images))
    width = max(len(row.input_ids) for row in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([row.input_ids + [pad_id] * (width - len(row.input_ids)) for row in rows])
    labels = torch.tensor([row.labels + [IGNORE_INDEX] * (width - len(row.labels)) for row in rows])
    return dict(input_ids=input_ids, labels=labels)


def make_supervised_data_module(
    tokenizer: transformers.PreTrainedTokenizerBase, data_args, model=None, version: str | None = None
) -> dict:
    """`{"train_dataset", "eval_dataset": None, "data_collator"}` for `data_args.data_path`, as the original.

    `data_args` needs `data_path` and, for images, `image_folder` (plus optional `image_aspect_ratio`,
    `image_grid_pinpoints`, `mm_use_im_start_end`, `image_processor`). Unlike the original, a dataset with images
    also needs `model=` (the LLaVA model): each image's feature count is read from its tower and projector.
    Sequences are cut at `tokenizer.model_max_length`.
    """
    records = load_records(
        data_args.data_path,
        getattr(data_args, "image_folder", None),
        getattr(data_args, "validate_images", "header"),
        getattr(data_args, "skip_bad_records", False),
    )
    image_processor = getattr(data_args, "image_processor", None)
    counter = None
    if model is not None:
        base = unwrap_llava(model)
        counter = ImageTokenCounter(base)
        image_processor = image_processor or base.get_vision_tower().image_processor
    elif any(record.images for record in records):
        raise ValueError(
            f"make_supervised_data_module: `{data_args.data_path}` has images; pass `model=` (the LLaVA model) so "
            "that each image's feature count is known."
        )
    dataset = LazySupervisedDataset(
        records,
        Preprocessor(tokenizer, version or _default_template_name(), getattr(data_args, "mm_use_im_start_end", False)),
        max_length=tokenizer.model_max_length,
        image_processor=image_processor,
        image_tokens=counter,
        image_config={
            "image_aspect_ratio": getattr(data_args, "image_aspect_ratio", "square"),
            "image_grid_pinpoints": getattr(data_args, "image_grid_pinpoints", None),
        },
        source=data_args.data_path,
        skip_bad=getattr(data_args, "skip_bad_records", False),
    )
    collator = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)
    return dict(train_dataset=dataset, eval_dataset=None, data_collator=collator)


def safe_save_model_for_hf_trainer(trainer: transformers.Trainer, output_dir: str) -> None:
    """Save the trained model to `output_dir`, as the original's helper of that name.

    With our `LLaVATrainer` (what `train()` builds) this writes the complete checkpoint of the run's kind: stage 1
    gives `config.json` + `mm_projector.bin`, LoRA the adapter + `non_lora_trainables.bin`, full a whole model; each
    loads with `load_pretrained_model`. Other trainers save as their `save_model` does. DeepSpeed ZeRO-3 shards are
    gathered by the trainer. A full disk raises a `CheckpointWriteError`, as in `train()`.
    """
    with final_save_errors(output_dir, getattr(trainer, "checkpoint_format", None), run_dir=trainer.args.output_dir):
        trainer.save_model(output_dir)
