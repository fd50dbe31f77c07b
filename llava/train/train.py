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

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time

import torch
import transformers

from llava.conversation import conv_templates
from llava.model.builder import QUANT_SKIP_MODULES
from llava.model.language_model import DECODERS, decoder_for_config
from llava.model.llava_arch import start_end_token_ids
from llava.runtime import configure_threads
from llava.train.args import DataArguments, ModelArguments, TrainingArguments, parse_args
from llava.train.data import (
    DataCollatorForSupervisedDataset,
    DatasetError,
    ImageTokenCounter,
    LazySupervisedDataset,
    load_records,
    scan_supervision,
)
from llava.train.llava_trainer import (
    LLaVATrainer,
    disk_full_errors,
    remove_unfinished_saves,
    resumable_checkpoint,
    unwrap_llava,
)
from llava.train.preprocess import CHAT_TEMPLATE, Preprocessor, check_version

logger = logging.getLogger("llava.train")

# FSDP layer class names of the original's own model code -> the transformers class that replaces it.
LEGACY_LAYER_CLASSES = {"MPTBlock": "MptBlock"}


# ----------------------------------------------------------------------------------------------------- model setup


def _read_raw_config(name_or_path: str, cache_dir: str | None) -> tuple[dict, str]:
    """config.json as a dict: LLaVA configs say `model_type: llava`, which transformers maps to another class."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`{name_or_path}` (--model_name_or_path) has no config.json.")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name_or_path, "config.json", cache_dir=cache_dir)
    with open(path) as f:
        return json.load(f), path


@contextlib.contextmanager
def _zero3_init_paused(training_args: TrainingArguments):
    """Build modules outside ZeRO-3's `zero.Init` (the vision tower loads its weights by state dict copy); the
    DeepSpeed engine partitions them when it starts."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


def _weights_dtype(training_args: TrainingArguments) -> torch.dtype:
    # DeepSpeed keeps fp32 master weights itself; plain runs keep fp32 weights and autocast.
    if training_args.deepspeed or training_args.bits in (4, 8):
        if training_args.bf16:
            return torch.bfloat16
        if training_args.fp16:
            return torch.float16
    return torch.float32


def load_model(model_args: ModelArguments, training_args: TrainingArguments, attn_implementation: str):
    """The LLaVA model for `--model_name_or_path` (a plain decoder or a LLaVA checkpoint), quantized for QLoRA."""
    if training_args.deepspeed and training_args.use_cpu:
        # On CPU, transformers sets up torch.distributed (gloo) but not DeepSpeed's communicator, which ZeRO-3's
        # zero.Init needs while the decoder is built; DeepSpeed adopts the existing process group.
        import deepspeed

        deepspeed.init_distributed()
    raw, source = _read_raw_config(model_args.model_name_or_path, training_args.cache_dir)
    spec = decoder_for_config(raw, source)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    if model_args.vision_tower and fields.get("mm_vision_tower") not in (None, model_args.vision_tower):
        # A LLaVA checkpoint: build its tower from the path given now (e.g. a local copy of the hub tower).
        fields["mm_vision_tower"] = model_args.vision_tower
        fields.pop("mm_vision_tower_config", None)
    config = spec.config_cls(**fields)
    dtype = _weights_dtype(training_args)
    kwargs: dict = {"config": config, "dtype": dtype, "attn_implementation": attn_implementation}
    if training_args.cache_dir:
        kwargs["cache_dir"] = training_args.cache_dir
    if training_args.bits in (4, 8):
        from transformers import BitsAndBytesConfig

        kwargs["device_map"] = {"": training_args.device}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=training_args.bits == 4,
            load_in_8bit=training_args.bits == 8,
            llm_int8_skip_modules=list(QUANT_SKIP_MODULES),
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=training_args.double_quant,
            bnb_4bit_quant_type=training_args.quant_type,
        )
    model, info = spec.causal_lm_cls.from_pretrained(model_args.model_name_or_path, output_loading_info=True, **kwargs)
    tower = model.get_vision_tower()
    if tower is not None:
        if not any(".vision_tower." in f".{k}" for k in info["missing_keys"]):
            tower.is_loaded = True  # the checkpoint carried the tower's (possibly trained) weights
        elif hasattr(next(tower.parameters()), "ds_id"):
            model.get_model().vision_tower = None  # partitioned and empty: rebuilt below, outside zero.Init
    model.config.use_cache = False
    return model


def attach_vision(model, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Attach the vision tower and projector (stage-1 weights when given) and write the data fields into the
    config, so every checkpoint says how its images and prompts were prepared."""
    if not model_args.vision_tower:
        return None
    with _zero3_init_paused(training_args):
        model.get_model().initialize_vision_modules(model_args, fsdp=training_args.fsdp)
    tower = model.get_vision_tower()
    if training_args.bits in (4, 8):
        device = model.get_input_embeddings().weight.device
        tower.to(device=device)
        model.get_model().mm_projector.to(device=device)
    config = model.config
    config.image_aspect_ratio = data_args.image_aspect_ratio
    config.image_grid_pinpoints = data_args.image_grid_pinpoints
    config.mm_use_im_start_end = model_args.mm_use_im_start_end
    config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    config.unfreeze_mm_vision_tower = model_args.unfreeze_mm_vision_tower
    config.mm_projector_lr = training_args.mm_projector_lr
    config.mm_vision_tower_lr = training_args.mm_vision_tower_lr
    data_args.is_multimodal = True
    return tower


def lora_target_modules(model, include_vision_tower: bool = False) -> list[str]:
    """Names of the linear layers LoRA adapts: the LLM's (and the tower's when asked), never projector or head."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "mm_projector" in name or name.endswith("lm_head"):
            continue
        if "vision_tower" in name and not include_vision_tower:
            continue
        names.append(name)
    return names


def apply_lora(model, training_args: TrainingArguments):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if training_args.bits in (4, 8):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
    config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        target_modules=lora_target_modules(model, training_args.lora_vision_tower),
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train_only_rows(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Let only `rows` of an embedding matrix learn: the gradient of every other row is zeroed, so with weight decay 0
    they keep their pretrained values (the original v0 code reset them after each step)."""
    mask = torch.zeros(getattr(weight, "ds_shape", weight.shape)[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.register_hook(lambda grad: grad * mask.to(device=grad.device, dtype=grad.dtype))
    logger.info("Of the input embedding only rows %s (<im_start>, <im_end>) learn.", rows)


def set_trainable(model, model_args: ModelArguments, training_args: TrainingArguments, tokenizer=None) -> str:
    """Freeze / unfreeze tower, projector and LLM in one place; returns the checkpoint format this implies.

    Stage 1 with `--mm_use_im_start_end` also trains the `<im_start>`/`<im_end>` rows of the input embedding (only
    those rows: pass the `tokenizer` that holds them); the stage-1 file then carries the embedding."""
    base = unwrap_llava(model)
    lora = training_args.lora_enable
    llm_trains = not (model_args.tune_mm_mlp_adapter or model_args.freeze_backbone or lora)
    if not lora:
        base.requires_grad_(llm_trains)
    tower = base.get_vision_tower() if hasattr(base, "get_vision_tower") else None
    tower_trains = False
    if tower is not None:
        tower_trains = model_args.unfreeze_mm_vision_tower
        for name, p in tower.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(tower_trains)
        tower_trains = tower_trains or (lora and training_args.lora_vision_tower)
        base.get_model().mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
        if model_args.tune_mm_mlp_adapter and model_args.mm_use_im_start_end:
            embedding = base.get_input_embeddings().weight
            embedding.requires_grad_(True)  # the new <im_start>/<im_end> rows learn
            if tokenizer is not None and not llm_trains:
                train_only_rows(embedding, start_end_token_ids(tokenizer))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "Nothing would train: the LLM, projector and vision tower are all frozen. Check --tune_mm_mlp_adapter, "
            "--freeze_backbone, --freeze_mm_mlp_adapter and --unfreeze_mm_vision_tower."
        )
    if tower_trains and training_args.ddp_find_unused_parameters is None:
        # The tower's last layer(s) and post-layernorm do not feed the selected features: DDP must allow that.
        training_args.ddp_find_unused_parameters = True
    if training_args.gradient_checkpointing and not base.get_input_embeddings().weight.requires_grad:
        base.enable_input_require_grads()
    if lora:
        return "lora"
    if not llm_trains and not tower_trains and tower is not None:
        return "projector"
    return "full"


def check_fsdp(model, training_args: TrainingArguments, checkpoint_format: str) -> None:
    """Fail before step 1 on FSDP settings that cannot work here: a layer class to wrap that this model does not
    have (the original's `MPTBlock` is mapped to transformers' `MptBlock`), or a run that saves only part of the
    model (stage 1, LoRA), whose sharded weights the checkpoint writer does not gather."""
    if checkpoint_format != "full":
        raise ValueError(
            f"FSDP (`--fsdp`) runs save full models; this run saves a `{checkpoint_format}` checkpoint "
            "(stage 1 with --tune_mm_mlp_adapter, or LoRA). Run it with DeepSpeed (`--deepspeed ./scripts/zero2.json`) "
            "or plain data parallelism (torchrun without --fsdp) instead."
        )
    plugin = training_args.fsdp_plugin_args or {}
    names = plugin.get("transformer_cls_names_to_wrap")
    if not names:
        return  # accelerate wraps the model's `_no_split_modules` (the decoder layer)
    base = unwrap_llava(model)
    present = {type(m).__name__ for m in base.modules()}
    spec = next((s for s in DECODERS.values() if isinstance(base, s.causal_lm_cls)), None)
    fixed = []
    for name in names.split(","):
        name = LEGACY_LAYER_CLASSES.get(name, name)
        if name not in present:
            hint = f"; this model's decoder layer is `{spec.decoder_layer_cls}`" if spec else ""
            raise ValueError(
                f"`--fsdp_transformer_layer_cls_to_wrap {names}`: this model has no `{name}` layer{hint}. "
                f"FSDP layer classes by decoder: {', '.join(f'{s.family}: {s.decoder_layer_cls}' for s in DECODERS.values())}."
            )
        fixed.append(name)
    plugin["transformer_cls_names_to_wrap"] = ",".join(fixed)


class FsdpReport(transformers.TrainerCallback):
    """Logs, once the model is sharded, which modules FSDP made units of (so a wrong wrap policy shows at once)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        units = []
        for module in model.modules() if model is not None else ():
            if isinstance(module, FullyShardedDataParallel):  # FSDP1 wraps; FSDP2 marks the module itself
                units.append(type(module.module).__name__)
            elif isinstance(module, FSDPModule):  # its class became `FSDP<class>`
                units.append(type(module).__name__.removeprefix("FSDP"))
        counts = {name: units.count(name) for name in dict.fromkeys(units)}
        if counts:
            logger.info("FSDP units: %s", ", ".join(f"{name} x{n}" for name, n in counts.items()))
        else:
            logger.warning("FSDP units: none; the model is not sharded (accelerate shards on GPUs only).")


def trained_template_name(version: str) -> str:
    """The template name to record for inference. Few-shot examples baked into a template (`v0`) are not trained
    on, so the model is recorded with the registered template that is the same without them (`llava_v0`)."""
    template = conv_templates[version]
    if not template.messages:
        return version
    bare = dataclasses.replace(template, messages=(), offset=0)
    return next((name for name, t in conv_templates.items() if t == bare), version)


def load_tokenizer(model_args: ModelArguments, training_args: TrainingArguments):
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        logger.info("The tokenizer has no pad token; padding with `%s` (padded positions are masked).", fallback)
        tokenizer.pad_token = fallback
    return tokenizer


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
    if given and given.lower() not in ("true", "yes"):
        return given
    if training_args.overwrite_output_dir:
        return None
    return last_checkpoint(training_args.output_dir, checkpoint_format, not training_args.save_only_model)


# ---------------------------------------------------------------------------------------------- launcher watch

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAUNCHER_POLL_SECONDS = 1.0
# After SIGTERM a rank whose handlers keep it alive is ended outright after this long.
LAUNCHER_GRACE_SECONDS = 30.0


def launched_by_launcher() -> bool:
    """Whether this process is a rank started by torchrun / torch.distributed.run or the deepspeed launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def stop_with_launcher() -> None:
    """Make this rank end when the launcher that started it dies (kill -9 of torchrun would otherwise leave the
    ranks training as orphans: PyTorch starts them in their own sessions, so no terminal signal reaches them).

    Linux: the kernel sends SIGTERM at the parent's death (`prctl(PR_SET_PDEATHSIG)`). Everywhere: a daemon thread
    checks once a second whether the parent changed, and then sends SIGTERM to this process (and ends it after
    `LAUNCHER_GRACE_SECONDS` if that did not). Does nothing unless started by a launcher."""
    if not launched_by_launcher():
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        # The signal comes when the thread that started this process exits: torchrun and the deepspeed launcher
        # start their ranks from their main thread, so that is when the launcher dies.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the launcher only.", ctypes.get_errno())
    if parent == 1 or not _alive(parent):  # the launcher died before the watch was set
        _launcher_gone(parent)
    threading.Thread(target=_watch_parent, args=(parent,), name="llava-launcher-watch", daemon=True).start()
    logger.info("Rank pid %d stops when its launcher (pid %d) dies.", os.getpid(), parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(LAUNCHER_POLL_SECONDS)
    _launcher_gone(parent)


def _launcher_gone(parent: int) -> None:
    logger.error("The launcher (pid %d) is gone; this rank (pid %d) stops.", parent, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(LAUNCHER_GRACE_SECONDS)
    os._exit(1)


# ----------------------------------------------------------------------------------------------------------- train


def _setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    llava_logger = logging.getLogger("llava")
    llava_logger.setLevel(level)
    if not llava_logger.handlers:
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
    if attach_vision(model, model_args, data_args, training_args) is not None:
        model.initialize_vision_tokenizer(model_args, tokenizer)
    model.config.tokenizer_padding_side = tokenizer.padding_side
    model.config.tokenizer_model_max_length = tokenizer.model_max_length
    if model_args.version in conv_templates:
        model.config.conv_template = trained_template_name(model_args.version)
    elif model_args.version == CHAT_TEMPLATE:
        model.config.use_tokenizer_chat_template = True  # the tokenizer saved with each checkpoint carries it

    if training_args.lora_enable:
        model = apply_lora(model, training_args)
    checkpoint_format = set_trainable(model, model_args, training_args, tokenizer)
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
    out = training_args.output_dir
    previous = last_checkpoint(out, checkpoint_format) if training_args.should_save else None
    with disk_full_errors(out, f"the final model into `{out}`", previous):
        trainer.save_state()
        trainer.save_model(out)
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
    the others removed), wrapped in `<Image></Image>` when the default template's version has `mmtag`, and in
    `<im_start>`/`<im_end>` when `data_args.mm_use_im_start_end`. `preprocess` accepts text in this form as well as
    the raw form.
    """
    import llava.conversation as conversation_lib

    if not getattr(data_args, "is_multimodal", False):
        return sources
    mmtag = "mmtag" in conversation_lib.default_conversation.version
    start_end = getattr(data_args, "mm_use_im_start_end", False)
    for source in sources:
        for turn in source:
            text = turn["value"]
            if "<image>" in text:
                text = ("<image>\n" + text.replace("<image>", "").strip()).strip()
                if mmtag:
                    text = text.replace("<image>", "<Image><image></Image>")
            if start_end:
                text = text.replace("<image>", "<im_start><image><im_end>")
            turn["value"] = text
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
    gathered by the trainer.
    """
    trainer.save_model(output_dir)
