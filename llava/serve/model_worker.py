"""A model worker: loads one checkpoint, registers with the controller, batches and streams generation over HTTP.

    python -m llava.serve.model_worker --host 0.0.0.0 --controller http://localhost:10000 --port 40000 \\
        --worker http://localhost:40000 --model-path liuhaotian/llava-v1.5-7b [--model-base BASE] [--load-4bit]
    CUDA_VISIBLE_DEVICES=0,1 python -m llava.serve.model_worker ...          # one model split over two GPUs
    python -m llava.serve.model_worker --model-path <tiny ckpt> --device cpu   # a tiny CPU worker starts in seconds

Endpoints: POST /worker_generate_stream (JSON + NUL chunks, see llava/serve/protocol.py), /worker_get_status,
/model_details, /worker_get_conv_template; GET /health. Concurrent requests are decoded together (see batching.py).
With a cluster key (--cluster-key or LLAVA_CLUSTER_KEY, shared with the controller) every endpoint answers 401
without the header X-LLaVA-Cluster-Key. Images are checked against the limits of --max-image-* and
--max-request-pixels before decoding; http(s) image URLs only with --allow-image-urls (see docs/Serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import threading
import time

from llava.constants import WORKER_HEART_BEAT_INTERVAL
from llava.inference import ORIGINAL_WORKER_DEFAULTS, EncodedRequest, GenerationParams, LlavaEngine, RequestError
from llava.mm_utils import ImageLimits, ImageLoadError, get_model_name_from_path, load_images
from llava.prompting import wrap_image_markers
from llava.runtime import add_threads_argument, configure_threads
from llava.serve.batching import BatchScheduler, Job, QueueFull, SerialScheduler
from llava.serve.client import CALL_ERRORS, ClusterClient, cluster_key_from
from llava.serve.protocol import ErrorCode, ServeError, encode_chunk
from llava.serve.server_utils import (
    BadJSON,
    BodyLimitMiddleware,
    ClusterKeyMiddleware,
    add_cluster_args,
    add_image_limit_args,
    add_server_args,
    image_limits_from,
    local_url,
    read_json_object,
    require,
    run_server,
    setup_logging,
    warn_if_exposed,
)

require("fastapi", "uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

logger = logging.getLogger("llava.serve.model_worker")

MAX_PROMPT_CHARS = 1_000_000
MAX_NEW_TOKENS_LIMIT = 1024  # the original worker's cap on `max_new_tokens`


class ModelWorker:
    """One loaded model behind a batch scheduler, plus its registration with the controller."""

    def __init__(
        self,
        engine: LlavaEngine,
        model_name: str,
        worker_addr: str,
        controller_addr: str | None,
        *,
        max_batch_size: int = 5,
        max_queue: int = 256,
        batch_wait_s: float = 0.005,
        batching: bool = True,
        image_limits: ImageLimits | None = None,
        heart_beat_interval: float = WORKER_HEART_BEAT_INTERVAL,
        max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
        cluster_key: str | None = None,
    ):
        self.engine = engine
        self.model_name = model_name
        self.worker_addr = worker_addr.rstrip("/")
        self.controller_addr = controller_addr.rstrip("/") if controller_addr else None
        self.image_limits = image_limits or ImageLimits()
        self.max_images = self.image_limits.max_images
        self.cluster_key = cluster_key  # required from callers (see build_app) and sent to the controller
        self.client = ClusterClient(self.controller_addr, cluster_key)
        self.heart_beat_interval = heart_beat_interval
        self.max_new_tokens_limit = max_new_tokens_limit
        if batching:
            self.scheduler = BatchScheduler(
                engine, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s, max_queue=max_queue
            )
        else:  # the original design, kept as a benchmark baseline: one `generate` per request, at most N at once
            self.scheduler = SerialScheduler(engine, concurrency=max_batch_size, max_queue=max_queue)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not be re-configured from two threads at once
        self._stop = threading.Event()
        self.registered = threading.Event()
        engine.encode(engine.build_prompt("warm-up"), [], 1)  # sets the tokenizer's state before threads share it

    # -- status ------------------------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"model_names": [self.model_name], "speed": 1, "queue_length": self.scheduler.queue_length}

    def details(self) -> dict:
        return {
            "model_name": self.model_name,
            "conv_mode": self.engine.conv_mode,
            "context_length": self.engine.context_len,
            "multimodal": self.engine.model.get_vision_tower() is not None
            if hasattr(self.engine.model, "get_vision_tower")
            else False,
            "max_images": self.max_images,
            "max_batch_size": self.scheduler.max_batch_size,
            "batching": isinstance(self.scheduler, BatchScheduler),
        }

    # -- requests ----------------------------------------------------------------------------------------------
    def _model_prompt(self, prompt: str) -> str:
        """The prompt with `<image>` wrapped in start/end tokens for models trained that way (as the original)."""
        return wrap_image_markers(
            prompt, mm_use_im_start_end=bool(getattr(self.engine.config, "mm_use_im_start_end", False))
        )

    def prepare(self, body: dict) -> tuple[str, EncodedRequest, GenerationParams]:
        """Validate a `/worker_generate_stream` body; every problem is a `ServeError` naming the field."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ServeError(f"`prompt` must be a non-empty string, got {_short(prompt)}.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ServeError(f"`prompt` is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ServeError(f"This worker serves `{self.model_name}`, not `{model}`; ask the controller for a worker.")
        # the original worker's defaults (temperature 1.0, 256 new tokens); any larger whole `max_new_tokens` is cut
        # to --max-new-tokens-limit (1024) as the original cut it, before the shared range check sees it
        limit, asked = self.max_new_tokens_limit, body.get("max_new_tokens")
        if type(asked) in (int, float) and math.isfinite(asked) and asked > limit and asked == int(asked):
            body = {**body, "max_new_tokens": limit}
        params = GenerationParams.from_request(body, ORIGINAL_WORKER_DEFAULTS, max_new_tokens_limit=limit)
        sources = body.get("images") or []
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ServeError("`images` must be a list of base64 strings (or data: / http(s) URLs).")
        if len(sources) > self.max_images:
            raise ServeError(f"{len(sources)} images sent; this worker takes at most {self.max_images} (--max-images).")
        try:  # every header is checked (pixels, aspect ratio, the request's total) before any image is decoded
            images = load_images(sources, self.image_limits)
        except ImageLoadError as err:
            raise ServeError(str(err)) from err
        with self._tokenizer_lock:
            request = self.engine.encode(self._model_prompt(prompt), images, 1)
        return prompt, request, params

    # -- controller --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()
        if self.controller_addr:
            threading.Thread(target=self._heart_beat_loop, name="llava-heart-beat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.stop()

    def register(self) -> bool:
        self.client.register(self.worker_addr, self.status())
        logger.info("Registered %s (model `%s`) with %s", self.worker_addr, self.model_name, self.controller_addr)
        return True

    def _wait_until_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if self.client.health(self.worker_addr, timeout=1):
                    return
            except CALL_ERRORS:
                pass
            self._stop.wait(0.2)

    def _heart_beat_loop(self) -> None:
        """Register (retrying until the controller is up, so start order does not matter), then send heartbeats;
        re-register whenever the controller no longer knows this worker (e.g. it restarted)."""
        self._wait_until_listening()
        retry, warned = 0.5, 0.0
        while not self._stop.is_set():
            try:
                if not self.registered.is_set():
                    if self.register():
                        self.registered.set()
                        retry = 0.5
                elif not self.client.heartbeat(self.worker_addr, self.scheduler.queue_length):
                    logger.info("The controller does not know this worker (restarted?); registering again.")
                    self.registered.clear()
                    continue
            except CALL_ERRORS as err:
                if time.monotonic() - warned > 30:
                    logger.warning(
                        "Cannot register with the controller at %s: %s; retrying.", self.controller_addr, err
                    )
                    warned = time.monotonic()
            if self.registered.is_set():
                self._stop.wait(self.heart_beat_interval)
            else:
                self._stop.wait(retry)
                retry = min(retry * 2, self.heart_beat_interval, 5.0)


def _short(value) -> str:
    text = repr(value)
    return f"`{text[:60]}...`" if len(text) > 60 else f"`{text}`"


def build_app(worker: ModelWorker, max_request_bytes: int):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title=f"LLaVA model worker ({worker.model_name})", lifespan=lifespan)

    def reject(err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request):
        try:
            body = await read_json_object(request)
            prompt, encoded, params = await run_in_threadpool(worker.prepare, body)
        except BadJSON as err:
            return reject(ServeError(str(err)))
        except ServeError as err:
            return reject(err)
        except RequestError as err:  # image count, context length, parameter ranges
            return reject(ServeError(str(err)))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(encoded, params, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            worker.scheduler.submit(job)
        except QueueFull as err:
            return reject(ServeError(str(err), ErrorCode.OVERLOADED))

        async def stream():
            finished = False
            try:
                while not finished:
                    event = await events.get()
                    # Under load the scheduler can run ahead of this stream: the text is cumulative, so only the
                    # newest of the queued updates needs sending (an error or the final chunk is never skipped).
                    while not event["error_code"] and not event.get("finished") and not events.empty():
                        event = events.get_nowait()
                    finished = bool(event.get("finished"))
                    if event["error_code"]:
                        yield encode_chunk(event["text"], event["error_code"])
                        continue
                    extra = {k: event[k] for k in ("finish_reason", "usage") if k in event}
                    yield encode_chunk(prompt + event["text"], 0, **extra)
            finally:
                if not finished:  # the client went away: free its row in the batch
                    job.cancelled.set()

        return StreamingResponse(stream(), media_type="application/octet-stream")

    def health() -> dict:
        scheduler = worker.scheduler
        return {
            "batches": scheduler.batches,
            "max_batch_rows": scheduler.max_rows_seen,
            "image_feature_cache": _cache_stats(worker.engine),
            "prefix_cache": None if worker.engine.prefix_cache is None else worker.engine.prefix_cache.stats(),
        }

    return finish_worker_app(app, worker, worker.engine.conv_mode, health, max_request_bytes)


def finish_worker_app(app: FastAPI, worker, conv_mode: str, health, max_request_bytes: int):
    """The routes every worker kind answers alike (status, model details, template, health: `health()` adds the
    kind's own fields) and the request-size and cluster-key guards around the app."""
    from llava.conversation import get_conv_template

    @app.post("/worker_get_status")
    async def get_status():
        return worker.status()

    @app.post("/model_details")
    async def model_details():
        return worker.details()

    @app.post("/worker_get_conv_template")
    async def conv_template():
        return {"conv_mode": conv_mode, "conv": get_conv_template(conv_mode).dict()}

    @app.get("/health")
    async def health_route():
        return {
            "status": "ok",
            "model": worker.model_name,
            "registered": worker.registered.is_set(),
            "queue_length": worker.scheduler.queue_length,
            **health(),
        }

    def error_body(message):
        return {"text": message, "error_code": 1}

    return ClusterKeyMiddleware(BodyLimitMiddleware(app, max_request_bytes, error_body), worker.cluster_key, error_body)


def _cache_stats(engine: LlavaEngine) -> dict | None:
    cache = getattr(engine.model, "image_feature_cache", None)
    return None if cache is None else cache.stats()


def _device_map(device: str, num_gpus: int | None):
    if num_gpus == 1 and device in ("auto", "cuda"):
        return {"": 0} if _cuda() else "auto"
    return "auto"  # several GPUs: the layers are spread over every visible GPU (choose them with CUDA_VISIBLE_DEVICES)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(parser, port=21002)
    add_cluster_args(parser)
    parser.add_argument("--worker-address", "--worker", dest="worker_address", default=None)
    parser.add_argument("--controller-address", "--controller", dest="controller_address", default=None)
    parser.add_argument("--no-register", action="store_true", help="Do not register with a controller.")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--model-name", default=None, help="Name clients ask for (default: from --model-path).")
    parser.add_argument("--conv-mode", default=None, help="Chat template override (default: the checkpoint's).")
    parser.add_argument("--vision-tower", default=None, help="Override the config's `mm_vision_tower` (a local dir).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--num-gpus", type=int, default=None, help="1: one GPU; more: spread over visible GPUs.")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--use-flash-attn", action="store_true")
    parser.add_argument("--multi-modal", action="store_true", help="Accepted for compatibility; not needed.")
    parser.add_argument("--limit-model-concurrency", type=int, default=5, help="Requests decoded at once (batch).")
    parser.add_argument("--max-queue-size", type=int, default=256, help="Waiting requests beyond this get 503.")
    parser.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=MAX_NEW_TOKENS_LIMIT,
        help="Larger `max_new_tokens` requests are cut to this (the original worker's 1024).",
    )
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="How long a new batch waits for company.")
    parser.add_argument(
        "--batching",
        choices=["on", "off"],
        default="on",
        help="off: the original design (one `generate` per request, --limit-model-concurrency at once), a baseline.",
    )
    parser.add_argument(
        "--image-cache-mb",
        type=float,
        default=256,
        help="Projected features of recently seen images kept for reuse (MiB, on the model's device); 0: off.",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256,
        help="Decoder keys/values of recent prompt prefixes ending with an image, kept so a question about an image "
        "seen before prefills only the question (MiB, on the model's device; with --batching on); 0: off.",
    )
    parser.add_argument("--stream-interval", type=int, default=1, help="Accepted for compatibility.")
    add_image_limit_args(parser)
    parser.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.load_8bit and args.load_4bit:
        parser.error("Choose one of --load-8bit and --load-4bit.")
    if args.limit_model_concurrency < 1:
        parser.error(f"--limit-model-concurrency {args.limit_model_concurrency}: must be at least 1.")
    for flag in ("image_cache_mb", "prefix_cache_mb"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be 0 (off) or more.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging("llava.serve.model_worker")
    configure_threads(args.threads)
    worker_addr = args.worker_address or local_url(args.host, args.port)
    key = cluster_key_from(args.cluster_key)
    warn_if_exposed(logger, "model worker", args.host, key)
    limits = image_limits_from(args)
    logger.info("Loading %s (base %s) on device %s", args.model_path, args.model_base, args.device)
    engine = LlavaEngine.from_pretrained(
        args.model_path,
        args.model_base,
        conv_mode=args.conv_mode,
        model_name=args.model_name,
        load_8bit=args.load_8bit,
        load_4bit=args.load_4bit,
        device=args.device,
        device_map=_device_map(args.device, args.num_gpus),
        use_flash_attn=args.use_flash_attn,
        vision_tower=args.vision_tower,
    )
    engine.enable_image_feature_cache(int(args.image_cache_mb * 2**20))
    engine.enable_prefix_cache(int(args.prefix_cache_mb * 2**20))
    model_name = args.model_name or get_model_name_from_path(args.model_path)
    worker = ModelWorker(
        engine,
        model_name,
        worker_addr,
        None if args.no_register else args.controller_address or "http://localhost:21001",
        max_batch_size=args.limit_model_concurrency,
        max_queue=args.max_queue_size,
        max_new_tokens_limit=args.max_new_tokens_limit,
        batch_wait_s=args.batch_wait_ms / 1000,
        batching=args.batching == "on",
        image_limits=limits,
        heart_beat_interval=args.heart_beat_interval,
        cluster_key=key,
    )
    logger.info("Serving `%s` (template `%s`) at %s", model_name, engine.conv_mode, worker_addr)
    run_server(build_app(worker, args.max_request_bytes), args.host, args.port)


if __name__ == "__main__":
    main()
