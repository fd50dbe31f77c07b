"""Load test of the serving stack through the OpenAI API: N clients at once, every request accounted for.

    python scripts/bench/serve_load.py                        # 200 then 400 concurrent clients, tiny model
    python scripts/bench/serve_load.py --concurrency 50 --max-tokens 8 --json load.json

Starts a controller, two batching workers of one random-weight checkpoint (bench_common presets) and the OpenAI API
server, all on loopback, then for each concurrency level fires that many chat completions at once (half streamed,
half not, each with a small image). Every request ends in exactly one bucket:

- `completed`: 200 with a finish reason (a stream: a finish reason, then `[DONE]`);
- an HTTP error in OpenAI's format, counted by status and cause (e.g. `503 overloaded`);
- `lost`: anything else (a transport error, a malformed answer, a stream cut without an error event). Must be 0.

It reports p50/p99 latency of the completed requests and each worker's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def small_png(index: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), ((37 * index) % 256, (91 * index) % 256, 120)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cause_of(status: int, body: bytes) -> str:
    """`<status> <error code or the message's first words>` for an OpenAI-format error; None when it is not one."""
    try:
        error = json.loads(body)["error"]
        label = error.get("code") or " ".join(str(error["message"]).split()[:6])
    except (ValueError, KeyError, TypeError):
        return None
    return f"{status} {label}"


async def one_request(client, url: str, model: str, index: int, stream: bool, max_tokens: int) -> tuple[str, float]:
    """The request's bucket (`completed`, a cause, or `lost: ...`) and its latency in seconds."""
    import httpx

    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": small_png(index)}},
                    {"type": "text", "text": f"Question {index}: what colour is this?"},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    start = time.perf_counter()
    try:
        if not stream:
            response = await client.post(url, json=body)
            elapsed = time.perf_counter() - start
            if response.status_code == 200:
                choice = response.json()["choices"][0]
                return ("completed" if choice.get("finish_reason") else "lost: no finish reason"), elapsed
            return cause_of(response.status_code, response.content) or f"lost: HTTP {response.status_code}", elapsed
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raw = await response.aread()
                return cause_of(response.status_code, raw) or f"lost: HTTP {response.status_code}", 0.0
            finished, done = False, False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    cause = cause_of(200, data.encode())
                    return (cause.replace("200", "stream error", 1) if cause else "lost: malformed error event"), 0.0
                finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
            elapsed = time.perf_counter() - start
            return ("completed" if finished and done else "lost: stream cut without an error"), elapsed
    except (httpx.HTTPError, ValueError, KeyError) as err:
        return f"lost: {type(err).__name__}", 0.0


async def fire(api: str, model: str, concurrency: int, max_tokens: int, timeout: float) -> list[tuple[str, float]]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        url = api + "/v1/chat/completions"
        jobs = [one_request(client, url, model, i, i % 2 == 1, max_tokens) for i in range(concurrency)]
        return await asyncio.gather(*jobs)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[200, 400], help="Clients at once, one run each.")
    p.add_argument("--max-tokens", type=int, default=4, help="Tokens per answer (keep small: this is a load test).")
    p.add_argument("--preset", default="tiny", choices=sorted(bc.PRESETS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-queue-size", type=int, default=256, help="Each worker's queue (its default).")
    p.add_argument("--batch", type=int, default=8, help="--limit-model-concurrency of each worker.")
    p.add_argument("--threads", type=int, default=1, help="Intra-op threads per worker.")
    p.add_argument("--timeout", type=float, default=900.0, help="Per-request client timeout (s).")
    p.add_argument("--work-dir", default=None, help="Where the checkpoint and logs go (default: a temp dir).")
    p.add_argument("--json", default=None, help="Also write the results here.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import requests

    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="llava-serve-load-")
    ckpt = bc.build_checkpoint(os.path.join(work, "ckpt"), bc.preset(args.preset))
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **bc.thread_env(args.threads)}
    names = ["controller", "api"] + [f"worker{i + 1}" for i in range(args.workers)]
    urls = {name: f"http://127.0.0.1:{bc.free_port()}" for name in names}
    port = {name: url.rsplit(":", 1)[1] for name, url in urls.items()}
    model = "bench-load"
    servers = [bc.Server("controller", "llava.serve.controller", ["--port", port["controller"]], work, env)]
    workers = []
    try:
        for i in range(args.workers):
            name = f"worker{i + 1}"
            argv = ["--port", port[name], "--worker", urls[name], "--controller", urls["controller"]]
            argv += ["--model-path", ckpt, "--model-name", model, "--device", "cpu", "--heart-beat-interval", "2"]
            argv += ["--limit-model-concurrency", str(args.batch), "--max-queue-size", str(args.max_queue_size)]
            workers.append(bc.Server(name, "llava.serve.model_worker", argv, work, env))
        servers += workers
        argv = ["--port", port["api"], "--controller", urls["controller"]]
        servers.append(bc.Server("api", "llava.serve.openai_api_server", argv, work, env))
        for server in servers:
            server.wait_http(urls[server.name] + "/health")
        deadline = time.monotonic() + 120
        while requests.post(urls["controller"] + "/worker_get_status", timeout=5).json()["workers"] < args.workers:
            if time.monotonic() > deadline:
                raise TimeoutError("The workers did not register with the controller.")
            time.sleep(0.3)
        asyncio.run(fire(urls["api"], model, 4, args.max_tokens, args.timeout))  # warm-up
        runs = []
        for n in args.concurrency:
            start = time.perf_counter()
            results = asyncio.run(fire(urls["api"], model, n, args.max_tokens, args.timeout))
            wall = time.perf_counter() - start
            buckets = Counter(kind for kind, _ in results)
            latencies = [seconds for kind, seconds in results if kind == "completed"]
            runs.append(
                {
                    "concurrency": n,
                    "completed": buckets.pop("completed", 0),
                    "lost": sum(v for k, v in buckets.items() if k.startswith("lost")),
                    "errors": {k: v for k, v in sorted(buckets.items()) if not k.startswith("lost")},
                    "lost_causes": {k: v for k, v in sorted(buckets.items()) if k.startswith("lost")},
                    "p50_s": round(bc.percentile(latencies, 50), 2),
                    "p99_s": round(bc.percentile(latencies, 99), 2),
                    "wall_s": round(wall, 1),
                    "peak_worker_rss_mb": [round(peak_rss_mb(w.popen.pid)) for w in workers],
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    finally:
        for server in servers:
            server.stop()
    header = ["clients", "completed", "errors by cause", "lost", "p50 latency", "p99 latency", "wall", "peak RSS"]
    rows = [
        [
            r["concurrency"],
            r["completed"],
            ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none",
            r["lost"],
            f"{r['p50_s']} s",
            f"{r['p99_s']} s",
            f"{r['wall_s']} s",
            " / ".join(f"{m} MiB" for m in r["peak_worker_rss_mb"]),
        ]
        for r in runs
    ]
    print(f"\n{bc.machine()}; {args.workers} workers (batch {args.batch}, queue {args.max_queue_size}), "
          f"preset {args.preset}, max_tokens {args.max_tokens}, half streamed\n")  # fmt: skip
    print(bc.table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bc.machine(), "args": vars(args), "runs": runs}, f, indent=2)
    return 1 if any(r["lost"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
