"""Shared pieces of the benchmark scripts: model presets built at run time, timing statistics, machine facts.

The benchmark models are random-weight LLaVA checkpoints built from `llava.demo.backbones` (a locally trained
tokenizer, a LLaMA decoder, a CLIP tower, an mlp2x_gelu projector), saved as ordinary full checkpoints, so every
benchmark loads them through `load_pretrained_model` exactly as a user's checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llava.demo.backbones import TinySizes  # noqa: E402
from llava.serve.launch import ServerProcess, free_port, wait_http  # noqa: E402,F401  (free_port: for the scripts)

# Model sizes by name. `tiny` is the test size (milliseconds per forward). `small` is large enough on a CPU that a
# forward pass is dominated by matrix multiplies rather than Python overhead.
PRESETS: dict[str, TinySizes] = {
    "tiny": TinySizes(),
    "small": TinySizes(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        vision_hidden_size=128,
        vision_layers=4,
        vision_heads=4,
        image_size=64,
        patch_size=8,
    ),
    "medium": TinySizes(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vision_hidden_size=192,
        vision_layers=6,
        vision_heads=6,
        image_size=112,
        patch_size=14,
    ),
}


def preset(name: str) -> TinySizes:
    if name not in PRESETS:
        raise SystemExit(f"Unknown model preset `{name}`; valid: {', '.join(PRESETS)}.")
    return PRESETS[name]


def build_checkpoint(out_dir: str, sizes: TinySizes, seed: int = 0, conv_template: str = "llava_v1") -> str:
    """A random-weight LLaVA full checkpoint of `sizes` under `out_dir` (reused when already built); its path."""
    from llava.demo import backbones
    from llava.model.assemble import ProjectorSpec, PromptSpec, VisionSpec, build_llava

    ckpt = os.path.join(out_dir, "llava")
    stamp = os.path.join(ckpt, "bench_sizes.json")
    wanted = {**asdict(sizes), "seed": seed, "conv_template": conv_template}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == wanted:
                return ckpt
    tok_dir, dec_dir, clip_dir = (os.path.join(out_dir, n) for n in ("tokenizer", "decoder", "clip"))
    tokenizer = backbones.build_tokenizer(tok_dir, vocab_size=sizes.vocab_size)
    backbones.build_decoder(dec_dir, tokenizer, sizes=sizes, seed=seed)
    backbones.build_vision_tower(clip_dir, sizes=sizes, seed=seed)
    model = build_llava(
        dec_dir,
        VisionSpec(clip_dir, select_layer=-2),  # LLaVA-1.5's choices
        ProjectorSpec("mlp2x_gelu"),
        PromptSpec(image_aspect_ratio="pad"),
        record={"conv_template": conv_template},
        seed=seed,
    )
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    return ckpt


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    """One line describing where the numbers came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    parts = [f"{cpu} x{os.cpu_count()} logical CPUs", f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    import transformers

    parts.append(f"transformers {transformers.__version__}")
    return "; ".join(parts)


def table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Server(ServerProcess):
    """A server process (`python -m <module> <args>`) logging to `<log_dir>/<name>.log`: `llava.serve.launch`'s, the
    one launcher of tests, demo and benchmarks; stopped with `stop()` (SIGTERM, then KILL)."""

    def wait_http(self, url: str, timeout: float = 180.0) -> None:
        """Wait until GET `url` answers 200; fail with the log if the process dies or time runs out."""
        wait_http(url, timeout, [self])

    def stop(self) -> None:
        super().stop(15)


def thread_env(threads: int | None) -> dict:
    """Environment that pins a child process's intra-op threads (None: the library defaults)."""
    if not threads:
        return {}
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


# ------------------------------------------------------------------------------------------------------ roofline
def gemm_peak_flops(
    dtype: str = "float32", threads: int | None = None, size: int = 1024, seconds: float = 1.0
) -> float:
    """The machine's matrix-multiply rate (FLOP/s) at `dtype` and `threads` (None: the current setting): the best of
    repeated (size x size) @ (size x size) products over about `seconds`. The roofline's compute ceiling."""
    import time

    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dt = getattr(torch, dtype)
        a = torch.randn(size, size).to(dt)
        b = torch.randn(size, size).to(dt)
        torch.mm(a, b)  # first call: kernel selection, page faults
        best, spent = float("inf"), 0.0
        while spent < seconds:
            start = time.perf_counter()
            torch.mm(a, b)
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
        return 2 * size**3 / best
    finally:
        torch.set_num_threads(before)


def memory_bandwidth(threads: int | None = None, mib: int = 512, seconds: float = 1.0) -> dict:
    """The machine's memory bandwidth (bytes/s), best of repeats over about `seconds` on a `mib` MiB float32 tensor
    (far larger than the caches): `read` sums it (bytes read), `copy` copies it (bytes read + written). Decoding reads
    the weights once per token, so `read` is its ceiling."""
    import time

    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**20 // 4)
        y = torch.empty_like(x)
        out = {}
        for name, fn, factor in (("read", lambda: x.sum(), 1), ("copy", lambda: y.copy_(x), 2)):
            fn()
            best, spent = float("inf"), 0.0
            while spent < seconds:
                start = time.perf_counter()
                fn()
                took = time.perf_counter() - start
                best, spent = min(best, took), spent + took
            out[name] = factor * x.numel() * 4 / best
        return out
    finally:
        torch.set_num_threads(before)


def roofline(dtype: str = "float32", threads: int | None = None) -> dict:
    """The machine's ceilings for a run: GEMM FLOP/s at `dtype` and bandwidth, at `threads` (None: current)."""
    bandwidth = memory_bandwidth(threads)
    return {
        "dtype": dtype,
        "threads": threads,
        "gemm_flops": gemm_peak_flops(dtype, threads),
        "read_bytes_per_s": bandwidth["read"],
        "copy_bytes_per_s": bandwidth["copy"],
    }
