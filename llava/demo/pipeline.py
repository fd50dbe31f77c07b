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
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from llava.demo.backbones import TinySizes
from llava.demo.steps import (  # noqa: F401  (the steps' names stay importable from here)
    ENV,
    Paths,
    Run,
    StepFailed,
    _env,
    decoder_documents,
    eval_args,
    log,
    run_logged,
    step_backbones,
    step_data,
    step_eval,
    step_plot,
    step_stage1,
    step_stage2,
    step_warmup,
    tokenizer_texts,
    trainer_losses,
)
from llava.runtime import add_threads_argument, configure_threads
from llava.serve.launch import Supervisor, free_port  # free_port: importable from here too


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
    # 6 epochs: with 2 to 4, one category (row, column, colour, shape or size, by seed, thread count, CPU and torch
    # version) could stay at chance although the image tokens held it (llava.demo.probe; docs/Demo.md)
    stage2_epochs: float = 6.0
    stage2_batch_size: int = 16
    stage2_lr: float = 2e-3
    model_max_length: int = 512
    # acceptance: trained accuracy on image questions, and how far above chance blank images may score
    min_accuracy: float = 0.90
    max_blank_over_chance: float = 0.10


PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    # the reduced run of tests/test_demo.py (about 100 s): a quarter of the images and 4 stage-2 epochs, enough
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


# ---------------------------------------------------------------------------------------------------------- serving


def start_servers(servers: Supervisor, run: Run, web_port: int) -> str:
    """Controller, model worker (the stage-2 model, on CPU) and Gradio web server on `servers`, each waited for;
    the web UI's URL. Ports: 10000, 40000 and `web_port` when free, else ones the OS picks."""
    servers.start_controller(port=free_port(10000, servers.host))
    servers.start_worker(run.paths.stage2, args=["--device", "cpu"], port=free_port(40000, servers.host))
    servers.wait_models([os.path.basename(run.paths.stage2)])
    web_args = ["--model-list-mode", "reload", "--log-dir", os.path.join(run.paths.out, "serve_logs")]
    return servers.start_web_server(web_args, port=free_port(web_port, servers.host))


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
    recipe = parser.add_argument_group(
        "recipe", "any field of DemoConfig (llava/demo/pipeline.py); the default preset's value in brackets"
    )
    for f in dataclasses.fields(DemoConfig):
        if f.name == "sizes":
            continue
        kind = type(f.default)  # the default preset is DemoConfig() itself
        recipe.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=None,
            metavar=kind.__name__.upper(),
            help=f"[{f.default}]",
        )
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
    # The user's settings of the serving environment win, as in every step; each command line is printed.
    env = {key: os.environ.get(key, value) for key, value in ENV.items()}
    servers = Supervisor(run.paths.logs, args.host, env, run.python, timeout=180, announce=log)
    # `kill` (SIGTERM) stops the servers as Ctrl-C does, instead of leaving them running without their parent.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        log("serving: controller, model worker, Gradio web server")
        web_url = start_servers(servers, run, args.port)
        print(f"\n  Open {web_url} and ask about an image from {run.paths.data}/images/eval/")
        print("  (e.g. 'What color is the shape?'). Press Ctrl-C to stop.\n", flush=True)
        while all(proc.alive() for proc in servers.procs):
            time.sleep(1)
        dead = [proc.name for proc in servers.procs if not proc.alive()]
        log(f"{', '.join(dead)} stopped; see {run.paths.logs}")
        return 1
    except KeyboardInterrupt:
        log("stopping the servers")
        return 1 if failures else 0
    finally:
        servers.stop()


if __name__ == "__main__":
    sys.exit(main())
