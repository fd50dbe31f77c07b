"""A worker that serves a model through an OpenAI-compatible engine (vLLM, SGLang, lmdeploy, `transformers serve`).

    python -m llava.serve.engine_worker --engine-url http://localhost:8000/v1 \\
        --controller http://localhost:21001 --port 40000 --worker http://localhost:40000 [--conv-mode llava_v1]

To the controller, web UI and OpenAI API server it is a model worker like `llava.serve.model_worker`: it registers
(with the cluster key), sends heartbeats and answers `/worker_generate_stream`, `/worker_get_status`,
`/model_details`, `/worker_get_conv_template` and `/health`. Each request's prompt, written in the LLaVA template
with `<image>` markers, is turned back into chat messages (system / user / assistant turns, image parts as data
URLs) and sent to the engine's `/v1/chat/completions`, so the engine applies the chat template of the checkpoint it
serves (a `convert_hf` export renders exactly our template). Sampling settings and the token limit are passed on;
stop strings are passed on (`--engine-stop forward`, the default) and always also applied here, so the answer ends
where our own worker's would; `--engine-stop local` applies them only here (for engines that reject `stop`, e.g.
`transformers serve` with vision-language models), closing the engine's stream at the first stop string.
An engine that does not answer at start-up stops the worker with an error naming its URL (`--engine-wait` waits
for one that is still loading); one that goes away later fails each request with that URL in the message.
The prompt -> messages translation is `llava.serve.engine_prompt`, the engine's HTTP client `llava.serve.engine_client`;
`llava.serve.sglang_worker` is this worker with the original sglang_worker's flags. Recipes: docs/Serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import threading
from dataclasses import dataclass

from llava.constants import WORKER_HEART_BEAT_INTERVAL
from llava.conversation import UnknownTemplateError, get_conv_template, guess_conv_mode, to_chat_template_jinja
from llava.inference import ORIGINAL_WORKER_DEFAULTS, GenerationParams, RequestError
from llava.mm_utils import ImageLimits, ImageLoadError, get_model_name_from_path, load_images
from llava.serve import server_utils as su
from llava.serve.batching import QueueFull
from llava.serve.client import ClusterClient, cluster_key_from
from llava.serve.engine_client import EngineClient, EngineInfo, EngineUnavailable, probe_engine
from llava.serve.engine_prompt import image_data_url, to_messages
from llava.serve.model_worker import MAX_NEW_TOKENS_LIMIT, MAX_PROMPT_CHARS, ModelWorker, finish_worker_app
from llava.serve.protocol import ErrorCode, ServeError

su.require("fastapi", "uvicorn", "httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

logger = logging.getLogger("llava.serve.engine_worker")

DEFAULT_CONTEXT_LENGTH = 2048  # reported to the API server when the engine does not say (vLLM does: max_model_len)


class EngineGate:
    """At most `concurrency` requests at the engine at once, `max_queue` more waiting (then 503 overloaded); the
    queue length the controller sees is both together, as the original worker's semaphore reported."""

    def __init__(self, concurrency: int, max_queue: int):
        if concurrency < 1:
            raise ValueError(f"--limit-model-concurrency {concurrency}: must be at least 1.")
        self.max_batch_size, self.max_queue = concurrency, max_queue
        self.active = self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None  # made in the server's event loop

    @property
    def queue_length(self) -> int:
        return self.active + self.waiting

    async def acquire(self) -> None:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_batch_size)
        if self._semaphore.locked() and self.waiting >= self.max_queue:
            raise QueueFull(f"{self.waiting} requests are waiting for the engine (--max-queue-size); retry later.")
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self._semaphore.release()

    def start(self) -> None:  # the scheduler interface ModelWorker's start/stop call
        pass

    def stop(self) -> None:
        pass


@dataclass
class Forward:
    """A checked request: the prompt (echoed in every chunk), the engine's request body and the stop strings."""

    prompt: str
    body: dict
    stops: list[str]


class EngineWorker(ModelWorker):
    """A model worker whose model runs in an engine. Registration, heartbeats and `status` are ModelWorker's; the
    engine's answers are relayed as our stream chunks."""

    def __init__(
        self,
        engine_url: str,
        info: EngineInfo,
        model_name: str,
        conv_mode: str,
        worker_addr: str,
        controller_addr: str | None,
        *,
        engine_api_key: str | None = None,
        forward_stop: bool = True,
        concurrency: int = 5,
        max_queue: int = 256,
        image_limits: ImageLimits | None = None,
        heart_beat_interval: float = WORKER_HEART_BEAT_INTERVAL,
        max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
        context_length: int | None = None,
        cluster_key: str | None = None,
    ):
        # Not ModelWorker.__init__ (that one loads a model): the attributes its registration methods use.
        self.model_name = model_name
        self.worker_addr = worker_addr.rstrip("/")
        self.controller_addr = controller_addr.rstrip("/") if controller_addr else None
        self.cluster_key = cluster_key
        self.client = ClusterClient(self.controller_addr, cluster_key)
        self.heart_beat_interval = heart_beat_interval
        self.scheduler = EngineGate(concurrency, max_queue)
        self._stop = threading.Event()
        self.registered = threading.Event()
        self.image_limits = image_limits or ImageLimits()
        self.max_images = self.image_limits.max_images
        self.max_new_tokens_limit = max_new_tokens_limit
        self.engine = EngineClient(engine_url, info.model, engine_api_key)
        self.engine_url, self.forward_stop = self.engine.engine_url, forward_stop
        self.conv_mode = conv_mode
        self.context_length = context_length or info.context_length or DEFAULT_CONTEXT_LENGTH

    def details(self) -> dict:
        return {
            "model_name": self.model_name,
            "conv_mode": self.conv_mode,
            "context_length": self.context_length,
            "multimodal": True,
            "max_images": self.max_images,
            "max_batch_size": self.scheduler.max_batch_size,
            "batching": True,
            "engine": self.engine_url,
        }

    def prepare(self, body: dict) -> Forward:
        """Check a `/worker_generate_stream` body (as our model worker does) and build the engine's request."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ServeError(f"`prompt` must be a non-empty string, got `{str(prompt)[:60]}`.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ServeError(f"`prompt` is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ServeError(f"This worker serves `{self.model_name}`, not `{model}`; ask the controller for a worker.")
        limit, asked = self.max_new_tokens_limit, body.get("max_new_tokens")
        if (
            type(asked) in (int, float) and math.isfinite(asked) and asked > limit and asked == int(asked)
        ):  # cut, as our worker (and the
            body = {**body, "max_new_tokens": limit}  # original) cut it, before the range check sees it
        try:
            params = GenerationParams.from_request(body, ORIGINAL_WORKER_DEFAULTS, max_new_tokens_limit=limit)
        except RequestError as err:
            raise ServeError(str(err)) from err
        if params.num_beams != 1:
            raise ServeError("`num_beams` > 1 is not supported through an engine; leave it out.")
        sources = body.get("images") or []
        sources = [sources] if isinstance(sources, str) else sources
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ServeError("`images` must be a list of base64 strings (or data: / http(s) URLs).")
        try:  # the same checks as our worker (pixels, aspect ratio, the request's total) before decoding
            images = load_images(sources, self.image_limits)
        except ImageLoadError as err:
            raise ServeError(str(err)) from err
        messages = to_messages(prompt, self.conv_mode, [image_data_url(im) for im in images])
        stops = params.stop_strings(get_conv_template(self.conv_mode).stop_str)
        request = {
            "model": self.engine.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if stops and self.forward_stop:
            request["stop"] = stops
        return Forward(prompt, request, stops)


def build_app(worker: EngineWorker, max_request_bytes: int):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.engine.start()
        worker.start()
        yield
        worker.stop()
        await worker.engine.aclose()

    app = FastAPI(title=f"LLaVA engine worker ({worker.model_name} at {worker.engine_url})", lifespan=lifespan)

    def reject(err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request):
        try:
            forward = await run_in_threadpool(worker.prepare, await su.read_json_object(request))
        except su.BadJSON as err:
            return reject(ServeError(str(err)))
        except ServeError as err:
            return reject(err)
        gate = worker.scheduler
        try:
            await gate.acquire()
        except QueueFull as err:
            return reject(ServeError(str(err), ErrorCode.OVERLOADED))
        try:
            upstream = await worker.engine.open(forward.body)
        except ServeError as err:
            gate.release()
            logger.warning("%s", err.message)
            return reject(err)

        async def stream():
            try:
                async for chunk in worker.engine.relay(forward.prompt, forward.stops, upstream):
                    yield chunk
            finally:
                gate.release()

        return StreamingResponse(stream(), media_type="application/octet-stream")

    return finish_worker_app(app, worker, worker.conv_mode, lambda: {"engine": worker.engine_url}, max_request_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def add_worker_args(parser: argparse.ArgumentParser, concurrency: int) -> None:
    """The flags the engine worker and `sglang_worker` share (the original sglang_worker's names included)."""
    su.add_server_args(parser, port=21002)
    su.add_cluster_args(parser)
    parser.add_argument("--worker-address", "--worker", dest="worker_address", default=None)
    parser.add_argument("--controller-address", "--controller", dest="controller_address", default=None)
    parser.add_argument("--no-register", action="store_true", help="Do not register with a controller.")
    parser.add_argument("--model-name", default=None, help="Name clients ask for (default: from the engine's model).")
    parser.add_argument("--engine-model", default=None, help="The engine's model id (default: the one it serves).")
    parser.add_argument(
        "--conv-mode",
        default=None,
        help="The LLaVA template prompts arrive in (default: the template whose chat template the engine's model "
        "directory holds, when it is a local convert_hf export; else guessed from the model name).",
    )
    parser.add_argument("--engine-api-key", default=os.environ.get("LLAVA_ENGINE_API_KEY"), help="Bearer key.")
    parser.add_argument("--engine-wait", type=float, default=0.0, help="Seconds to wait for the engine at start.")
    parser.add_argument(
        "--engine-stop",
        choices=["forward", "local"],
        default="forward",
        help="forward: send stop strings to the engine (and apply them here too); local: apply them only here.",
    )
    parser.add_argument("--context-length", type=int, default=None, help="Reported to clients (default: engine's).")
    parser.add_argument(
        "--limit-model-concurrency", type=int, default=concurrency, help="Requests at the engine at once."
    )
    parser.add_argument("--max-queue-size", type=int, default=256, help="Waiting requests beyond this get 503.")
    parser.add_argument("--max-new-tokens-limit", type=int, default=MAX_NEW_TOKENS_LIMIT)
    parser.add_argument("--stream-interval", type=int, default=1, help="Accepted for compatibility.")
    parser.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL)
    su.add_image_limit_args(parser)


def detect_conv_mode(engine_model: str, model_name: str) -> str:
    """The template of a local convert_hf export (from its chat template), else the original's guess by name."""
    path = os.path.join(engine_model, "chat_template.jinja")
    if os.path.isfile(path):
        from llava.model.convert_hf import match_conv_template

        with open(path) as f:
            found = match_conv_template(f.read())
        if found:
            return found
    guessed = guess_conv_mode(model_name)
    logger.warning("Template `%s` guessed from the name `%s`; set --conv-mode if it is not right.", guessed, model_name)
    return guessed


def serve(args: argparse.Namespace, engine_url: str, name: str = "llava.serve.engine_worker") -> None:
    """Probe the engine, then run the worker until it is stopped."""
    su.setup_logging(name)
    limits = su.image_limits_from(args)
    worker_addr = args.worker_address or su.local_url(args.host, args.port)
    key = cluster_key_from(args.cluster_key)
    su.warn_if_exposed(logger, "engine worker", args.host, key)
    try:
        info = probe_engine(engine_url, args.engine_model, args.engine_api_key, args.engine_wait)
    except EngineUnavailable as err:
        raise SystemExit(f"error: {err}") from None
    model_name = args.model_name or get_model_name_from_path(info.model)
    conv_mode = args.conv_mode or detect_conv_mode(info.model, model_name)
    try:
        to_chat_template_jinja(conv_mode)  # a template the engine's chat template can match (no few-shot turns)
    except (UnknownTemplateError, ValueError) as err:
        raise SystemExit(f"error: --conv-mode {conv_mode}: {err}") from None
    worker = EngineWorker(
        engine_url,
        info,
        model_name,
        conv_mode,
        worker_addr,
        None if args.no_register else args.controller_address or "http://localhost:21001",
        engine_api_key=args.engine_api_key,
        forward_stop=args.engine_stop == "forward",
        concurrency=args.limit_model_concurrency,
        max_queue=args.max_queue_size,
        image_limits=limits,
        heart_beat_interval=args.heart_beat_interval,
        max_new_tokens_limit=args.max_new_tokens_limit,
        context_length=args.context_length,
        cluster_key=key,
    )
    logger.info("Serving `%s` (template `%s`) at %s through %s", model_name, conv_mode, worker_addr, engine_url)
    su.run_server(build_app(worker, args.max_request_bytes), args.host, args.port)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-url", required=True, help="The engine's OpenAI API base, e.g. http://host:8000/v1.")
    add_worker_args(parser, concurrency=64)
    args = parser.parse_args(argv)
    if args.limit_model_concurrency < 1:
        parser.error(f"--limit-model-concurrency {args.limit_model_concurrency}: must be at least 1.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    serve(args, args.engine_url.rstrip("/"))


if __name__ == "__main__":
    main()
