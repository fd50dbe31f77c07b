"""Serving benchmark: our batching worker against the original worker design and, with `--peer`, against an engine
users would run instead, same model, same machine, same run.

Starts a controller, two model workers on one checkpoint and the OpenAI-compatible API server, then drives the
workers with N concurrent clients over HTTP, alternating the sides round by round:

  ours      `--batching on`: continuous batching over one KV cache, image-feature and prefix caches, N rows at once
  baseline  `--batching off --limit-model-concurrency 1 --image-cache-mb 0 --prefix-cache-mb 0`: the original LLaVA
            worker, one HF `generate` per request, one request at a time
  peer      `--peer transformers-serve`: `transformers serve` on the same weights exported to llava-hf
            (`llava.model.convert_hf`), driven by the same OpenAI client as our API server, at every concurrency

Every request is greedy, so both workers should return the same text. Batching changes the decoder's matrix shapes,
and on some CPUs and GPUs the rounding follows (logits agree within `llava.inference.GREEDY_TIE_TOLERANCE`), so a
reply may depart from the one-at-a-time reply where the top two logits of a step are that close. The script replays
each differing reply alone and measures that gap: near ties are reported as such, any other difference fails the
run (exit status 1). It also compares single-stream decoding in-process: `BatchDecoder` (the worker's path) against
a plain HF `generate` call on the same model, alternating, with the same check.

    python scripts/bench/serve_throughput.py                                  # CPU: `medium` model, 1 and 16 clients
    python scripts/bench/serve_throughput.py --preset tiny --concurrency 2 --rounds 1 --max-new-tokens 8 --warmup 1
    python scripts/bench/serve_throughput.py --device cuda --threads 0 --concurrency 1,16,64      # GPU, bf16
    python scripts/bench/serve_throughput.py --device cuda --threads 0 --model-path DIR --concurrency 1,16,64
    python scripts/bench/serve_throughput.py --peer transformers-serve --concurrency 1,16,64 --api openai

Figures, medians over rounds: output tokens/s and requests/s (all clients together, first request sent to last
reply), time to first token (TTFT) and time per output token after the first (TPOT), p50 and p99 over requests.
Through the OpenAI API, ours and the peer are measured at every concurrency, the baseline at the highest only (with
`--peer none`, all three at the highest only: the API layer adds a hop, not a different engine).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402

QUESTIONS = (
    "What is in the picture?",
    "Describe the image in detail.",
    "What colour is the largest shape, and where is it?",
    "How many objects are there? Answer briefly.",
    "Write a short story about this picture.",
    "Is there anything unusual in this image?",
)
TEXT_QUESTIONS = (
    "Tell me a joke about squares.",
    "Explain what a triangle is to a child.",
    "List three colours and a thing of each colour.",
)
PEER = "transformers-serve"
PALETTE = ((220, 38, 38), (34, 160, 60), (37, 80, 220), (240, 200, 20), (140, 55, 190), (245, 125, 20))


@dataclass
class Request:
    id: int
    question: str
    image: str | None  # base64 PNG
    max_new_tokens: int


@dataclass
class Result:
    id: int
    text: str = ""
    tokens: int = 0
    sent: float = 0.0
    first: float | None = None
    done: float = 0.0
    error: str | None = None


@dataclass
class RunStats:
    mode: str
    api: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    errors: int
    texts: dict = field(default_factory=dict, repr=False)


# -- workload ------------------------------------------------------------------------------------------------------
def make_image(index: int, rng: random.Random) -> str:
    """A PNG of a few coloured shapes, size varying by index (some not square, so padding is exercised)."""
    from PIL import Image, ImageDraw

    width, height = rng.choice(((96, 96), (128, 80), (80, 120), (160, 160)))
    image = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    for _ in range(1 + index % 3):
        x, y = rng.randrange(width - 20), rng.randrange(height - 20)
        box = (x, y, x + rng.randrange(10, 30), y + rng.randrange(10, 30))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(PALETTE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_workload(
    n: int, max_new_tokens: int, distinct_images: int, text_only: float, seed: int, min_fraction: float = 0.75
) -> list[Request]:
    """`n` requests: images drawn from a pool of `distinct_images` (repeats, as in a demo), a share of text-only
    questions, and output budgets between `min_fraction` of and all of `max_new_tokens`."""
    rng = random.Random(seed)
    pool = [make_image(i, rng) for i in range(max(1, distinct_images))]
    out = []
    for i in range(n):
        budget = rng.randint(max(1, int(max_new_tokens * min_fraction)), max_new_tokens)
        if rng.random() < text_only:
            out.append(Request(i, rng.choice(TEXT_QUESTIONS), None, budget))
        else:
            out.append(Request(i, rng.choice(QUESTIONS), rng.choice(pool), budget))
    return out


def worker_prompt(conv_mode: str, request: Request) -> str:
    from llava.conversation import get_conv_template

    conv = get_conv_template(conv_mode)
    question = ("<image>\n" + request.question) if request.image else request.question
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


# -- clients -------------------------------------------------------------------------------------------------------
def call_worker(url: str, model: str, conv_mode: str, request: Request, result: Result) -> None:
    """One request over the original protocol (`/worker_generate_stream`, NUL-separated JSON chunks)."""
    import requests

    from llava.serve.protocol import iter_chunks

    prompt = worker_prompt(conv_mode, request)
    payload = {
        "model": model,
        "prompt": prompt,
        "images": [request.image] if request.image else [],
        "temperature": 0,
        "max_new_tokens": request.max_new_tokens,
    }
    result.sent = time.perf_counter()
    with requests.post(url + "/worker_generate_stream", json=payload, stream=True, timeout=(10, 900)) as response:
        for chunk in iter_chunks(response.iter_content(chunk_size=None)):
            if chunk.get("error_code"):
                result.error = chunk.get("text", "")[:300]
                break
            text = chunk["text"][len(prompt) :]
            if result.first is None and text.strip():
                result.first = time.perf_counter()
            result.text = text
            if "usage" in chunk:
                result.tokens = int(chunk["usage"].get("completion_tokens") or 0)
    result.done = time.perf_counter()
    result.text = result.text.strip()


def call_openai(url: str, model: str, request: Request, result: Result) -> None:
    """One streamed `/v1/chat/completions` request (server-sent events, usage in the last event)."""
    import requests

    content: list[dict] = []
    if request.image:
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + request.image}})
    content.append({"type": "text", "text": request.question})
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": request.max_new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pieces: list[str] = []
    result.sent = time.perf_counter()
    with requests.post(url + "/chat/completions", json=payload, stream=True, timeout=(10, 900)) as response:
        if response.status_code != 200:
            result.error = response.text[:300]
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.error = str(event["error"])[:300]
                break
            if event.get("usage"):
                result.tokens = int(event["usage"].get("completion_tokens") or 0)
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if result.first is None:
                        result.first = time.perf_counter()
                    pieces.append(piece)
    result.done = time.perf_counter()
    result.text = "".join(pieces).strip()


def run_load(call, requests_: list[Request], concurrency: int) -> list[Result]:
    """`concurrency` client threads; client k sends requests k, k + concurrency, ... one after another."""
    results = {r.id: Result(r.id) for r in requests_}

    def client(k: int) -> None:
        for request in requests_[k::concurrency]:
            result = results[request.id]
            try:
                call(request, result)
            except Exception as err:  # recorded and counted: a benchmark must not hide failures
                result.error = f"{type(err).__name__}: {err}"[:300]
                result.done = time.perf_counter()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[r.id] for r in requests_]


def summarize(mode: str, api: str, concurrency: int, results: list[Result]) -> RunStats:
    ok = [r for r in results if r.error is None]
    wall = max(r.done for r in results) - min(r.sent for r in results)
    tokens = sum(r.tokens for r in ok)
    ttft = [(r.first - r.sent) * 1000 for r in ok if r.first is not None]
    tpot = [(r.done - r.first) * 1000 / (r.tokens - 1) for r in ok if r.first is not None and r.tokens > 1]
    return RunStats(
        mode=mode,
        api=api,
        concurrency=concurrency,
        requests=len(results),
        output_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        ttft_p50_ms=bc.percentile(ttft, 50),
        ttft_p99_ms=bc.percentile(ttft, 99),
        tpot_p50_ms=bc.percentile(tpot, 50),
        tpot_p99_ms=bc.percentile(tpot, 99),
        errors=len(results) - len(ok),
        texts={r.id: r.text for r in ok},
    )


# -- single stream, in-process ---------------------------------------------------------------------------------------
def single_stream(engine, rounds: int, max_new_tokens: int, seed: int) -> dict:
    """Decode one request at a time with `BatchDecoder` and with a plain HF `generate` call on the same model,
    alternating; tokens/s (prefill included) per round, and whether the texts agree."""
    from PIL import Image

    from llava.inference import GenerationParams

    rng = random.Random(seed)
    params = GenerationParams(temperature=0, max_new_tokens=max_new_tokens)
    image = Image.open(io.BytesIO(base64.b64decode(make_image(0, rng)))).convert("RGB")
    request = engine.encode(engine.build_prompt(QUESTIONS[1], 1), [image], 1)
    ids, mask, pixel, sizes = engine._batch_tensors([request])
    kwargs = engine._generate_kwargs([request], params, ids, [])
    cache = getattr(engine.model, "image_feature_cache", None)
    engine.model.image_feature_cache = None  # both sides encode the image every time
    rates = {"hf_generate": [], "batch_decoder": []}
    texts = {}

    def hf() -> tuple[int, str]:
        import torch

        with torch.inference_mode():
            out = engine.model.generate(ids, attention_mask=mask, images=pixel, image_sizes=sizes, **kwargs)
        return out.shape[1], engine.tokenizer.decode(out[0], skip_special_tokens=True).strip()

    def ours() -> tuple[int, str]:
        decoder = engine.decoder(params)
        decoder.add([(0, request, params)])
        final = None
        while decoder:
            for update in decoder.step():
                final = update if update.finished else final
        return final.completion_tokens, final.text.strip()

    try:
        for fn in (hf, ours):  # warm-up
            fn()
        for r in range(rounds):
            order = (("hf_generate", hf), ("batch_decoder", ours))
            for name, fn in order if r % 2 == 0 else order[::-1]:
                _sync(engine)
                start = time.perf_counter()
                n, text = fn()
                _sync(engine)
                rates[name].append(n / (time.perf_counter() - start))
                texts.setdefault(name, text)
    finally:
        engine.model.image_feature_cache = cache
    hf_rate, our_rate = bc.median(rates["hf_generate"]), bc.median(rates["batch_decoder"])
    # Each decoded token reads every decoder weight once: weight bytes x tokens/s over the machine's measured read
    # bandwidth is the share of the memory-bound ceiling that decoding reaches (prefill is in the rate, so this is a
    # lower bound). Small models sit far below it: per-step overhead, not memory, limits them.
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.get_model().layers.parameters())
    weight_bytes += engine.model.lm_head.weight.numel() * engine.model.lm_head.weight.element_size()
    read_bw = bc.memory_bandwidth()["read"]  # at the threads decoding used
    return {
        "decoder_weight_bytes": weight_bytes,
        "read_bytes_per_s": read_bw,
        "batch_decoder_bandwidth_fraction": our_rate * weight_bytes / read_bw,
        "hf_generate_bandwidth_fraction": hf_rate * weight_bytes / read_bw,
        "hf_generate_tokens_per_s": hf_rate,
        "batch_decoder_tokens_per_s": our_rate,
        "ratio": our_rate / hf_rate,
        # One request alone on both paths: the same shapes up to the KV cache's layout, so no tolerance is needed.
        "identical": texts["hf_generate"] == texts["batch_decoder"],
        "rounds": rates,
        "tokens": max_new_tokens,
    }


def split_near_ties(args, ckpt: str, conv_mode: str, mismatches: list) -> tuple[list, list]:
    """Replay each differing request alone; return (near ties, real differences). A near tie departs from the
    one-at-a-time reply where its top two logits are within `GREEDY_TIE_TOLERANCE`."""
    if not mismatches:
        return [], []
    from PIL import Image

    from llava.inference import GREEDY_TIE_TOLERANCE, GenerationParams, LlavaEngine, greedy_divergence

    engine = LlavaEngine.from_pretrained(ckpt, device=args.device)
    ties, real = [], []
    for api, conc, mode, rid, reference, text in mismatches:
        n = max(conc * args.requests_per_client, args.min_requests)
        request = make_workload(
            n, args.max_new_tokens, args.distinct_images, args.text_only, args.seed, args.min_new_fraction
        )[rid]
        images = [Image.open(io.BytesIO(base64.b64decode(request.image))).convert("RGB")] if request.image else []
        params = GenerationParams(temperature=0, max_new_tokens=request.max_new_tokens)
        prompt = worker_prompt(conv_mode, request)
        # Either side may be the one that departs from the reply generated alone (the reference may be a batched
        # reply too): each departure must be a near tie.
        margins = [greedy_divergence(engine, prompt, images, params, t)[1] for t in (reference, text)]
        departed = [m for m in margins if m is not None]
        row = (api, conc, mode, rid, reference[:60], text[:60], max(departed, default=None))
        (ties if departed and all(m <= GREEDY_TIE_TOLERANCE for m in departed) else real).append(row)
    return ties, real


def _sync(engine) -> None:
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize()


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="medium", help=f"Model built at run time: {', '.join(bc.PRESETS)}.")
    p.add_argument("--model-path", default=None, help="Benchmark this checkpoint instead of a preset.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument(
        "--threads", type=int, default=1, help="Intra-op threads per process on CPU (0: llava.runtime's policy)."
    )
    p.add_argument("--concurrency", default="1,16", help="Comma-separated numbers of concurrent clients.")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--min-requests", type=int, default=2, help="At least this many requests per measured run.")
    p.add_argument("--max-new-tokens", type=int, default=192, help="Output budget of a request (the largest one).")
    p.add_argument(
        "--min-new-fraction",
        type=float,
        default=1.0,
        help="Budgets are drawn from [this x max, max]; 1: every request gets --max-new-tokens, as fixed-length "
        "throughput benchmarks do.",
    )
    p.add_argument("--distinct-images", type=int, default=4, help="Pool the requests' images are drawn from.")
    p.add_argument("--text-only", type=float, default=0.2, help="Share of text-only requests.")
    p.add_argument("--rounds", type=int, default=3, help="Alternating rounds; figures are medians over rounds.")
    p.add_argument("--warmup", type=int, default=2, help="Warm-up requests per worker before measuring.")
    p.add_argument("--api", default="worker,openai", help="worker (original protocol), openai, or both.")
    p.add_argument(
        "--peer",
        default="none",
        choices=["none", PEER],
        help="Also serve the weights with this engine (exported to llava-hf) and drive it over its OpenAI API.",
    )
    p.add_argument("--single-stream-rounds", type=int, default=3, help="0 skips the in-process decode comparison.")
    p.add_argument(
        "--single-stream-only",
        action="store_true",
        help="Stop after the in-process single-stream comparison (no servers).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="Where the model and logs go (default: a temp dir).")
    p.add_argument("--json-out", default=None, help="Also write every figure here.")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.api = [a for a in args.api.split(",") if a]
    bad = [a for a in args.api if a not in ("worker", "openai")]
    if bad or not args.api:
        p.error(f"--api {','.join(args.api)}: choose from worker, openai.")
    if args.peer != "none" and "openai" not in args.api:
        p.error(f"--peer {args.peer} is driven over the OpenAI API: include openai in --api.")
    return args


def start_servers(args, ckpt: str, work: str) -> tuple[list[bc.Server], dict]:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **bc.thread_env(args.threads)}
    ports = {name: bc.free_port() for name in ("controller", "ours", "baseline", "openai")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    common = ["--model-path", ckpt, "--device", args.device, "--controller", urls["controller"]]
    common += ["--heart-beat-interval", "2", "--max-queue-size", "4096"]
    flags = {
        "ours": ["--batching", "on", "--limit-model-concurrency", str(max(args.concurrency))],
        "baseline": [
            "--batching",
            "off",
            "--limit-model-concurrency",
            "1",
            "--image-cache-mb",
            "0",
            "--prefix-cache-mb",
            "0",
        ],  # fmt: skip
    }
    servers = [bc.Server("controller", "llava.serve.controller", ["--port", str(ports["controller"])], work, env)]
    for mode in ("ours", "baseline"):
        argv = ["--port", str(ports[mode]), "--worker", urls[mode], "--model-name", f"bench-{mode}", *common]
        servers.append(bc.Server(f"worker-{mode}", "llava.serve.model_worker", argv + flags[mode], work, env))
    if "openai" in args.api:
        argv = ["--port", str(ports["openai"]), "--controller", urls["controller"]]
        servers.append(bc.Server("openai", "llava.serve.openai_api_server", argv, work, env))
    for server, name in zip(servers, ("controller", "ours", "baseline", "openai")):
        server.wait_http(urls[name] + "/health")
    if args.peer != "none":
        servers.append(start_peer(args, ckpt, work, env, urls))
    return servers, urls


MEDIAN_FIELDS = ("tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def print_peer_table(summary: list[dict]) -> None:
    """Ours through our OpenAI API server against the peer engine, medians over rounds."""
    rows = []
    for row in summary:
        ours, peer = row.get("ours"), row.get("peer")
        if row["api"] != "openai" or not ours or not peer:
            continue
        rows.append(
            [
                row["concurrency"],
                f"{ours['tokens_per_s']:.1f}",
                f"{peer['tokens_per_s']:.1f}",
                f"**{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x**",
                f"{ours['ttft_p99_ms']:.0f}",
                f"{peer['ttft_p99_ms']:.0f}",
            ]
        )
    print(f"\n## Ours (through our OpenAI API server) vs {PEER} (medians over rounds)\n")
    header = ["clients", "ours tok/s", f"{PEER} tok/s", "ratio", "ours TTFT p99 ms", f"{PEER} TTFT p99 ms"]
    print(bc.table(rows, header))


def image_requests(args, conc: int) -> set[int]:
    """Ids of the requests with an image in the workload of `conc` clients."""
    n = max(conc * args.requests_per_client, args.min_requests)
    load = make_workload(n, args.max_new_tokens, args.distinct_images, args.text_only, args.seed, args.min_new_fraction)
    return {r.id for r in load if r.image}


def words_only(ckpt: str, out: str) -> str:
    """A copy of `ckpt` whose output layer never picks a byte-fallback token (`<0x..>`: their `lm_head` rows set to
    zero, so their logits are 0 while the best word's is well above). Random weights otherwise write byte soup
    that `transformers serve` cannot stream ("Invalid prefix encountered while decoding stream"); a trained model
    writes words. Every side of the run serves this copy."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ckpt, out)
    weights = os.path.join(out, "model.safetensors")
    if not os.path.exists(weights):
        raise SystemExit(f"--peer needs a single-file checkpoint (model.safetensors); {ckpt} has none.")
    state = load_file(weights)
    vocab = AutoTokenizer.from_pretrained(ckpt).get_vocab()
    byte_ids = [i for token, i in vocab.items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token)]
    state["lm_head.weight"][byte_ids] = 0
    save_file(state, weights, metadata={"format": "pt"})
    return out


def start_peer(args, ckpt: str, work: str, env: dict, urls: dict) -> bc.Server:
    """`transformers serve` on the checkpoint exported to llava-hf (the model loads on its first request); its URL
    goes in `urls["peer"]`, the model id it answers to in `urls["peer_model"]`."""
    import shutil

    from llava.model.convert_hf import export_to_hf

    exported = os.path.join(work, "peer-llava-hf")
    shutil.rmtree(exported, ignore_errors=True)
    export_to_hf(ckpt, exported)
    port = bc.free_port()
    argv = ["serve", exported, "--host", "127.0.0.1", "--port", str(port), "--device", args.device]
    server = bc.Server(PEER, "transformers.cli.transformers", argv, work, env)
    urls["peer"], urls["peer_model"] = f"http://127.0.0.1:{port}", exported
    server.wait_http(urls["peer"] + "/health")
    return server


def measured_modes(args, api: str, conc: int) -> list[str]:
    """The sides measured over `api` at `conc` clients (see the module docstring)."""
    if api == "worker":
        return ["ours", "baseline"]
    peer = args.peer != "none"
    top = conc == max(args.concurrency)
    return [m for m, on in (("ours", peer or top), ("baseline", top), ("peer", peer)) if on]


def wait_registered(urls: dict, timeout: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = requests.post(urls["controller"] + "/list_models", timeout=5).json().get("models", [])
        if {"bench-ours", "bench-baseline"} <= set(models):
            return
        time.sleep(0.3)
    raise TimeoutError("The workers did not register with the controller.")


def main(argv=None) -> int:
    args = parse_args(argv)
    import requests

    from llava.runtime import configure_threads

    configure_threads(args.threads or None)
    work = args.work_dir or tempfile.mkdtemp(prefix="llava-bench-serve-")
    os.makedirs(work, exist_ok=True)
    ckpt = args.model_path or bc.build_checkpoint(os.path.join(work, args.preset), bc.preset(args.preset))
    if args.peer != "none" and not args.model_path:
        ckpt = words_only(ckpt, os.path.join(work, args.preset, "llava-words"))
    print(f"# Serving benchmark\nmachine: {bc.machine()}\ncheckpoint: {ckpt}\nargs: {vars(args)}\n", flush=True)
    report: dict = {"machine": bc.machine(), "args": vars(args)}
    failures = []

    if args.single_stream_rounds:
        from llava.inference import LlavaEngine

        engine = LlavaEngine.from_pretrained(ckpt, device=args.device)
        single = single_stream(engine, args.single_stream_rounds, args.max_new_tokens, args.seed)
        del engine
        report["single_stream"] = single
        print("## Single-stream decode (in-process, same model, one request at a time)\n")
        rows = [
            ["HF `generate`", f"{single['hf_generate_tokens_per_s']:.1f}", "1.00"],
            ["our `BatchDecoder`", f"{single['batch_decoder_tokens_per_s']:.1f}", f"{single['ratio']:.2f}"],
        ]
        print(bc.table(rows, ["path", "tokens/s (median)", "ratio"]))
        print(
            f"\nshare of the memory-bandwidth ceiling (decoder weights {single['decoder_weight_bytes'] / 2**20:.1f} MiB"
            f" per token, read bandwidth {single['read_bytes_per_s'] / 1e9:.1f} GB/s): BatchDecoder"
            f" {100 * single['batch_decoder_bandwidth_fraction']:.1f} %, HF generate"
            f" {100 * single['hf_generate_bandwidth_fraction']:.1f} %"
        )
        print(f"identical greedy text: {single['identical']}\n", flush=True)
        if not single["identical"]:
            failures.append("single-stream: BatchDecoder and HF generate disagree")
    if args.single_stream_only:
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(report, f, indent=2)
        if failures:
            print("FAILED: " + "; ".join(failures))
        return 1 if failures else 0

    servers, urls = start_servers(args, ckpt, work)
    try:
        wait_registered(urls)
        details = requests.post(urls["ours"] + "/model_details", timeout=10).json()
        conv_mode = details["conv_mode"]
        calls = {
            ("worker", mode): (lambda req, res, m=mode: call_worker(urls[m], f"bench-{m}", conv_mode, req, res))
            for mode in ("ours", "baseline")
        }
        calls.update(
            {
                ("openai", mode): (lambda req, res, m=mode: call_openai(urls["openai"] + "/v1", f"bench-{m}", req, res))
                for mode in ("ours", "baseline")
            }
        )
        if args.peer != "none":
            calls["openai", "peer"] = lambda req, res: call_openai(urls["peer"] + "/v1", urls["peer_model"], req, res)
        warm = make_workload(args.warmup, args.max_new_tokens, 1, 0.0, args.seed + 1000)
        for key, call in calls.items():
            if key[0] in args.api:
                run_load(call, warm, 1)

        runs: list[RunStats] = []
        for r in range(args.rounds):
            for conc in args.concurrency:
                n = max(conc * args.requests_per_client, args.min_requests)
                workload = make_workload(
                    n, args.max_new_tokens, args.distinct_images, args.text_only, args.seed, args.min_new_fraction
                )
                for api in args.api:
                    modes = measured_modes(args, api, conc)
                    modes = modes[r % len(modes) :] + modes[: r % len(modes)]  # each side goes first in turn
                    for mode in modes:
                        stats = summarize(mode, api, conc, run_load(calls[(api, mode)], workload, conc))
                        runs.append(stats)
                        print(
                            f"round {r} {api:6s} c={conc:<3d} {mode:8s} {stats.tokens_per_s:8.1f} tok/s "
                            f"{stats.requests_per_s:6.2f} req/s  TTFT p50 {stats.ttft_p50_ms:8.0f} ms  "
                            f"TPOT p50 {stats.tpot_p50_ms:6.1f} ms  errors {stats.errors}",
                            flush=True,
                        )
        health = {m: requests.get(urls[m] + "/health", timeout=10).json() for m in ("ours", "baseline")}
    finally:
        for server in reversed(servers):
            server.stop()

    # Parity: every request's greedy reply must be the same from every side, per API and across rounds. The reference
    # is the one-at-a-time baseline's reply (from the other API when this one did not run it), else ours.
    mismatches = []
    for api in args.api:
        for conc in args.concurrency:
            group = [s for s in runs if s.api == api and s.concurrency == conc]
            if not group:
                continue
            same_load = [s for s in runs if s.concurrency == conc and s.mode == "baseline"]
            candidates = [s for s in group if s.mode == "baseline"] + same_load + [s for s in group if s.mode == "ours"]
            reference = candidates[0].texts if candidates else {}
            for s in group:
                for rid, text in s.texts.items():
                    if rid in reference and reference[rid] != text:
                        mismatches.append((api, conc, s.mode, rid, reference[rid], text))
    errors = sum(s.errors for s in runs)
    # The peer's image prompts are not token-identical to ours (see `peer_image_prompts`): counted apart, not replayed.
    image_ids = {conc: image_requests(args, conc) for conc in args.concurrency}
    peer_images = [m for m in mismatches if m[2] == "peer" and m[3] in image_ids[m[1]]]
    mismatches = [m for m in mismatches if not (m[2] == "peer" and m[3] in image_ids[m[1]])]
    near_ties, mismatches = split_near_ties(args, ckpt, conv_mode, mismatches)

    print("\n## Serving throughput (medians over rounds)\n")
    rows, summary = [], []
    for api in args.api:
        for conc in args.concurrency:
            if not any(s.api == api and s.concurrency == conc for s in runs):
                continue
            med = {}
            for mode in ("baseline", "ours", "peer"):
                group = [s for s in runs if s.api == api and s.concurrency == conc and s.mode == mode]
                if not group:
                    continue
                med[mode] = {k: bc.median([getattr(s, k) for s in group]) for k in MEDIAN_FIELDS}
                m = med[mode]
                rows.append(
                    [
                        api,
                        conc,
                        PEER if mode == "peer" else mode,
                        f"{m['tokens_per_s']:.1f}",
                        f"{m['requests_per_s']:.2f}",
                        f"{m['ttft_p50_ms']:.0f} / {m['ttft_p99_ms']:.0f}",
                        f"{m['tpot_p50_ms']:.1f} / {m['tpot_p99_ms']:.1f}",
                        f"{m['tokens_per_s'] / med['baseline']['tokens_per_s']:.2f}x" if "baseline" in med else "-",
                    ]
                )
            summary.append({"api": api, "concurrency": conc, **{k: v for k, v in med.items()}})
    header = ["API", "clients", "worker", "output tok/s", "req/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "speed-up"]
    print(bc.table(rows, header))
    cache = health["ours"].get("image_feature_cache") or {}
    prefix = health["ours"].get("prefix_cache") or {}
    print(
        f"\nours: max rows decoded together {health['ours'].get('max_batch_rows')}; image-feature cache "
        f"hits {cache.get('hits')} / misses {cache.get('misses')}; prefix cache hits {prefix.get('hits')} / misses "
        f"{prefix.get('misses')}"
    )
    ours_differ = [m for m in mismatches if m[2] != "peer"]
    ours_ties = [m for m in near_ties if m[2] != "peer"]
    print(
        f"identical greedy outputs (ours vs baseline, every request): {not ours_differ and not ours_ties} "
        f"({len(ours_differ)} differ, {len(ours_ties)} more at near ties of the top two logits)"
    )
    if args.peer != "none":
        print_peer_table(summary)
        differ = [m for m in mismatches if m[2] == "peer"]
        ties = [m for m in near_ties if m[2] == "peer"]
        compared = [(s.concurrency, rid) for s in runs if s.mode == "peer" for rid in s.texts]
        with_image = sum(rid in image_ids[conc] for conc, rid in compared)
        print(
            f"identical greedy outputs ({PEER} vs the one-at-a-time reply, text-only requests): "
            f"{not differ and not ties} ({len(differ)} differ, {len(ties)} more at near ties of the top two logits; "
            f"{len(compared) - with_image} replies)\n"
            f"{PEER} replies to image requests that differ: {len(peer_images)} of {with_image} "
            "(not judged: the llava-hf processor tokenizes `<image>\\n` with one token fewer than the original's "
            "prompt pieces, see docs/Serving.md, 'Scaling out', and docs/Performance.md)"
        )
        report["peer_image_replies_differing"] = [len(peer_images), with_image]
    print(f"failed requests: {errors}")
    for m in near_ties[:5]:
        print("  near tie:", m)
    for m in mismatches[:5]:
        print("  differs:", m)
    report.update(
        summary=summary,
        runs=[{k: v for k, v in asdict(s).items() if k != "texts"} for s in runs],
        mismatches=len(mismatches),
        near_ties=len(near_ties),
        errors=errors,
        health=health,
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if mismatches:
        failures.append(f"{len(mismatches)} replies differ between the workers")
    if errors:
        failures.append(f"{errors} requests failed")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
