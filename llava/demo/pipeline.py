"""The embedded default, end to end on CPU: synthetic data -> tiny backbones -> LLaVA stage 1 -> stage 2 -> eval
(trained vs blank images vs chance) -> loss curves -> controller + model worker + Gradio web server.

    python -m llava.demo                 # the whole thing, then serves the trained model at http://127.0.0.1:7860
    python -m llava.demo --no-serve      # stop after the accuracy table
    python -m llava.demo --preset quick --no-serve   # a reduced run (what tests/test_demo.py runs)

Training, evaluation and serving go through the project's real entry points, as subprocesses, with the flags of the
LLaVA-1.5 scripts: `llava.train.train` (stage 1 `--version plain --tune_mm_mlp_adapter True`, stage 2 `--version v1
--pretrain_mm_mlp_adapter .../mm_projector.bin`), `llava.eval.model_vqa_loader` (its `eval_model`, model loaded once), `llava.serve.controller`,
`llava.serve.model_worker` and `llava.serve.gradio_web_server`. Two warm-ups that the real recipe does not have
stand in for the pretraining behind Vicuna and CLIP (see `llava/demo/warmup.py` and docs/Demo.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from llava.demo.backbones import TinySizes
from llava.runtime import add_threads_argument, configure_threads
from llava.serve.launch import free_port  # `preferred` when free, else one the OS picks (importable from here too)

ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def _demo_sizes() -> TinySizes:
    return TinySizes(
        vocab_size=600,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        vision_hidden_size=64,
        vision_layers=3,
        vision_heads=4,
        image_size=48,
        patch_size=16,
    )


@dataclass
class DemoConfig:
    """Every number of the demo. Presets in `PRESETS` fill them; the command line can override any."""

    train_images: int = 8000
    eval_per_category: int = 50
    seed: int = 0
    sizes: TinySizes = field(default_factory=_demo_sizes)
    # demo-only warm-ups: the tiny decoder reads the dataset's text (a stand-in for Vicuna's pretraining), the tiny
    # vision tower learns to see the scenes' attributes (a stand-in for CLIP's)
    decoder_warmup_steps: int = 150
    decoder_warmup_lr: float = 3e-3
    tower_warmup_steps: int = 600
    tower_warmup_lr: float = 3e-3
    position_std: float = 1.0
    # per-patch targets in the tower warm-up (which cell / colour each patch shows): position survives into the
    # image tokens; 0 trains on the mean patch feature only (what the first version of the demo did)
    tower_patch_targets: int = 1
    # stage 1: projector only, frozen decoder and tower (LLaVA-1.5: 1 epoch, batch 256, lr 1e-3)
    stage1_epochs: float = 1.0
    stage1_batch_size: int = 32
    stage1_lr: float = 1e-3
    # stage 2: decoder + projector, frozen tower (LLaVA-1.5: 1 epoch, batch 128, lr 2e-5)
    stage2_epochs: float = 2.0
    stage2_batch_size: int = 16
    stage2_lr: float = 2e-3
    model_max_length: int = 512
    # acceptance: trained accuracy on image questions, and how far above chance blank images may score
    min_accuracy: float = 0.90
    max_blank_over_chance: float = 0.10


PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    # the reduced run of tests/test_demo.py (about 100 s): a quarter of the images and half the stage-2 steps, enough
    # to beat the blank-image ablation by a wide margin (about 78 % vs 32 %), not to reach the default's 90 %
    "quick": DemoConfig(
        train_images=2000,
        eval_per_category=20,
        decoder_warmup_steps=80,
        tower_warmup_steps=300,
        stage1_epochs=1.0,
        stage2_epochs=4.0,
        min_accuracy=0.0,
        max_blank_over_chance=1.0,
    ),
}


# --------------------------------------------------------------------------------------------------------- helpers


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


# ------------------------------------------------------------------------------------------------------------ steps


@dataclass
class Paths:
    """Where the demo writes: the dataset under `data`, everything trained under `out`."""

    data: str
    out: str

    def __post_init__(self):
        self.data = os.path.abspath(self.data)
        self.out = os.path.abspath(self.out)

    @property
    def decoder(self) -> str:
        return os.path.join(self.out, "backbones", "tiny-llama")

    @property
    def clip(self) -> str:
        return os.path.join(self.out, "backbones", "tiny-clip")

    @property
    def stage1(self) -> str:
        return os.path.join(self.out, "llava-tiny-pretrain")

    @property
    def stage2(self) -> str:
        return os.path.join(self.out, "llava-tiny")

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.out, "eval")

    @property
    def logs(self) -> str:
        return os.path.join(self.out, "logs")


@dataclass
class Run:
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


# ---------------------------------------------------------------------------------------------------------- serving


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, method: str = "GET") -> bytes:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StepFailed(f"The process serving {url} exited with status {proc.returncode}.")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            last = err
            time.sleep(0.5)
    raise StepFailed(f"{url} did not answer within {timeout:.0f}s ({last}).")


class Servers:
    """Controller, model worker and Gradio web server as child processes; stopped together."""

    def __init__(self, run: Run, host: str, web_port: int):
        self.run = run
        self.host = host
        self.controller_port = free_port(10000, host)
        self.worker_port = free_port(40000, host)
        self.web_port = free_port(web_port, host)
        self.procs: list[tuple[str, subprocess.Popen]] = []

    @property
    def controller_url(self) -> str:
        return f"http://{self.host}:{self.controller_port}"

    @property
    def worker_url(self) -> str:
        return f"http://{self.host}:{self.worker_port}"

    @property
    def web_url(self) -> str:
        return f"http://{self.host}:{self.web_port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        cmd = [self.run.python, "-m", f"llava.serve.{name}", *args]
        log(f"$ {' '.join(cmd)}")
        logf = open(os.path.join(self.run.paths.logs, f"{name}.log"), "wb")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self, timeout: float = 180) -> None:
        os.makedirs(self.run.paths.logs, exist_ok=True)
        controller = self._start("controller", ["--host", self.host, "--port", str(self.controller_port)])
        _wait_http(f"{self.controller_url}/list_models", timeout, controller, method="POST")
        worker = self._start(
            "model_worker",
            [
                "--host", self.host,
                "--port", str(self.worker_port),
                "--controller", self.controller_url,
                "--worker", self.worker_url,
                "--model-path", self.run.paths.stage2,
                "--device", "cpu",
            ],
        )  # fmt: skip
        name = os.path.basename(self.run.paths.stage2)
        deadline = time.time() + timeout
        while name not in json.loads(_wait_http(f"{self.controller_url}/list_models", 30, worker, "POST")).get(
            "models", []
        ):
            if time.time() > deadline:
                raise StepFailed(f"The model worker did not register `{name}` within {timeout:.0f}s.")
            time.sleep(0.5)
        web = self._start(
            "gradio_web_server",
            [
                "--host", self.host,
                "--port", str(self.web_port),
                "--controller-url", self.controller_url,
                "--model-list-mode", "reload",
                "--log-dir", os.path.join(self.run.paths.out, "serve_logs"),
            ],
        )  # fmt: skip
        _wait_http(self.web_url + "/", timeout, web)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


# ------------------------------------------------------------------------------------------------------------- main


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def check(results: dict, config: DemoConfig) -> list[str]:
    """The acceptance checks that failed (empty when the demo did what it promises)."""
    failures = []
    if results["trained"] < config.min_accuracy:
        failures.append(
            f"trained accuracy on image questions {100 * results['trained']:.1f}% < {100 * config.min_accuracy:.0f}%"
        )
    limit = results["chance_level"] + config.max_blank_over_chance
    if results["blank"] > limit:
        failures.append(f"blank-image accuracy {100 * results['blank']:.1f}% > chance + margin {100 * limit:.1f}%")
    return failures


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, DemoConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m llava.demo", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--data-dir", default="playground/data/demo", help="where the dataset is written")
    parser.add_argument("--output-dir", default="checkpoints/demo", help="where backbones and checkpoints go")
    parser.add_argument("--no-serve", action="store_true", help="stop after evaluation instead of serving")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860, help="web UI port (another free one if taken)")
    parser.add_argument("--serve-only", action="store_true", help="serve an already trained demo model")
    add_threads_argument(parser)  # every step: this process and, through OMP_NUM_THREADS, the subprocesses
    for f in dataclasses.fields(DemoConfig):
        if f.name == "sizes":
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DemoConfig)
        if f.name != "sizes" and getattr(args, f.name) is not None
    }
    config = dataclasses.replace(PRESETS[args.preset], **overrides)
    return args, config


def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_args(argv)
    threads = configure_threads(args.threads)  # exported as OMP_NUM_THREADS: the training subprocesses use it too
    log(f"{threads} intra-op thread(s) per step (llava.runtime's policy; --threads overrides)")
    run = Run(config, Paths(args.data_dir, args.output_dir))
    start = time.time()
    if not args.serve_only:
        if os.path.isdir(run.paths.out):
            shutil.rmtree(run.paths.out)
        os.makedirs(run.paths.logs, exist_ok=True)
        with open(os.path.join(run.paths.out, "demo_config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=1)
        steps = 7
        log(f"step 1/{steps}: synthetic dataset")
        dataset = run.timed("data", step_data, run)
        log(f"step 2/{steps}: tiny backbones (tokenizer trained on the dataset's text, LLaMA decoder, CLIP)")
        run.timed("backbones", step_backbones, run, dataset)
        log(
            f"step 3/{steps}: demo-only warm-ups of the tiny decoder and tower (stand-ins for Vicuna's and CLIP's pretraining)"
        )
        run.timed("warm-up", step_warmup, run, dataset)
        log(f"step 4/{steps}: LLaVA stage 1, feature alignment (projector only) via llava.train.train")
        run.timed("stage 1", step_stage1, run, dataset)
        log(f"step 5/{steps}: LLaVA stage 2, visual instruction tuning via llava.train.train")
        run.timed("stage 2", step_stage2, run, dataset)
        log(f"step 6/{steps}: held-out evaluation via llava.eval.model_vqa_loader (real images, blank images, text)")
        results = run.timed("eval", step_eval, run, dataset)
        log(f"step 7/{steps}: loss curves")
        results["loss_curve"] = step_plot(run)
        results["timings"] = {**run.timings, "total": time.time() - start}
        with open(os.path.join(run.paths.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(
            f"\nImage-dependent questions: trained {100 * results['trained']:.1f}%, blank images "
            f"{100 * results['blank']:.1f}%, chance {100 * results['chance_level']:.1f}%.",
            flush=True,
        )
        log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in results["timings"].items()))
        failures = check(results, config)
        for failure in failures:
            log(f"CHECK FAILED: {failure}")
        if not failures:
            log("checks passed: the answers come from the image, and they are right")
    else:
        failures = []
    if args.no_serve:
        return 1 if failures else 0
    servers = Servers(run, args.host, args.port)
    # `kill` (SIGTERM) stops the servers as Ctrl-C does, instead of leaving them running without their parent.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        log("serving: controller, model worker, Gradio web server")
        servers.start()
        print(f"\n  Open {servers.web_url} and ask about an image from {run.paths.data}/images/eval/")
        print("  (e.g. 'What color is the shape?'). Press Ctrl-C to stop.\n", flush=True)
        while all(proc.poll() is None for _, proc in servers.procs):
            time.sleep(1)
        dead = [name for name, proc in servers.procs if proc.poll() is not None]
        log(f"{', '.join(dead)} stopped; see {run.paths.logs}")
        return 1
    except KeyboardInterrupt:
        log("stopping the servers")
        return 1 if failures else 0
    finally:
        servers.stop()


if __name__ == "__main__":
    sys.exit(main())
