"""The demo's steps: each runs one stage of the pipeline (data, backbones, warm-ups, LLaVA stage 1 and 2 through
`llava.train.train`, evaluation through `llava.eval.model_vqa_loader`, loss curves) and records its outputs on a `Run`.

`llava.demo.pipeline` holds the configuration and runs these in order; the training and evaluation command lines
here are the LLaVA-1.5 scripts' flags.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llava.demo.data import PathUnder

if TYPE_CHECKING:
    from llava.demo.pipeline import DemoConfig

ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


class StepFailed(RuntimeError):
    """A pipeline step (a subprocess) failed; the message names the command and its log."""


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in ENV.items():
        env.setdefault(key, value)
    return env


def run_logged(cmd: Sequence[str], log_path: str, echo: bool = True) -> str:
    """Run `cmd`, streaming its output to the terminal (progress bars included) and to `log_path`; returns it."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    printable = " ".join(cmd)
    log(f"$ {printable}")
    chunks = []
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
        assert proc.stdout is not None
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            logf.write(chunk)
            chunks.append(chunk)
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        code = proc.wait()
    output = b"".join(chunks).decode(errors="replace")
    if code != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise StepFailed(f"`{printable}` exited with status {code}. Last lines (full log: {log_path}):\n{tail}")
    return output


def trainer_losses(output_dir: str, log_text: str = "") -> list[tuple[float, float]]:
    """(step, loss) pairs of a Trainer run: from `trainer_state.json` when written, else from the printed logs."""
    candidates = [os.path.join(output_dir, "trainer_state.json")]
    if os.path.isdir(output_dir):
        checkpoints = sorted(
            (d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)), key=lambda d: int(d[11:])
        )
        candidates += [os.path.join(output_dir, d, "trainer_state.json") for d in reversed(checkpoints)]
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as f:
                history = json.load(f).get("log_history", [])
            points = [(float(h["step"]), float(h["loss"])) for h in history if "loss" in h and "step" in h]
            if points:
                return points
    # Trainer prints `{'loss': '1.234', 'grad_norm': ..., 'learning_rate': ..., 'epoch': ...}` per logging step.
    points = []
    for match in re.finditer(r"\{'loss': '?([0-9.eE+-]+)'?", log_text):
        points.append((float(len(points) + 1), float(match.group(1))))
    return points


@dataclass
class Paths:
    """Where the demo writes: the dataset under `data`, everything trained under `out`."""

    data: str
    out: str

    def __post_init__(self):
        self.data = os.path.abspath(self.data)
        self.out = os.path.abspath(self.out)

    decoder = PathUnder("backbones", "tiny-llama", base="out")
    clip = PathUnder("backbones", "tiny-clip", base="out")
    stage1 = PathUnder("llava-tiny-pretrain", base="out")
    stage2 = PathUnder("llava-tiny", base="out")
    eval_dir = PathUnder("eval", base="out")
    logs = PathUnder("logs", base="out")


@dataclass
class Run:
    """One demo run: its configuration, where it writes, and what its steps measured (timings, loss curves)."""

    config: DemoConfig
    paths: Paths
    python: str = sys.executable
    timings: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def timed(self, name: str, fn, *args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[name] = time.time() - start
            log(f"{name}: {self.timings[name]:.1f}s")


def step_data(run: Run):
    from llava.demo.data import generate

    c = run.config
    log(f"generating the dataset in {run.paths.data} ({c.train_images} training images, seed {c.seed})")
    return generate(run.paths.data, c.train_images, c.eval_per_category, seed=c.seed)


def tokenizer_texts(dataset) -> list[str]:
    """The dataset's text as the decoder will see it: stage-2 records rendered in the v1 template, and captions."""
    from llava.conversation import get_conv_template

    with open(dataset.finetune_json) as f:
        finetune = json.load(f)
    with open(dataset.pretrain_json) as f:
        pretrain = json.load(f)
    texts = []
    for record in finetune:
        conv = get_conv_template("vicuna_v1")
        for message in record["conversations"]:
            role = conv.roles[0] if message["from"] == "human" else conv.roles[1]
            conv.append_message(role, message["value"].replace("<image>", "").strip())
        texts.append(conv.get_prompt())
    texts += [next(m["value"] for m in r["conversations"] if m["from"] == "gpt") for r in pretrain]
    return texts


def step_backbones(run: Run, dataset) -> None:
    """Tokenizer trained on the dataset's text, a tiny LLaMA decoder and a tiny CLIP, as ordinary HF dirs."""
    from llava.demo import backbones

    c = run.config
    texts = tokenizer_texts(dataset)
    tokenizer = backbones.build_tokenizer(run.paths.decoder, texts, vocab_size=c.sizes.vocab_size)
    backbones.build_decoder(run.paths.decoder, tokenizer, family="llama", sizes=c.sizes, seed=c.seed)
    backbones.build_vision_tower(run.paths.clip, sizes=c.sizes, seed=c.seed, position_std=c.position_std)
    log(f"tokenizer ({len(tokenizer)} pieces) + decoder -> {run.paths.decoder}; CLIP -> {run.paths.clip}")


def decoder_documents(dataset) -> list[str]:
    """The dataset's text as a plain corpus: each stage-2 record's messages in order (no chat template, no image
    marker), and each caption."""
    documents = []
    for path in (dataset.finetune_json, dataset.pretrain_json):
        with open(path) as f:
            for record in json.load(f):
                messages = record["conversations"][1:] if path == dataset.pretrain_json else record["conversations"]
                documents.append("\n".join(m["value"].replace("<image>", "").strip() for m in messages))
    return documents


def step_warmup(run: Run, dataset) -> None:
    """Demo-only: the tiny decoder reads the dataset's text, the tiny vision tower learns to see what the captions
    say (stand-ins for the pretraining behind Vicuna and CLIP)."""
    from llava.demo import warmup
    from llava.demo.data import CATEGORIES

    c = run.config
    history = warmup.pretrain_decoder(
        run.paths.decoder, decoder_documents(dataset), c.decoder_warmup_steps, lr=c.decoder_warmup_lr, seed=c.seed
    )
    run.curves["warm-up: tiny decoder on the text (demo only)"] = [(h["step"], h["loss"]) for h in history]
    items = warmup.scene_items(dataset.scenes, dataset.image_folder)
    options = {k: list(v) for k, v in CATEGORIES.items()}
    history = warmup.pretrain_vision_tower(
        run.paths.clip,
        items,
        options,
        c.tower_warmup_steps,
        lr=c.tower_warmup_lr,
        seed=c.seed,
        cells=warmup.scene_cells(dataset.scenes) if c.tower_patch_targets else None,
    )
    run.curves["warm-up: tiny vision tower (demo only)"] = [(h["step"], h["loss"]) for h in history]


def _common_train_flags(run: Run) -> list[str]:
    c = run.config
    return [
        "--model_name_or_path", run.paths.decoder,
        "--vision_tower", run.paths.clip,
        "--image_folder", os.path.join(run.paths.data, "images"),
        "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-2",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--model_max_length", str(c.model_max_length),
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True",
        "--seed", str(c.seed),
        "--report_to", "none",
    ]  # fmt: skip


def step_stage1(run: Run, dataset) -> None:
    c = run.config
    cmd = [
        run.python, "-m", "llava.train.train",
        *_common_train_flags(run),
        "--version", "plain",
        "--data_path", dataset.pretrain_json,
        "--tune_mm_mlp_adapter", "True",
        "--output_dir", run.paths.stage1,
        "--num_train_epochs", str(c.stage1_epochs),
        "--per_device_train_batch_size", str(c.stage1_batch_size),
        "--learning_rate", str(c.stage1_lr),
    ]  # fmt: skip
    output = run_logged(cmd, os.path.join(run.paths.logs, "stage1.log"))
    projector = os.path.join(run.paths.stage1, "mm_projector.bin")
    if not os.path.isfile(projector):
        raise StepFailed(f"Stage 1 finished but wrote no `{projector}`; files: {os.listdir(run.paths.stage1)}.")
    run.curves["stage 1: projector (plain captions)"] = trainer_losses(run.paths.stage1, output)


def step_stage2(run: Run, dataset) -> None:
    c = run.config
    cmd = [
        run.python, "-m", "llava.train.train",
        *_common_train_flags(run),
        "--version", "v1",
        "--data_path", dataset.finetune_json,
        "--pretrain_mm_mlp_adapter", os.path.join(run.paths.stage1, "mm_projector.bin"),
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        "--output_dir", run.paths.stage2,
        "--num_train_epochs", str(c.stage2_epochs),
        "--per_device_train_batch_size", str(c.stage2_batch_size),
        "--learning_rate", str(c.stage2_lr),
    ]  # fmt: skip
    output = run_logged(cmd, os.path.join(run.paths.logs, "stage2.log"))
    run.curves["stage 2: decoder + projector (v1 instructions)"] = trainer_losses(run.paths.stage2, output)


def eval_args(run: Run, question_file: str, answers_file: str) -> list[str]:
    """model_vqa_loader's flags (the LLaVA-1.5 short-answer benchmarks' script), greedy, batched."""
    return [
        "--model-path", run.paths.stage2,
        "--question-file", question_file,
        "--image-folder", os.path.join(run.paths.data, "images"),
        "--answers-file", answers_file,
        "--conv-mode", "vicuna_v1",
        "--temperature", "0",
        "--max_new_tokens", "16",
        "--batch-size", "50",
        "--num-workers", "0",
        "--overwrite",
    ]  # fmt: skip


def step_eval(run: Run, dataset) -> dict:
    """Answer the held-out questions with `llava.eval.model_vqa_loader` (real images, blank images, text only) and
    score them. The model is loaded once and handed to the script's `eval_model` for the three question files."""
    from llava.demo import score
    from llava.eval import model_vqa_loader
    from llava.eval.runner import load_engine

    os.makedirs(run.paths.eval_dir, exist_ok=True)
    truth = {row["question_id"]: row for row in score.read_jsonl(dataset.eval_answers)}
    files = {
        "trained": dataset.eval_questions,
        "blank": dataset.eval_questions_blank,
        "text": dataset.eval_questions_text,
    }
    engine = None
    columns: dict[str, dict] = {}
    for name, questions in files.items():
        answers = os.path.join(run.paths.eval_dir, f"answers_{name}.jsonl")
        argv = eval_args(run, questions, answers)
        log(f"$ python -m llava.eval.model_vqa_loader {' '.join(argv)}")
        args = model_vqa_loader.build_parser().parse_args(argv)
        engine = engine or load_engine(args)
        model_vqa_loader.eval_model(args, engine)
        scores = score.score(score.read_jsonl(answers), truth)
        if name == "text":
            columns["trained"].update(scores)  # no image involved: one column
        else:
            columns[name] = scores
    table = score.format_table(columns)
    print("\n" + table + "\n", flush=True)
    image = score.IMAGE_QUESTIONS
    return {
        "table": table,
        "accuracy": {name: {k: v.accuracy for k, v in col.items()} for name, col in columns.items()},
        "n": {k: v.n for k, v in columns["trained"].items()},
        "chance": {k: v.chance for k, v in columns["trained"].items() if v.chance == v.chance},
        "trained": columns["trained"][image].accuracy,
        "blank": columns["blank"][image].accuracy,
        "chance_level": columns["trained"][image].chance,
    }


def step_plot(run: Run) -> str:
    from llava.demo.plot import Panel, save_loss_curves

    path = os.path.join(run.paths.out, "loss_curve.png")
    panels = [Panel(name, points) for name, points in run.curves.items()]
    save_loss_curves(panels, path, "Tiny LLaVA demo: training loss per step")
    log(f"loss curves -> {path}")
    return path
