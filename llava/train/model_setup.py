"""The model a training run starts from: load the decoder, attach tower and projector, name the stage, freeze.

The stage (what learns) is named once, by `training_stage`, from the original's flags (`--tune_mm_mlp_adapter`,
`--freeze_backbone`, `--freeze_mm_mlp_adapter`, `--unfreeze_mm_vision_tower`, `--lora_enable`, `--bits`);
`set_trainable` applies it in one place and logs it with the parameter count of each part. The model itself is
built by `llava.model.assemble` (the assembler and the decoder load path shared with `load_pretrained_model`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import torch
import transformers

from llava.conversation import conv_templates
from llava.model.assemble import (
    PARTS,
    build_llava,
    config_object,
    from_pretrained_kwargs,
    llava_model_of,
    load_weights,
    module_parts,
    parameter_parts,
    specs_from_args,
)
from llava.model.builder import tokenizer_kwargs
from llava.model.image_tokens import start_end_token_ids
from llava.model.language_model import DECODERS, decoder_for_config
from llava.train.args import DataArguments, ModelArguments, TrainingArguments
from llava.train.preprocess import CHAT_TEMPLATE

logger = logging.getLogger("llava.train")

# FSDP layer class names of the original's own model code -> the transformers class that replaces it.
LEGACY_LAYER_CLASSES = {"MPTBlock": "MptBlock"}


# ------------------------------------------------------------------------------------------------------- loading


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
    # A LLaVA checkpoint builds its tower from the path given now (e.g. a local copy of the hub tower).
    config = config_object(spec, raw, model_args.vision_tower)
    quantized = training_args.bits in (4, 8)
    kwargs = from_pretrained_kwargs(
        _weights_dtype(training_args),
        attn_implementation,
        device_map={"": training_args.device} if quantized else None,
        bits=training_args.bits,
        double_quant=training_args.double_quant,
        quant_type=training_args.quant_type,
        cache_dir=training_args.cache_dir,
    )
    model, missing = load_weights(spec.causal_lm_cls, model_args.model_name_or_path, config, kwargs)
    tower = model.get_vision_tower()
    if tower is not None:
        if not missing.get("vision_tower"):
            tower.is_loaded = True  # the checkpoint carried the tower's (possibly trained) weights
        elif hasattr(next(tower.parameters()), "ds_id"):
            model.get_model().vision_tower = None  # partitioned and empty: rebuilt below, outside zero.Init
    model.config.use_cache = False
    return model


def trained_template_name(version: str) -> str:
    """The template name to record for inference. Few-shot examples baked into a template (`v0`) are not trained
    on, so the model is recorded with the registered template that is the same without them (`llava_v0`)."""
    template = conv_templates[version]
    if not template.messages:
        return version
    bare = dataclasses.replace(template, messages=(), offset=0)
    return next((name for name, t in conv_templates.items() if t == bare), version)


def run_record(model_args: ModelArguments, training_args: TrainingArguments) -> dict:
    """Facts of the run a checkpoint's config records beside the multimodal fields: the stage flags and learning
    rates (the original's names) and the chat template the run trained with."""
    record = {}
    if model_args.vision_tower:
        record.update(
            tune_mm_mlp_adapter=model_args.tune_mm_mlp_adapter,
            freeze_mm_mlp_adapter=training_args.freeze_mm_mlp_adapter,
            unfreeze_mm_vision_tower=model_args.unfreeze_mm_vision_tower,
            mm_projector_lr=training_args.mm_projector_lr,
            mm_vision_tower_lr=training_args.mm_vision_tower_lr,
        )
    if model_args.version in conv_templates:
        record["conv_template"] = trained_template_name(model_args.version)
    elif model_args.version == CHAT_TEMPLATE:
        record["use_tokenizer_chat_template"] = True  # the tokenizer saved with each checkpoint carries it
    return record


def attach_vision(
    model, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, tokenizer=None
):
    """Attach the vision tower and projector (stage-1 weights when given) with `build_llava`, which writes the
    multimodal config fields (with `tokenizer`'s padding side and length), so every checkpoint says how its images
    and prompts were prepared. Returns the tower, or None for a text-only run."""
    if not model_args.vision_tower:
        return None
    vision, projector, prompt = specs_from_args(model_args, data_args)
    prompt = dataclasses.replace(  # without `tokenizer`: what `load_tokenizer` sets
        prompt,
        tokenizer_padding_side=tokenizer.padding_side if tokenizer is not None else "right",
        tokenizer_model_max_length=(tokenizer or training_args).model_max_length,
    )
    with _zero3_init_paused(training_args):
        build_llava(model, vision, projector, prompt, record=run_record(model_args, training_args))
    tower = model.get_vision_tower()
    if training_args.bits in (4, 8):
        device = model.get_input_embeddings().weight.device
        tower.to(device=device)
        model.get_model().mm_projector.to(device=device)
    return tower


def load_tokenizer(model_args: ModelArguments, training_args: TrainingArguments):
    """The base's tokenizer as inference (`llava.model.builder.load_tokenizer`) and the original's training load it:
    a LLaMA SentencePiece tokenizer that does not choose runs in legacy mode, so a word after a special token written
    in the text (`</s>USER:` between turns) gets the same ids in training and in serving."""
    path = model_args.model_name_or_path

    def load(**extra):
        return transformers.AutoTokenizer.from_pretrained(
            path,
            cache_dir=training_args.cache_dir,
            model_max_length=training_args.model_max_length,
            padding_side="right",
            **extra,
        )

    tokenizer = load(**tokenizer_kwargs(path)) if os.path.isdir(path) else load()
    if not os.path.isdir(path):  # a hub id: decide from the files it brought
        vocab_file = getattr(tokenizer, "vocab_file", None)
        extra = tokenizer_kwargs(os.path.dirname(vocab_file)) if vocab_file and os.path.isfile(vocab_file) else {}
        if extra:
            tokenizer = load(**extra)
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        logger.info("The tokenizer has no pad token; padding with `%s` (padded positions are masked).", fallback)
        tokenizer.pad_token = fallback
    return tokenizer


# ---------------------------------------------------------------------------------------------------------- LoRA


def lora_target_modules(model, include_vision_tower: bool = False) -> list[str]:
    """Names of the linear layers LoRA adapts: the LLM's (and the tower's when asked), never projector or head."""
    wanted = {"llm", "vision_tower"} if include_vision_tower else {"llm"}
    modules = dict(model.named_modules())
    return [
        name
        for name, part in module_parts(model).items()
        if part in wanted and isinstance(modules[name], torch.nn.Linear)
    ]


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


# -------------------------------------------------------------------------------------------------------- stages

# The stages, named from the original's flags; `+tower` / `+frozen_projector` / `+text_only` may follow the name.
STAGES = {
    "align": "stage 1 (--tune_mm_mlp_adapter): the projector learns, the LLM is frozen",
    "frozen_llm": "--freeze_backbone: the LLM is frozen, the projector learns",
    "full": "stage 2: the projector and the whole LLM learn",
    "lora": "--lora_enable: LoRA adapters on the LLM learn, and the projector",
    "qlora": "--lora_enable with --bits 4/8: LoRA adapters on the quantized LLM learn, and the projector",
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a run trains, decided once from the original flags."""

    base: str  # a key of STAGES
    llm: bool  # every LLM weight learns
    projector: bool
    tower: bool  # tower weights learn (unfrozen, or LoRA on it)
    multimodal: bool

    @property
    def name(self) -> str:
        extras = [
            ("tower", self.tower),
            ("frozen_projector", self.multimodal and not self.projector),
            ("text_only", not self.multimodal),
        ]
        return "+".join([self.base] + [extra for extra, on in extras if on])

    @property
    def checkpoint_format(self) -> str:
        """What the trainer saves: the LoRA adapter, the projector alone (nothing else learns), or the whole model."""
        if self.base in ("lora", "qlora"):
            return "lora"
        return "projector" if self.multimodal and not (self.llm or self.tower) else "full"


def training_stage(model_args: ModelArguments, training_args: TrainingArguments, multimodal: bool = True) -> Stage:
    """The stage the original's flags ask for (no flag of its own: the original's scripts run unchanged)."""
    lora = training_args.lora_enable
    if lora:
        base = "qlora" if training_args.bits in (4, 8) else "lora"
    elif model_args.tune_mm_mlp_adapter:
        base = "align"
    elif model_args.freeze_backbone:
        base = "frozen_llm"
    else:
        base = "full"
    tower = multimodal and (model_args.unfreeze_mm_vision_tower or (lora and training_args.lora_vision_tower))
    projector = multimodal and not training_args.freeze_mm_mlp_adapter
    return Stage(base, base == "full", projector, tower, multimodal)


def train_only_rows(weight: torch.nn.Parameter, rows: list[int]) -> None:
    """Let only `rows` of an embedding matrix learn: the gradient of every other row is zeroed, so with weight decay 0
    they keep their pretrained values (the original v0 code reset them after each step)."""
    mask = torch.zeros(getattr(weight, "ds_shape", weight.shape)[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.register_hook(lambda grad: grad * mask.to(device=grad.device, dtype=grad.dtype))
    logger.info("Of the input embedding only rows %s (<im_start>, <im_end>) learn.", rows)


def set_trainable(model, model_args: ModelArguments, training_args: TrainingArguments, tokenizer=None) -> Stage:
    """Freeze / unfreeze tower, projector and LLM as the run's stage says, in this one place, and log it.

    Stage 1 with `--mm_use_im_start_end` also trains the `<im_start>`/`<im_end>` rows of the input embedding (only
    those rows: pass the `tokenizer` that holds them); the stage-1 file then carries the embedding."""
    base = llava_model_of(model)
    tower = base.get_vision_tower() if hasattr(base, "get_vision_tower") else None
    stage = training_stage(model_args, training_args, multimodal=tower is not None)
    if stage.base not in ("lora", "qlora"):
        base.requires_grad_(stage.llm)
    if tower is not None:
        for p in base.parts().get("vision_tower", ()):  # LoRA weights on the tower are their own part
            p.requires_grad_(model_args.unfreeze_mm_vision_tower)
        # The projector module itself: `image_newline` follows the LLM, as in the original.
        base.get_model().mm_projector.requires_grad_(stage.projector)
        if model_args.tune_mm_mlp_adapter and model_args.mm_use_im_start_end:
            embedding = base.get_input_embeddings().weight
            embedding.requires_grad_(True)  # the new <im_start>/<im_end> rows learn
            if tokenizer is not None and not stage.llm:
                train_only_rows(embedding, start_end_token_ids(tokenizer))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "Nothing would train: the LLM, projector and vision tower are all frozen. Check --tune_mm_mlp_adapter, "
            "--freeze_backbone, --freeze_mm_mlp_adapter and --unfreeze_mm_vision_tower."
        )
    if stage.tower and training_args.ddp_find_unused_parameters is None:
        # The tower's last layer(s) and post-layernorm do not feed the selected features: DDP must allow that.
        training_args.ddp_find_unused_parameters = True
    if training_args.gradient_checkpointing and not base.get_input_embeddings().weight.requires_grad:
        base.enable_input_require_grads()
    logger.info("Training stage `%s` (%s); saves `%s` checkpoints.", stage.name, STAGES[stage.base],
                stage.checkpoint_format)  # fmt: skip
    logger.info("%s", part_counts(model))
    return stage


def part_counts(model) -> str:
    """One line per part: trained / frozen parameter counts (`trained` and `frozen` parts named)."""
    from llava.train.llava_trainer import param_numel

    counts: dict[str, list[int]] = {}
    params = dict(model.named_parameters())
    for name, part in parameter_parts(model).items():
        row = counts.setdefault(part, [0, 0])
        row[0 if params[name].requires_grad else 1] += param_numel(params[name])
    lines = ["Parameters by part (trained / frozen):"]
    for part in PARTS:
        if part in counts:
            trained, frozen = counts[part]
            state = "trained" if trained and not frozen else "frozen" if not trained else "partly trained"
            lines.append(f"  {part:<14}{trained:>14,} / {frozen:>14,}  {state}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- FSDP


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
    base = llava_model_of(model)
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
