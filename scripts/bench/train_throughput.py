"""Training benchmark: our `train()` against the stacks users would run instead, same data, same starting weights,
same machine, same run.

Every stack trains stage 2 (projector and LLM learn, the vision tower is frozen) on the demo generator's data
(`llava.demo.data`, by default its `llava665k` mix: short VQA, many-question, conversation and detailed-description
records about images plus text-only chats, lengths varying as in llava_v1_5_mix665k), starting from the same weights,
for the same number of steps at the same batch size:

  ours         `llava.train.train.train(...)` with `--group_by_modality_length True`, as scripts/v1_5/finetune.sh
  ours_packed  the same with `--packing True` (`--packed-rows` rows of `--pack-length` positions per step)
  ours_bf16    the same with `--bf16 True` (CPU: bf16 autocast, emulated without AVX512-BF16/AMX)
  baseline     the same model converted to `LlavaForConditionalGeneration` (`llava.model.convert_hf.build_hf_model`),
               HF `Trainer` with its default random sampler and a plain collator that pads each batch to its longest
               sample (the "LLaVA on a budget" recipe); it reads the same tokenized samples and pixels as ours
  trl          the seed-003 recipe: the model exported with `convert_hf`, TRL `SFTTrainer` and its vision-language
               collator on the records as HF `messages`/`images` (scripts/bench/train_trl.py)

Rounds alternate the order of the stacks, each run in a fresh process (so peak memory is its own). Printed per stack,
medians over rounds: samples/s, supervised tokens/s, padding (share of the positions the decoder computes that are
padding), peak memory, model FLOP/s and, on CPU, that as a fraction of the GEMM peak measured at the run's dtype and
thread count (`bench_common.roofline`); then the samples/s ratios and the loss check at the shared start.

    python scripts/bench/train_throughput.py                                   # CPU: `small` model, all stacks
    python scripts/bench/train_throughput.py --preset tiny --steps 3 --warmup-steps 1 --rounds 1 --train-images 40
    python scripts/bench/train_throughput.py --stacks ours,trl --rounds 3      # just the TRL comparison
    python scripts/bench/train_throughput.py --device cuda --preset medium --batch-size 16
    python scripts/bench/train_throughput.py --device cuda --mfu-only          # MFU of a 7B-shape stage-2 step

`--mfu` adds (and `--mfu-only` runs only) the model-FLOPs utilisation of one stage-2 training step of a 7B-shape
LLaVA-1.5 (Vicuna-7B decoder, CLIP ViT-L/336 tower, mlp2x_gelu projector; random weights, bf16, flash-attn 2 when
installed, else SDPA): MFU = model FLOPs per step / step time / the device's peak bf16 FLOP/s. See `mfu_flops`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402

# Dense bf16 peak FLOP/s by device name (the first match wins); pass --peak-tflops for anything else.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0))

# The stacks must agree on the loss of one batch at their shared starting weights (fp32).
LOSS_PARITY_TOL = 1e-3

# 7B LLaVA-1.5: Vicuna-7B v1.5 decoder, CLIP ViT-L/14 at 336 px, projector mlp2x_gelu.
SHAPE_7B = {
    "decoder": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tower": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    ),
}
SHAPE_TINY = {
    "decoder": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=400,
        max_position_embeddings=512,
    ),
    "tower": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    ),
}
MFU_SHAPES = {"7b": SHAPE_7B, "tiny": SHAPE_TINY}


@dataclass
class RunResult:
    mode: str
    steps: int
    samples: int
    seconds: float
    samples_per_s: float
    supervised_tokens_per_s: float
    tokens_per_s: float
    padding: float
    peak_memory_mb: float
    final_loss: float | None
    start_loss_diff: float | None = None  # peers only: |its loss - ours| on one batch at the shared start
    model_flops_per_s: float = 0.0  # see `Meter.model_flops`
    dtype: str = "float32"


# ---------------------------------------------------------------------------------------------------------- setup
def prepare(args) -> dict:
    """Demo data and backbones under the work dir (reused when already there); their paths."""
    from llava.demo import backbones
    from llava.demo import data as demo

    work = args.work_dir
    data_dir = os.path.join(work, f"data-{args.data_mix}-{args.train_images}-{args.seed}")
    ds = demo.DemoDataset(data_dir)
    if not os.path.exists(ds.manifest):
        ds = demo.generate(
            data_dir,
            train_images=args.train_images,
            eval_per_category=1,
            seed=args.seed,
            progress=False,
            mix=args.data_mix,
        )
    sizes = bc.preset(args.preset)
    model_dir = os.path.join(work, f"model-{args.preset}")
    stamp = os.path.join(model_dir, "sizes.json")
    if not os.path.exists(stamp) or json.load(open(stamp)) != asdict(sizes):
        with open(ds.text_corpus) as f:
            corpus = f.read().splitlines()
        tokenizer = backbones.build_tokenizer(os.path.join(model_dir, "tokenizer"), corpus, vocab_size=sizes.vocab_size)
        backbones.build_decoder(os.path.join(model_dir, "decoder"), tokenizer, sizes=sizes, seed=args.seed)
        backbones.build_vision_tower(os.path.join(model_dir, "clip"), sizes=sizes, seed=args.seed)
        with open(stamp, "w") as f:
            json.dump(asdict(sizes), f)
    return {
        "data_path": ds.finetune_json,
        "image_folder": ds.image_folder,
        "decoder": os.path.join(model_dir, "decoder"),
        "clip": os.path.join(model_dir, "clip"),
    }


def train_flags(spec: dict, output_dir: str) -> list[str]:
    """The stage-2 flags both sides share (scripts/v1_5/finetune.sh, scaled down)."""
    flags = {
        "model_name_or_path": spec["decoder"],
        "version": "v1",
        "data_path": spec["data_path"],
        "image_folder": spec["image_folder"],
        "vision_tower": spec["clip"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": "-2",
        "mm_use_im_start_end": "False",
        "mm_use_im_patch_token": "False",
        "image_aspect_ratio": "pad",
        "group_by_modality_length": "True",
        "output_dir": output_dir,
        "max_steps": str(spec["steps"]),
        "per_device_train_batch_size": str(spec["batch_size"]),
        "gradient_accumulation_steps": "1",
        "learning_rate": "2e-5",
        "weight_decay": "0.",
        "warmup_ratio": "0.03",
        "lr_scheduler_type": "cosine",
        "logging_steps": str(spec["steps"]),
        "save_strategy": "no",
        "model_max_length": "2048",
        "dataloader_num_workers": "0",
        "report_to": "none",
        "seed": str(spec["seed"]),
        "disable_tqdm": "True",
        "validate_images": "none",
    }
    if spec["device"] == "cuda":
        flags["bf16"] = "True"
    else:
        flags["use_cpu"] = "True"
    out = []
    for key, value in flags.items():
        out += [f"--{key}", value]
    return out


# ------------------------------------------------------------------------------------------------------- metering
class Meter:
    """Times the steps after `warmup` and counts, from forward pre-hooks, what each measured step computed: the
    decoder's positions and how many of them are padding (its attention mask, after image features are spliced in),
    and the supervised tokens (labels that are not IGNORE_INDEX)."""

    def __init__(self, warmup: int, device: str):
        self.warmup = warmup
        self.device = device
        self.measuring = False
        self.start = self.end = 0.0
        self.steps = self.samples = self.positions = self.real = self.supervised = 0
        self.squares = self.images = 0  # sum of squared sample lengths (attention), images encoded
        self.params = {"decoder": 0, "tower": 0, "projector": 0}
        self.layers_x_hidden = self.patches = 0

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == meter.warmup:
                    meter.sync()
                    meter.start = time.perf_counter()
                    meter.measuring = True

            def on_step_end(self, args, state, control, **kwargs):
                if meter.measuring:
                    meter.steps += 1
                if state.global_step >= state.max_steps and meter.measuring:
                    meter.sync()
                    meter.end = time.perf_counter()
                    meter.measuring = False

        return _Callback()

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def attach(self, top, decoder=None) -> None:
        """Count supervised tokens from `top` (the module the trainer calls) and positions / padding from what
        reaches the decoder: the attention mask `decoder` receives or, without `decoder`, the mask `top`'s image
        splicing returns (our model hands the decoder no mask for right-padded batches)."""
        from llava.constants import IGNORE_INDEX

        self._flop_model(top)

        def on_top(module, args, kwargs):
            labels = kwargs.get("labels")
            if self.measuring and labels is not None and module.training:
                self.supervised += int((labels[:, 1:] != IGNORE_INDEX).sum())  # the loss predicts tokens 1..T-1
                if not _packed(kwargs):  # packed rows: samples are counted where they are split (below)
                    self.samples += labels.shape[0]
                images = kwargs.get("images", kwargs.get("pixel_values"))
                self.images += 0 if images is None else len(images)

        def count(mask) -> None:
            if self.measuring and top.training and mask is not None and mask.dim() == 2:
                self._count_lengths(mask.sum(dim=1).tolist(), mask.numel())

        top.register_forward_pre_hook(on_top, with_kwargs=True)
        if decoder is not None:
            decoder.register_forward_pre_hook(
                lambda m, args, kwargs: count(kwargs.get("attention_mask")), with_kwargs=True
            )
            return
        splice = top.prepare_inputs_labels_for_multimodal

        def counted_splice(*args, **kwargs):
            out = splice(*args, **kwargs)
            # (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels)
            if out[2] is None and out[1] is not None and self.measuring and top.training:  # packed rows
                lengths = packed_sample_lengths(out[1], out[5])
                self.samples += len(lengths)
                self._count_lengths(lengths, out[1].numel())
            else:
                count(out[2])
            return out

        top.prepare_inputs_labels_for_multimodal = counted_splice  # instrumentation of this benchmark only

    def _count_lengths(self, lengths: list[int], positions: int) -> None:
        self.positions += positions
        self.real += sum(lengths)
        self.squares += sum(n * n for n in lengths)

    def _flop_model(self, model) -> None:
        """Parameter counts by part (input embeddings left out: a lookup) and the shapes attention FLOPs need."""
        for name, p in model.named_parameters():
            if "vision_tower" in name:
                self.params["tower"] += p.numel()
            elif "mm_projector" in name or "multi_modal_projector" in name:
                self.params["projector"] += p.numel()
            elif "embed_tokens" not in name:
                self.params["decoder"] += p.numel()
        config = model.config.get_text_config()
        self.layers_x_hidden = config.num_hidden_layers * config.hidden_size
        vision = getattr(model.config, "vision_config", None) or getattr(model.config, "mm_vision_tower_config", None)
        vision = vision if isinstance(vision, dict) else vision.to_dict()
        self.patches = (vision["image_size"] // vision["patch_size"]) ** 2

    def model_flops(self) -> float:
        """FLOPs of the measured steps, counted as `mfu_flops` does: decoder 6 x parameters per real (non-padding)
        position plus attention 12 x layers x hidden x length per position of each sample; projector 6 x its
        parameters per image feature; the frozen tower 2 x its parameters per patch (+ CLS), forward only."""
        p = self.params
        decoder = 6 * p["decoder"] * self.real + 12 * self.layers_x_hidden * self.squares
        images = self.images * (2 * p["tower"] * (self.patches + 1) + 6 * p["projector"] * self.patches)
        return decoder + images

    def result(self, mode: str, loss: float | None, dtype: str = "float32") -> RunResult:
        seconds = max(self.end - self.start, 1e-9)
        return RunResult(
            mode=mode,
            steps=self.steps,
            samples=self.samples,
            seconds=seconds,
            samples_per_s=self.samples / seconds,
            supervised_tokens_per_s=self.supervised / seconds,
            tokens_per_s=self.real / seconds,
            padding=1 - self.real / max(self.positions, 1),
            peak_memory_mb=peak_memory_mb(self.device),
            final_loss=loss,
            model_flops_per_s=self.model_flops() / seconds,
            dtype=dtype,
        )


def _packed(kwargs: dict) -> bool:
    return kwargs.get("attention_mask") is None and kwargs.get("position_ids") is not None


def packed_sample_lengths(position_ids, labels) -> list[int]:
    """Lengths of the samples in packed rows (positions restart per sample); the padding (no label) is left out."""
    from llava.constants import IGNORE_INDEX

    out = []
    for pos, lab in zip(position_ids.tolist(), labels.tolist()):
        starts = [0] + [i for i in range(1, len(pos)) if pos[i] - pos[i - 1] != 1] + [len(pos)]
        out += [b - a for a, b in zip(starts, starts[1:]) if any(x != IGNORE_INDEX for x in lab[a:b])]
    return out


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def _last_loss(trainer) -> float | None:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses[-1] if losses else None


# --------------------------------------------------------------------------------------------------------- ours
# Our stack's variants: extra flags of `llava.train.train`.
OURS_VARIANTS = {
    "ours": {},
    "ours_packed": {"packing": "True"},  # rows of --model_max_length; --packed-rows of them per step
    "ours_bf16": {"bf16": "True"},  # CPU: bf16 autocast (emulated without AVX512-BF16/AMX); fp32 weights, optimizer
}


def run_ours(spec: dict, mode: str = "ours") -> RunResult:
    from transformers import TrainerCallback

    from llava.train.llava_trainer import unwrap_llava
    from llava.train.train import train

    meter = Meter(spec["warmup"], spec["device"])

    class AttachMeter(TrainerCallback):  # the model exists once training starts
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            meter.attach(unwrap_llava(model))

    extra = dict(OURS_VARIANTS[mode])
    if mode == "ours_packed":
        extra["per_device_train_batch_size"] = str(spec["packed_rows"])
        extra["model_max_length"] = str(spec["pack_length"])
    flags = train_flags(spec, "OUT")
    for key, value in extra.items():
        if f"--{key}" in flags:
            flags[flags.index(f"--{key}") + 1] = value
        else:
            flags += [f"--{key}", value]
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as out:
        flags[flags.index("OUT")] = out
        trainer = train(flags, callbacks=[AttachMeter(), meter.callback()])
    dtype = "bfloat16" if trainer.args.bf16 else "float32"
    return meter.result(mode, _last_loss(trainer), dtype)


# ----------------------------------------------------------------------------------------------------- baseline
class PlainCollator:
    """Pads every batch to its longest sample, as the llava-hf recipes do: each `<image>` marker becomes the model's
    image token repeated once per image feature (labels ignored there), pixels are stacked."""

    def __init__(self, pad_id: int, image_id: int, image_tokens: int):
        self.pad_id, self.image_id, self.image_tokens = pad_id, image_id, image_tokens

    def __call__(self, instances):
        import torch

        from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

        rows = []
        for x in instances:
            ids, labels = [], []
            for t, lab in zip(x["input_ids"].tolist(), x["labels"].tolist()):
                if t == IMAGE_TOKEN_INDEX:
                    ids += [self.image_id] * self.image_tokens
                    labels += [IGNORE_INDEX] * self.image_tokens
                else:
                    ids.append(t)
                    labels.append(lab)
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(ids)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
        images = [im for x in instances for im in x.get("images", [])]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


def run_baseline(spec: dict) -> RunResult:
    import transformers

    from llava.model.convert_hf import build_hf_model
    from llava.train.args import parse_args
    from llava.train.data import DataCollatorForSupervisedDataset
    from llava.train.train import attach_vision, build_dataset, load_model, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as out:
        model_args, data_args, training_args = parse_args(train_flags(spec, out))
        transformers.set_seed(training_args.seed)
        # The same start as ours: our loader builds the LLaVA model (same seed, same projector init), then its
        # weights move into a `LlavaForConditionalGeneration`; the samples come from the same dataset class.
        tokenizer = load_tokenizer(model_args, training_args)
        ours = load_model(model_args, training_args, "sdpa")
        attach_vision(ours, model_args, data_args, training_args)
        dataset = build_dataset(tokenizer, ours, model_args, data_args, training_args)
        image_tokens = ours.get_vision_tower().num_patches
        parity_batch = [dataset[i] for i in range(min(len(dataset), spec["batch_size"]))]
        ours_loss = _loss(ours, DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(parity_batch))
        # Through a directory, as users get a llava-hf model: `build_hf_model` leaves non-persistent buffers (rotary
        # frequencies, position ids) unallocated, and `from_pretrained` builds them.
        build_hf_model(ours, tokenizer).save_pretrained(os.path.join(out, "hf"))
        del ours
        model = transformers.LlavaForConditionalGeneration.from_pretrained(os.path.join(out, "hf"), dtype="float32")
        model.config.use_cache = False
        model.config._attn_implementation = "sdpa"
        model.model.vision_tower.requires_grad_(False)  # stage 2: the tower is frozen, projector and LLM learn
        collator = PlainCollator(tokenizer.pad_token_id, model.config.image_token_id, image_tokens)
        # llava-hf's vocabulary has one more entry (`<image>`); the loss over the shared vocabulary must be ours.
        parity = abs(_loss(model, collator(parity_batch), vocab=len(tokenizer) - 1) - ours_loss)
        hf_args = transformers.TrainingArguments(
            output_dir=out,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1,
            learning_rate=2e-5,
            weight_decay=0.0,
            warmup_steps=0.03,
            lr_scheduler_type="cosine",
            logging_steps=spec["steps"],
            save_strategy="no",
            dataloader_num_workers=0,
            report_to="none",
            seed=spec["seed"],
            disable_tqdm=True,
            remove_unused_columns=False,
            bf16=spec["device"] == "cuda",
            use_cpu=spec["device"] != "cuda",
        )
        meter = Meter(spec["warmup"], spec["device"])
        meter.attach(model, model.model.language_model)
        trainer = transformers.Trainer(
            model=model, args=hf_args, train_dataset=dataset, data_collator=collator, callbacks=[meter.callback()]
        )
        trainer.train()
    result = meter.result("baseline", _last_loss(trainer))
    result.start_loss_diff = parity
    return result


def _loss(model, batch, vocab: int | None = None) -> float:
    """The loss of `batch` at the starting weights (eval mode, no gradient); over the first `vocab` logits only
    when given."""
    import torch

    from llava.constants import IGNORE_INDEX

    model.eval()
    with torch.no_grad():
        if vocab is None:
            loss = float(model(**batch).loss)
        else:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[..., :vocab].float()
            loss = float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
                )
            )
    model.train()
    return loss


# ---------------------------------------------------------------------------------------------------------- MFU
def mfu_flops(shape: dict, batch: int, text_len: int, images_per_sample: int = 1) -> dict:
    """Model FLOPs of one stage-2 training step (PaLM's convention: matmul FLOPs, no recomputation counted).

    Decoder (trains): 6 x (non-embedding parameters + lm_head) per token, plus attention 12 x layers x hidden x
    sequence length per token. Projector (trains): 6 x its parameters per image token. Vision tower (frozen, forward
    only): 2 x its parameters per patch token plus 4 x layers x hidden x patches per patch token.
    """
    d, t = shape["decoder"], shape["tower"]
    h, inter, layers = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    kv = d["num_key_value_heads"] * h // d["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    dec_params = layers * per_layer + h * d["vocab_size"]  # + lm_head
    patches = (t["image_size"] // t["patch_size"]) ** 2
    seq = text_len + images_per_sample * patches
    tokens = batch * seq
    decoder = 6 * dec_params * tokens + 12 * layers * h * seq * tokens
    th, tl = t["hidden_size"], t["num_hidden_layers"]
    tower_params = tl * (4 * th * th + 2 * th * t["intermediate_size"])
    image_tokens = batch * images_per_sample * (patches + 1)
    tower = 2 * tower_params * image_tokens + 4 * tl * th * (patches + 1) * image_tokens
    proj_params = th * h + h * h
    projector = 6 * proj_params * batch * images_per_sample * patches
    return {
        "tokens": tokens,
        "seq_len": seq,
        "decoder": decoder,
        "tower": tower,
        "projector": projector,
        "total": decoder + tower + projector,
    }


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def run_mfu(spec: dict) -> dict:
    """Time stage-2 steps (forward, backward, SGD update) of a random-weight LLaVA of `spec["mfu_shape"]`."""
    import importlib.util

    import torch
    from transformers import CLIPVisionConfig

    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    shape = MFU_SHAPES[spec["mfu_shape"]]
    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    attn = "flash_attention_2" if flash else "sdpa"
    tower = CLIPVisionConfig(**shape["tower"])
    config = LlavaConfig(
        **shape["decoder"],
        mm_vision_tower="random-clip",
        mm_vision_tower_config=tower.to_dict(),
        mm_hidden_size=tower.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        tokenizer_model_max_length=shape["decoder"]["max_position_embeddings"],
        use_cache=False,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlavaLlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.get_vision_tower().requires_grad_(False)
    model.get_vision_tower().is_loaded = True
    if spec["mfu_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, text_len = spec["mfu_batch"], spec["mfu_text_len"]
    vocab = shape["decoder"]["vocab_size"]
    ids = torch.randint(3, vocab, (batch, text_len), device=device)
    ids[:, 8] = IMAGE_TOKEN_INDEX  # the image after a short system prompt, as in the v1 template
    labels = ids.clone()
    labels[:, : text_len // 2] = IGNORE_INDEX  # replies are supervised, the prompt is not
    side = shape["tower"]["image_size"]
    images = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        loss = model(input_ids=ids, labels=labels, images=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(spec["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    flops = mfu_flops(shape, batch, text_len - 1)  # the marker itself becomes the patches
    step_s = bc.median(times)
    achieved = flops["total"] / step_s
    peak = peak_tflops(spec["device"], spec["peak_tflops"])
    return {
        "shape": spec["mfu_shape"],
        "attention": attn,
        "dtype": str(dtype),
        "batch": batch,
        "seq_len": flops["seq_len"],
        "gradient_checkpointing": spec["mfu_checkpointing"],
        "step_s": step_s,
        "tokens_per_s": flops["tokens"] / step_s,
        "model_tflops_per_step": flops["total"] / 1e12,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_memory_mb": peak_memory_mb(spec["device"]),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    }


# ---------------------------------------------------------------------------------------------------------- main
def run_trl(spec: dict) -> RunResult:
    from train_trl import run_trl_recipe

    return run_trl_recipe(spec, Meter(spec["warmup"], spec["device"]), train_flags, _loss, _last_loss)


RUNNERS = {
    **{mode: (lambda spec, mode=mode: run_ours(spec, mode)) for mode in OURS_VARIANTS},
    "baseline": run_baseline,
    "trl": run_trl,
    "mfu": run_mfu,
}
STACK_NAMES = {
    "ours": "ours: `llava.train.train`",
    "ours_packed": "ours, `--packing True`",
    "ours_bf16": "ours, `--bf16 True`",
    "baseline": "HF `LlavaForConditionalGeneration` + `Trainer`",
    "trl": "TRL `SFTTrainer` + `LlavaForConditionalGeneration` (seed-003 recipe)",
}


def child(mode: str, spec: dict) -> int:
    """Run one measurement in this process and print it as the last line (`RESULT {...}`)."""
    import logging

    from llava.runtime import configure_threads

    logging.disable(logging.WARNING)
    configure_threads(spec["threads"] or None)
    result = RUNNERS[mode](spec)
    print("RESULT " + json.dumps(result if isinstance(result, dict) else asdict(result)), flush=True)
    return 0


def spawn(mode: str, spec: dict, log_dir: str, index: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.update(bc.thread_env(spec["threads"]))
    log = os.path.join(log_dir, f"{index:02d}-{mode}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--spec", json.dumps(spec)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    lines = [ln for ln in open(log).read().splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "".join(open(log).readlines()[-30:])
        raise RuntimeError(f"The `{mode}` run failed (rc {proc.returncode}); log {log}:\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help=f"Model sizes: {', '.join(bc.PRESETS)}.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads", type=int, default=1, help="Intra-op threads per run on CPU (0: llava.runtime's policy)."
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=640,
        help="Demo dataset size (plus 10%% text-only records): enough records that length grouping finds batches "
        "of similar lengths, as it does on a real dataset (at 160, one batch holds all text-only records).",
    )
    p.add_argument(
        "--data-mix",
        default="llava665k",
        choices=["llava665k", "demo"],
        help="Stage-2 record shapes (llava.demo.data.generate): llava665k varies kinds and lengths as "
        "llava_v1_5_mix665k does; demo is what the demo trains on (every record 3-6 turns).",
    )
    p.add_argument("--batch-size", type=int, default=16, help="Per device, as scripts/v1_5/finetune.sh.")
    p.add_argument(
        "--steps",
        type=int,
        default=22,
        help="Steps per run, warm-up included (default: half an epoch of the default data; each stack draws its own "
        "batches, ours with the longest one first).",
    )
    p.add_argument("--warmup-steps", type=int, default=0, help="Steps not timed at the start of each run.")
    p.add_argument("--rounds", type=int, default=2, help="Alternating rounds over the stacks; medians are reported.")
    p.add_argument(
        "--stacks",
        default=",".join(STACK_NAMES),
        help=f"Comma-separated stacks to run, in round order (default: all): {', '.join(STACK_NAMES)}.",
    )
    p.add_argument(
        "--packed-rows",
        type=int,
        default=4,
        help="Rows per step for ours_packed (4 rows of 1,024 positions hold about as many samples as a batch of 16 "
        "of the llava665k mix at the small preset).",
    )
    p.add_argument(
        "--pack-length",
        type=int,
        default=1024,
        help="ours_packed's --model_max_length, the row length: no sample of the small preset's data is longer "
        "(760 tokens at most), so nothing is cut; SDPA's packed mask costs row length squared per row.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="Where data and models go (default: a temp dir).")
    p.add_argument("--json-out", default=None)
    p.add_argument("--mfu", action="store_true", help="Also measure MFU of a stage-2 step (GPU; see --mfu-shape).")
    p.add_argument("--mfu-only", action="store_true", help="Only the MFU measurement.")
    p.add_argument("--mfu-shape", default="7b", choices=sorted(MFU_SHAPES))
    p.add_argument("--mfu-batch", type=int, default=2, help="Samples per MFU step (raise it if memory allows).")
    p.add_argument("--mfu-text-len", type=int, default=1472, help="Text tokens per sample (plus 576 image tokens).")
    p.add_argument("--mfu-checkpointing", action="store_true", help="Gradient checkpointing in the MFU run.")
    p.add_argument("--peak-tflops", type=float, default=None, help="Peak bf16 TFLOP/s (default: by GPU name).")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stacks = [m.strip() for m in args.stacks.split(",") if m.strip()]
    unknown = [m for m in args.stacks if m not in STACK_NAMES]
    if unknown or not args.stacks:
        p.error(f"--stacks: unknown {unknown}; choose from {', '.join(STACK_NAMES)}.")
    if args.warmup_steps >= args.steps:
        p.error(f"--warmup-steps {args.warmup_steps} must be below --steps {args.steps}.")
    return args


def measure_machine(threads: int | None) -> dict:
    """The roofline of this run: GEMM peaks at fp32 and bf16 and the memory bandwidth, at the runs' thread count."""
    import torch

    roof = bc.roofline("float32", threads)
    roof["gemm_flops_bfloat16"] = bc.gemm_peak_flops("bfloat16", threads) if torch.backends.mkldnn.is_available() else 0
    return roof


def run_stacks(args, spec: dict, log_dir: str, report: dict, failures: list[str]) -> None:
    """Alternating rounds over the stacks, medians, ratios, the shared-start loss check and CPU MFU."""
    stacks = args.stacks
    roof = measure_machine(spec["threads"] or None) if args.device == "cpu" else {}
    if roof:
        print(
            f"roofline ({spec['threads'] or 'default'} threads): GEMM {roof['gemm_flops'] / 1e9:.1f} GFLOP/s fp32, "
            f"{roof['gemm_flops_bfloat16'] / 1e9:.1f} GFLOP/s bf16; memory {roof['read_bytes_per_s'] / 1e9:.1f} "
            f"GB/s read, {roof['copy_bytes_per_s'] / 1e9:.1f} GB/s copy\n",
            flush=True,
        )
    runs = []
    for r in range(args.rounds):
        # Each round its own training seed (sample order, projector init), the same for every stack.
        round_spec = {**spec, "seed": args.seed + r}
        for mode in stacks if r % 2 == 0 else stacks[::-1]:
            result = spawn(mode, round_spec, log_dir, len(runs))
            runs.append(result)
            print(
                f"round {r} {mode:11s} {result['samples_per_s']:7.2f} samples/s "
                f"{result['supervised_tokens_per_s']:8.1f} supervised tok/s  padding {100 * result['padding']:5.1f}%"
                f"  peak {result['peak_memory_mb']:7.0f} MiB  loss {result['final_loss']}",
                flush=True,
            )
    keys = (
        "samples_per_s",
        "supervised_tokens_per_s",
        "tokens_per_s",
        "padding",
        "peak_memory_mb",
        "model_flops_per_s",
    )
    med = {m: {k: bc.median([x[k] for x in runs if x["mode"] == m]) for k in keys} for m in stacks}
    for m in stacks:
        dtype = next(x["dtype"] for x in runs if x["mode"] == m)
        peak = roof.get("gemm_flops" if dtype == "float32" else "gemm_flops_bfloat16")
        med[m]["mfu"] = med[m]["model_flops_per_s"] / peak if peak else None
    rows = [
        [
            STACK_NAMES[m],
            f"{v['samples_per_s']:.2f}",
            f"{v['supervised_tokens_per_s']:.0f}",
            f"{v['tokens_per_s']:.0f}",
            f"{100 * v['padding']:.1f}%",
            f"{v['peak_memory_mb']:.0f}",
            f"{v['model_flops_per_s'] / 1e9:.2f}",
            "-" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%",
        ]
        for m, v in med.items()
    ]
    print(f"\n## Training throughput ({args.preset} model, batch {args.batch_size}, medians of {args.rounds} rounds)\n")
    header = ["stack", "samples/s", "supervised tok/s", "tok/s (non-pad)", "padding", "peak MiB", "GFLOP/s", "MFU"]
    print(bc.table(rows, header))
    ratios = {
        f"{a} / {b}": med[a]["samples_per_s"] / med[b]["samples_per_s"]
        for a, b in (
            ("ours", "baseline"),
            ("ours", "trl"),
            ("ours_packed", "trl"),
            ("ours_packed", "ours"),
            ("ours_bf16", "ours"),
        )
        if a in med and b in med
    }
    print("\nsamples/s ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    report.update(runs=runs, medians=med, ratios=ratios, roofline=roof)
    if "ours" in med and "baseline" in med:
        report["ratio"] = ratios["ours / baseline"]
        report["token_ratio"] = med["ours"]["tokens_per_s"] / med["baseline"]["tokens_per_s"]
    diffs = [x["start_loss_diff"] for x in runs if x.get("start_loss_diff") is not None]
    if diffs:
        diff = max(diffs)
        parity_ok = diff <= LOSS_PARITY_TOL
        print(f"same loss at the shared start (one batch, ours vs each peer): {parity_ok} (|difference| {diff:.2e})")
        report["start_loss_diff"] = diff
        if not parity_ok:
            failures.append(f"a peer disagrees with ours on the starting loss by {diff:.2e} (> {LOSS_PARITY_TOL})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.spec))
    if args.device == "cpu" and args.threads:
        import torch

        torch.set_num_threads(args.threads)  # what `machine()` reports; each run sets its own the same way
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="llava-bench-train-")
    os.makedirs(args.work_dir, exist_ok=True)
    log_dir = os.path.join(args.work_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    spec = {
        "device": args.device,
        "threads": args.threads if args.device == "cpu" else 0,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup_steps,
        "seed": args.seed,
        "mfu_shape": args.mfu_shape,
        "mfu_batch": args.mfu_batch,
        "mfu_text_len": args.mfu_text_len,
        "mfu_checkpointing": args.mfu_checkpointing,
        "peak_tflops": args.peak_tflops,
        "packed_rows": args.packed_rows,
        "pack_length": args.pack_length,
    }
    print(f"# Training benchmark\nmachine: {bc.machine()}\nargs: {vars(args)}\n", flush=True)
    report: dict = {"machine": bc.machine(), "args": vars(args)}
    failures: list[str] = []

    if not args.mfu_only:
        spec.update(prepare(args))
        run_stacks(args, spec, log_dir, report, failures)

    if args.mfu or args.mfu_only:
        if args.device != "cuda" and args.mfu_shape == "7b":
            print("\nMFU: needs --device cuda for the 7B shape (use --mfu-shape tiny to try the code path on CPU).")
        else:
            mfu = spawn("mfu", spec, log_dir, 99)
            report["mfu"] = mfu
            print(f"\n## MFU: stage-2 step, {mfu['shape']} shape\n")
            rows = [[k, v] for k, v in mfu.items()]
            print(bc.table(rows, ["field", "value"]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
