"""Continuous batching for a model worker: one thread decodes every queued request in shared forward passes.

Requests wait in a FIFO queue. The scheduler thread takes the oldest request and every queued request with the same
sampling settings (`GenerationParams.batch_key()`), up to `max_batch_size`, and decodes them step by step with a
`BatchDecoder`. Between steps finished or abandoned rows leave, and newly queued compatible requests join, as long
as the oldest waiting request is compatible (so a request with other settings is never starved: the batch drains
and its turn comes next). Each request's callback receives its growing text as it is generated.

`SerialScheduler` is the original LLaVA worker's design (one HF `generate` per request behind a semaphore), kept
as the baseline the serving benchmark measures against (`--batching off`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llava.inference import BatchDecoder, EncodedRequest, GenerationParams, LlavaEngine, RequestError
from llava.serve.protocol import ErrorCode, Event

logger = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One queued request. `emit` is called from the scheduler thread with `Event`s (protocol.py): progress
    `{"text", "error_code": 0}`, then one final event with `"finished": True` and either `finish_reason` + `usage`,
    or a non-zero `error_code` and the message in `text`. They become bytes only at the worker's HTTP edge."""

    request: EncodedRequest
    params: GenerationParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    enqueued_at: float = field(default_factory=time.monotonic)


class QueueFull(Exception):
    pass


def error_event(err: BaseException) -> Event:
    """The final event for a request whose generation raised `err`: a message that names the real cause."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {
            "text": "The model worker ran out of memory while generating. Send a shorter prompt, fewer or smaller "
            f"images, or a lower max_new_tokens, or try again when it is less busy. ({text[:300]})",
            "error_code": int(ErrorCode.OVERLOADED),
            "finished": True,
        }
    if isinstance(err, RequestError):
        return {"text": str(err), "error_code": int(ErrorCode.BAD_REQUEST), "finished": True}
    message = f"Generation failed on the model worker: {text[:500]}"
    return {"text": message, "error_code": int(ErrorCode.SERVER_ERROR), "finished": True}


class Scheduler:
    """What the worker needs from a scheduler: `submit` a `Job` (or `QueueFull`), `queue_length`, `start`/`stop`,
    and the statistics `batches` / `max_rows_seen`. Subclasses provide `_threads` (started by `start`) and run jobs."""

    def __init__(self, engine: LlavaEngine, max_batch_size: int, max_queue: int, conv_mode: str | None, what: str):
        if max_batch_size < 1:
            raise ValueError(f"`{what}`={max_batch_size}; it must be at least 1.")
        self.engine = engine
        self.max_batch_size = max_batch_size  # rows decoded at once
        self.max_queue = max_queue
        self.conv_mode = conv_mode
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self.batches = 0  # statistics, for logs and tests
        self.max_rows_seen = 0

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job`; `QueueFull` when --max-queue-size requests already wait."""
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"The model worker's queue is full ({len(self._queue)} requests waiting, --max-queue-size "
                    f"{self.max_queue}); try again shortly."
                )
            self._queue.append(job)
            self._cv.notify()

    @property
    def queue_length(self) -> int:
        """Requests waiting plus requests being decoded."""
        return len(self._queue) + self._running

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # a client's callback must never take the scheduler down
            logger.exception("Delivering an event for request %s failed", job.id)

    def _beam_answer(self, job: Job) -> Event:
        """The final event of a beam-search request: `generate` cannot stream beams, so one answer, no partials."""
        text = self.engine.generate_encoded([job.request], job.params, self.conv_mode)[0]
        usage = {"prompt_tokens": job.request.n_tokens, "completion_tokens": None}
        return {"text": text, "error_code": 0, "finished": True, "finish_reason": "stop", "usage": usage}


class BatchScheduler(Scheduler):
    """Queue + scheduler thread around one `LlavaEngine`."""

    def __init__(
        self,
        engine: LlavaEngine,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        max_queue: int = 256,
        conv_mode: str | None = None,
    ):
        super().__init__(engine, max_batch_size, max_queue, conv_mode, "max_batch_size")
        self.batch_wait_s = batch_wait_s
        self._active: set[Job] = set()  # taken from the queue, not finished yet
        self._last_rows = 0  # most rows the last batch held: >1 means requests are arriving concurrently
        self._threads = [threading.Thread(target=self._run, name="llava-batch-scheduler", daemon=True)]

    # -- scheduler thread --------------------------------------------------------------------------------------
    def _take(self, key: tuple | None, limit: int) -> list[Job]:
        """Up to `limit` queued jobs sharing the oldest job's batch key, if that key is `key` (or `key` is None)."""
        with self._cv:
            while self._queue and self._queue[0].cancelled.is_set():
                self._queue.popleft()
            if not self._queue or limit <= 0:
                return []
            head_key = self._queue[0].params.batch_key()
            if key is not None and head_key != key:
                return []
            taken, rest = [], deque()
            for job in self._queue:
                if job.cancelled.is_set():
                    continue
                if len(taken) < limit and job.params.batch_key() == head_key:
                    taken.append(job)
                else:
                    rest.append(job)
            self._queue = rest
            self._running += len(taken)
            self._active.update(taken)
            return taken

    def _finish(self, job: Job, event: Event) -> None:
        with self._cv:
            if job not in self._active:
                return
            self._active.discard(job)
            self._running -= 1
        self._emit(job, event)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                busy = len(self._queue) > 1 or self._last_rows > 1
            if self.batch_wait_s and busy:
                # requests arrive together: let the rest of a burst arrive, so it shares the first forward pass (a
                # lone request starts at once; one arriving during its decode joins between steps anyway)
                time.sleep(self.batch_wait_s)
            jobs = self._take(None, self.max_batch_size)
            if not jobs:
                continue
            self.batches += 1
            self._last_rows = len(jobs)
            try:
                if jobs[0].params.num_beams > 1:
                    self._run_beams(jobs)
                else:
                    self._run_batch(jobs)
            except Exception as err:  # never let the scheduler thread die: fail what it held, serve the rest
                logger.exception("The batch scheduler failed")
                for job in list(self._active):
                    self._finish(job, error_event(err))

    def _run_beams(self, jobs: list[Job]) -> None:
        for job in jobs:  # beam search goes through `generate`, one request at a time, no partial text
            try:
                event = self._beam_answer(job)
            except Exception as err:
                logger.exception("Beam search failed for request %s", job.id)
                event = error_event(err)
            self._finish(job, event)

    def _admit(self, decoder: BatchDecoder, jobs: list[Job]) -> None:
        try:
            decoder.add([(job, job.request, job.params) for job in jobs])
        except Exception as err:  # the running rows are untouched: `add` splices only after a successful prefill
            logger.exception("Prefill failed for %d request(s)", len(jobs))
            for job in jobs:
                self._finish(job, error_event(err))
            return
        self.max_rows_seen = max(self.max_rows_seen, len(decoder))
        self._last_rows = max(self._last_rows, len(decoder))

    def _run_batch(self, jobs: list[Job]) -> None:
        key = jobs[0].params.batch_key()
        decoder = self.engine.decoder(jobs[0].params, self.conv_mode)
        self._admit(decoder, jobs)
        while len(decoder):
            try:
                updates = decoder.step()
            except Exception as err:
                logger.exception("Decoding failed for a batch of %d", len(decoder))
                event = error_event(err)
                for row in list(decoder.rows):
                    self._finish(row.key, dict(event))
                return
            for update in updates:
                job: Job = update.key
                if update.finished:
                    usage = {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens}
                    event = {"text": update.text, "error_code": 0, "finished": True}
                    self._finish(job, {**event, "finish_reason": update.finish_reason, "usage": usage})
                elif update.changed:
                    self._emit(job, {"text": update.text, "error_code": 0})
            gone = [row.key for row in decoder.rows if row.key.cancelled.is_set()]
            if gone:
                decoder.remove(gone)
                with self._cv:
                    self._running -= len(gone)
                    self._active.difference_update(gone)
            if decoder.can_join and len(decoder) < self.max_batch_size and not self._stopped:
                more = self._take(key, self.max_batch_size - len(decoder))
                if more:
                    self._admit(decoder, more)


class SerialScheduler(Scheduler):
    """The original worker's design, kept as the baseline for benchmarks (`--batching off`): every request runs its
    own HF `generate` (streamed), at most `concurrency` at a time (the original's semaphore), in arrival order.
    """

    def __init__(self, engine: LlavaEngine, concurrency: int = 1, max_queue: int = 256, conv_mode: str | None = None):
        # rows decoded at once: one per running `generate`
        super().__init__(engine, concurrency, max_queue, conv_mode, "concurrency")
        self._threads = [
            threading.Thread(target=self._run, name=f"llava-serial-{i}", daemon=True) for i in range(concurrency)
        ]

    def _next(self) -> Job | None:
        with self._cv:
            while not self._stopped:
                while self._queue and self._queue[0].cancelled.is_set():
                    self._queue.popleft()
                if self._queue:
                    self._running += 1
                    self.batches += 1
                    self.max_rows_seen = max(self.max_rows_seen, self._running)
                    return self._queue.popleft()
                self._cv.wait()
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                event = self._serve(job)
            except Exception as err:
                logger.exception("Generation failed for request %s", job.id)
                event = error_event(err)
            with self._cv:
                self._running -= 1
            if event is not None:
                self._emit(job, event)

    def _serve(self, job: Job) -> Event | None:
        if job.params.num_beams > 1:
            return self._beam_answer(job)
        info: dict = {}
        text = ""
        with contextlib.closing(self.engine.stream_encoded(job.request, job.params, self.conv_mode, usage=info)) as out:
            for text in out:
                if job.cancelled.is_set():
                    return None  # the client went away; closing the stream stops `generate`
                self._emit(job, {"text": text, "error_code": 0})
        usage = {"prompt_tokens": job.request.n_tokens, "completion_tokens": info["completion_tokens"]}
        return {"text": text, "error_code": 0, "finished": True, "finish_reason": info["finish_reason"], "usage": usage}
