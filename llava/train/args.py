"""Training arguments: the original LLaVA field names and defaults, plus what this package adds.

`ModelArguments`, `DataArguments` and `TrainingArguments` are parsed together by `HfArgumentParser`, so every flag of
the original scripts (`--version plain`, `--tune_mm_mlp_adapter True`, `--lora_enable True`, `--bits 4`, ...) still
works. Flags that current transformers renamed or dropped (`--evaluation_strategy`, `--warmup_ratio`,
`--group_by_length`, `--overwrite_output_dir`, `--fsdp "full_shard auto_wrap"` with
`--fsdp_transformer_layer_cls_to_wrap`) are accepted and mapped onto their current meaning.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field

import torch
import transformers

logger = logging.getLogger(__name__)

# Values of `--version` that are not a name in `llava.conversation.conv_templates`.
CHAT_TEMPLATE_VERSION = "chat_template"


@dataclass
class ModelArguments:
    """What to train: the decoder, the vision tower, the projector and which of them learn."""

    model_name_or_path: str | None = field(
        default="facebook/opt-125m",
        metadata={"help": "Decoder to start from (plain LLM dir/id, or a LLaVA checkpoint for task fine-tuning)."},
    )
    version: str | None = field(
        default="v0",
        metadata={
            "help": "Conversation template: a name in llava.conversation.conv_templates (`plain` for stage 1, `v1` "
            "for stage 2), or `chat_template` to use the tokenizer's own chat template."
        },
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM (decoder) weights."})
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Stage 1: train the projector only; the checkpoint is `mm_projector.bin`."}
    )
    vision_tower: str | None = field(default=None, metadata={"help": "Vision encoder dir or hub id (CLIP, SigLIP)."})
    mm_vision_select_layer: int | None = field(
        default=-1, metadata={"help": "Vision tower hidden layer whose features are used (-2: second to last)."}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "Stage-1 `mm_projector.bin` to start the projector from."}
    )
    mm_projector_type: str | None = field(default="linear", metadata={"help": "linear, mlp2x_gelu, identity, ..."})
    mm_use_im_start_end: bool = field(
        default=False,
        metadata={
            "help": "Wrap each image in <im_start>/<im_end> (new tokens; in stage 1 their embedding rows train and are "
            "saved in mm_projector.bin, which stage 2 restores them from)."
        },
    )
    mm_use_im_patch_token: bool = field(default=True, metadata={"help": "Add the <im_patch> token to the tokenizer."})
    mm_patch_merge_type: str | None = field(default="flat", metadata={"help": "flat, spatial, spatial_unpad."})
    mm_vision_select_feature: str | None = field(default="patch", metadata={"help": "patch (drop CLS) or cls_patch."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": "Train the vision tower too."})


@dataclass
class DataArguments:
    """Where the data is and how records become model inputs."""

    data_path: str | None = field(
        default=None, metadata={"help": "LLaVA JSON/JSONL, or HF-style `messages`/`images` records."}
    )
    lazy_preprocess: bool = field(default=False, metadata={"help": "Kept for the original scripts; always lazy."})
    is_multimodal: bool = field(default=False, metadata={"help": "Set from --vision_tower by parse_args."})
    image_folder: str | None = field(default=None, metadata={"help": "Root that record image paths are relative to."})
    image_aspect_ratio: str = field(default="square", metadata={"help": "square, pad or anyres."})
    image_grid_pinpoints: str | None = field(default=None, metadata={"help": "anyres resolutions, e.g. [[336,672]]."})
    skip_bad_records: bool = field(
        default=False,
        metadata={"help": "Skip records with missing/undecodable images or a bad schema instead of stopping."},
    )
    validate_images: str = field(
        default="header",
        metadata={
            "help": "Image check before step 1: `header` (open every image's header), `full` (decode every image), "
            "`exists` (file exists), `none`."
        },
    )
    max_masked_fraction: float = field(
        default=0.01,
        metadata={"help": "Stop when more than this fraction of samples has no supervised token."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF `TrainingArguments` plus LLaVA's fields (original names and defaults) and the renamed-flag aliases."""

    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Keep the projector frozen."})
    mpt_attn_impl: str | None = field(default="triton", metadata={"help": "Unused; kept for the original scripts."})
    model_max_length: int = field(
        default=512,
        metadata={"help": "Maximum sequence length after image features are spliced in; longer samples are cut."},
    )
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantize the quantization constants."})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA 4-bit type: fp4 or nf4."})
    bits: int = field(default=16, metadata={"help": "4 or 8: load the LLM quantized (QLoRA); 16: not quantized."})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = ""
    lora_bias: str = "none"
    lora_vision_tower: bool = field(default=False, metadata={"help": "Also put LoRA adapters on the vision tower."})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Learning rate of the projector."})
    mm_vision_tower_lr: float | None = field(default=None, metadata={"help": "Learning rate of the vision tower."})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "Batches hold only image or only text samples, grouped by length."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Sequence packing: several samples per row up to --model_max_length, each with its own positions "
            "and attention (llava/train/packing.py); --per_device_train_batch_size then counts rows."
        },
    )
    # -- flags current transformers renamed or dropped, accepted so the original scripts run unchanged --
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Old form of --warmup_steps <fraction>."})
    group_by_length: bool = field(default=False, metadata={"help": "Old form of --train_sampling_strategy."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh instead of resuming from the last checkpoint in output_dir."}
    )
    fsdp_transformer_layer_cls_to_wrap: str | None = field(
        default=None,
        metadata={
            "help": "Old form of `--fsdp_config '{\"transformer_layer_cls_to_wrap\": [...]}'`: the decoder layer class(es) "
            "FSDP wraps, comma-separated (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer, MptBlock)."
        },
    )

    def __post_init__(self):
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"`--warmup_ratio` must be in [0, 1), got `{self.warmup_ratio}`.")
            if self.warmup_steps and self.warmup_ratio:
                raise ValueError("Can't provide both `--warmup_ratio` and `--warmup_steps`. Choose one.")
            self.warmup_steps = self.warmup_ratio or self.warmup_steps
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.bits not in (4, 8, 16):
            raise ValueError(f"`--bits` must be 4, 8 or 16, got `{self.bits}`.")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"`--quant_type` must be `nf4` or `fp4`, got `{self.quant_type}`.")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"`--lora_bias` must be none, all or lora_only, got `{self.lora_bias}`.")
        _fsdp_legacy_flags(self)
        self.hardware_notes = _adapt_precision_to_machine(self)
        with warnings.catch_warnings():
            # `gradient_checkpointing` is the seeds' flag; transformers 5 calls it deprecated and maps it itself.
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
            super().__post_init__()


# `--fsdp` words of the seeds' scripts -> FSDP2 settings in `fsdp_config` (FSDP2 is what transformers 5 runs).
FSDP_SHARDING = {"full_shard": True, "shard_grad_op": False}
FSDP_WORDS = (*FSDP_SHARDING, "auto_wrap", "offload")


def _fsdp_legacy_flags(args: TrainingArguments) -> None:
    """Turn `--fsdp "full_shard auto_wrap"` + `--fsdp_transformer_layer_cls_to_wrap X` into `fsdp=True` and
    `fsdp_config` entries, as current transformers wants them (it drops the string form and the separate flag)."""
    if isinstance(args.fsdp, str) and args.fsdp.strip().lower() in ("true", "false", ""):
        args.fsdp = True if args.fsdp.strip().lower() == "true" else None
    names = args.fsdp_transformer_layer_cls_to_wrap
    words = args.fsdp.split() if isinstance(args.fsdp, str) else []
    if not words and not names:
        return
    if names and not args.fsdp:
        raise ValueError(
            f'`--fsdp_transformer_layer_cls_to_wrap {names}` needs FSDP; add `--fsdp "full_shard auto_wrap"`.'
        )
    config = args.fsdp_config
    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    config = {k.removeprefix("fsdp_"): v for k, v in (config or {}).items()}
    if names:
        config["transformer_layer_cls_to_wrap"] = [n.strip() for n in names.split(",") if n.strip()]
    args.fsdp_config = config
    if int(config.get("version", 2)) != 2:
        return  # FSDP1 (deprecated): transformers translates the words into its strategies itself
    unknown = [w for w in words if w not in FSDP_WORDS]
    if unknown:
        raise ValueError(
            f"`--fsdp {args.fsdp}`: {', '.join(unknown)} is not available with FSDP2; use "
            f'{", ".join(FSDP_WORDS)} (or `--fsdp_config` with `"version": 1` for FSDP1\'s strategies).'
        )
    for word in words:
        if word in FSDP_SHARDING:
            config.setdefault("reshard_after_forward", FSDP_SHARDING[word])
        elif word == "offload":
            config["cpu_offload"] = True
    args.fsdp = True


def cpu_bf16_instructions() -> str | None:
    """The CPU's native bf16 instructions (`amx_bf16`, `avx512_bf16`, ARM `bf16`, as /proc/cpuinfo names them),
    or None. Where /proc/cpuinfo is absent, oneDNN's own bf16 check decides (`onednn`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except FileNotFoundError:
        return "onednn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return next((name for name in ("amx_bf16", "avx512_bf16", "bf16") if name in flags), None)


def _adapt_precision_to_machine(args: TrainingArguments) -> list[str]:
    """Make GPU-only precision flags of the seeds' scripts runnable on a machine without CUDA; say what changed."""
    if torch.cuda.is_available():
        return []
    notes = []
    if args.tf32:
        args.tf32 = None
        notes.append("--tf32 True needs an NVIDIA Ampere GPU; there is no CUDA here, so TF32 is off.")
    if args.fp16:
        args.fp16 = False
        notes.append("--fp16 True needs a GPU; there is no CUDA here, so training runs in fp32.")
    accelerator = torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if (args.use_cpu or not accelerator) and args.bf16 and cpu_bf16_instructions() is None:
        # Kept, not refused: the seeds' scripts all pass --bf16 True and must run unchanged on any CPU. Numerics are
        # bf16 either way; only the speed differs.
        notes.append(
            "--bf16 True: this CPU has no bf16 instructions (AMX-BF16, AVX512-BF16 or ARM BF16), so bf16 autocast is "
            "emulated here and slower than fp32. Pass --bf16 False to train in fp32 on this machine."
        )
    if not args.use_cpu and not accelerator:
        args.use_cpu = True
        suffix = " (bf16 autocast on CPU)" if args.bf16 else ""
        notes.append(f"No CUDA device: training on CPU{suffix}.")
    if args.fsdp and args.use_cpu:
        notes.append(
            "--fsdp on CPU: accelerate shards models on GPUs (and other accelerators) only, so these CPU ranks run as "
            "plain data parallelism (DDP), each holding the whole model (docs/Training.md, FSDP)."
        )
    return notes


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the three dataclasses from `argv` (default: sys.argv); unknown flags are an error naming them."""
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if rest:
        raise SystemExit(f"Unknown arguments: {' '.join(rest)}. Run with --help for the accepted flags.")
    # Decided here, once, from the flags (the original set it while building the model).
    data_args.is_multimodal = data_args.is_multimodal or bool(model_args.vision_tower)
    return model_args, data_args, training_args
