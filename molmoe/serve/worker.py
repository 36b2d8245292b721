"""The engine thread and the preprocessing pool behind the HTTP handlers.

Threads and queues:

    event loop (uvicorn)          preprocessing pool (N threads)      engine thread (one)
    --------------------          ------------------------------      -------------------
    admit()  429 / 503                                                owns the Engine (not
    prepare() ------------------> fetch + decode image, processor     thread-safe); loop:
                <---------------- inputs, original size                 take every command
    submit() ---- inbox (queue.SimpleQueue) -------------------------->   (submit / cancel)
    cancel() ---- inbox ---------------------------------------------->   step() while work,
    job.events (asyncio.Queue) <-- loop.call_soon_threadsafe ---------    block when idle
                                   ("accepted"), ("text", delta), ("done", result, error)

Image work never runs on the engine thread, so a large image never stalls the decode steps of
the requests already running. Commands reach the Engine only between two steps.

Admission counts a request from `admit` until the engine reports it finished (or it fails
before reaching the engine): at most `max_queue` such requests, beyond that 429.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from molmoe.errors import MolmoeError
from molmoe.generation import Engine, GenerationConfig, GenerationLengthError
from molmoe.serve.metrics import Metrics
from molmoe.serve.options import ServeOptions
from molmoe.serve.schemas import APIError

from molmoe.serve.images import ImageInputError, ImagePolicy, read_image, read_image_url

log = logging.getLogger("molmoe.serve")
_STOP = object()


class Job:
    """One chat request on its way through the worker. Event-loop side: `events`; engine side:
    `request` (the Engine's Request)."""

    def __init__(self, worker: "EngineWorker", loop: asyncio.AbstractEventLoop, label: str):
        self.worker, self.loop, self.label = worker, loop, label
        self.events: asyncio.Queue = asyncio.Queue()
        self.t0 = time.perf_counter()
        self.inputs: dict | None = None
        self.config: GenerationConfig | None = None
        self.stream = False
        self.prompt_tokens = 0
        self.original_size: tuple[int, int] | None = None
        self.request = None  # engine thread only
        self.seen_tokens = 0  # engine thread only
        self.finished = False  # event-loop side: "done" delivered
        self._released = False

    def post(self, event: tuple) -> None:
        """From the engine thread: hand an event to the job's event loop."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed (server gone): nobody is listening
            pass

    def _deliver(self, event: tuple) -> None:
        if event[0] == "done":
            self.finished = True
            self.release()
        self.events.put_nowait(event)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.worker._in_flight -= 1


class EngineWorker:
    def __init__(self, proc, model, eos: int | None, options: ServeOptions,
                 metrics: Metrics | None = None):
        self.proc, self.model, self.options = proc, model, options
        self.metrics = metrics or Metrics()
        max_pos = model.config.text.max_position_embeddings
        self.max_len = min(options.max_len or 4096, max_pos)
        self.max_positions = max_pos
        self.engine = Engine(model, proc.tokenizer, eos_token_id=eos, max_batch=options.max_batch,
                             max_len=self.max_len, mode=options.decode_mode)
        self.policy = ImagePolicy(max_bytes=options.max_image_bytes,
                                  max_pixels=options.max_image_pixels,
                                  local_dir=options.allow_local_files,
                                  allow_remote=options.allow_remote_images,
                                  fetch_timeout_s=options.fetch_timeout_s)
        # The processor checks the decoded array again against this (set once: shared object).
        proc.max_pixels = options.max_image_pixels
        self.pool = ThreadPoolExecutor(options.preprocess_workers,
                                       thread_name_prefix="molmoe-preprocess")
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="molmoe-engine", daemon=True)
        self._jobs: dict[int, Job] = {}  # engine thread only: Request.id -> Job
        self._in_flight = 0  # event loop only
        self._running = 0  # written by the engine thread, read for metrics
        self.accepting = True
        self.cancelled_total = 0  # requests cancelled on the engine (disconnects, shutdown)

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def drain(self) -> None:
        """Stop admitting (new requests get 503); running ones go on. Any thread."""
        self.accepting = False

    def admit(self, label: str) -> Job:
        if not self.accepting or not self.alive:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self._in_flight >= self.options.max_queue:
            raise APIError(429, f"the server is busy ({self._in_flight} requests admitted, "
                                f"the limit is {self.options.max_queue}); retry later",
                           code="queue_full",
                           headers={"Retry-After": str(self.options.retry_after_s)})
        self._in_flight += 1
        return Job(self, asyncio.get_running_loop(), label)

    async def prepare(self, job: Job, text: str, image_url: str | None) -> None:
        """Image fetch/decode and the processor, in the pool. Raises APIError (4xx)."""
        loop = asyncio.get_running_loop()
        try:
            inputs, size = await loop.run_in_executor(self.pool, self._prepare, text, image_url,
                                                      job.config.max_new_tokens)
        except ImageInputError as e:
            raise APIError(getattr(e, "status", 400), str(e), param="image_url",
                           code="bad_image") from None
        except MolmoeError as e:  # PromptTooLongError, ImageError, GenerationLengthError, ...
            raise APIError(400, str(e), param="messages", code=_code(e)) from None
        job.inputs, job.original_size = inputs, size
        job.prompt_tokens = int(inputs["input_ids"].shape[0])

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        if not job.finished:
            self._inbox.put(("cancel", job))

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop admitting, let running requests finish for up to `grace_s`, cancel the rest,
        join the engine thread."""
        self.drain()
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        while self._in_flight > 0 and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        self._inbox.put(("cancel_all", None))
        self._inbox.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def depth(self) -> tuple[int, int]:
        """(admitted but not decoding, decoding), for the gauges."""
        running = self._running
        return max(self._in_flight - running, 0), running

    # ------------------------------------------------------------------ preprocessing pool

    def _prepare(self, text: str, image_url: str | None, max_new_tokens: int):
        image = None
        if image_url is not None:
            data, description = read_image_url(image_url, self.policy)
            image = read_image(data, self.policy, description,
                               self.proc.decode_target if self.options.fast_decode else None)
        # Room for the answer in the model's positions and in a cache row (the last sampled
        # token is never fed back, hence the +1).
        limit = min(self.max_positions - max_new_tokens, self.max_len + 1 - max_new_tokens)
        if limit < 1:
            raise GenerationLengthError(
                f"max_tokens={max_new_tokens} leaves no room for a prompt (the server's context "
                f"is {min(self.max_positions, self.max_len + 1)} tokens)")
        inputs = self.proc(text, images=image, max_length=limit)
        size = inputs.pop("original_size", None)
        return inputs, (tuple(int(v) for v in size) if size is not None else None)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:
                command = self._inbox.get(block=not engine.has_work())
            except queue.Empty:
                command = None
            while command is not None:  # every command that arrived, between two steps
                if command is _STOP:
                    return
                self._command(*command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if engine.has_work():
                self._step()

    def _command(self, kind: str, job: Job | None) -> None:
        engine = self.engine
        if kind == "submit":
            callback = (lambda delta, job=job: job.post(("text", delta))) if job.stream else None
            try:
                job.request = engine.submit(job.inputs, job.config, on_text=callback,
                                            label=job.label)
            except MolmoeError as e:
                job.post(("done", None, APIError(400, str(e), param="messages", code=_code(e))))
                return
            except Exception as e:  # a bug: this request fails alone
                log.error("submit failed:\n%s", traceback.format_exc())
                job.post(("done", None, APIError(500, f"internal error: {e}")))
                return
            job.inputs = None  # the engine holds its own copy on the device
            self._jobs[job.request.id] = job
            job.post(("accepted",))
        elif kind == "cancel":
            if job.request is not None and not job.request.finished:
                engine.cancel(job.request)
                self.cancelled_total += 1
                self._finished(job)
        elif kind == "cancel_all":
            for j in list(self._jobs.values()):
                self._command("cancel", j)
        self._set_running()

    def _step(self) -> None:
        try:
            done = self.engine.step()
        except Exception as e:  # not one request's failure: fail the running ones, go on
            log.error("decode step failed:\n%s", traceback.format_exc())
            for job in list(self._jobs.values()):
                if not job.request.finished:
                    self.engine.cancel(job.request)
                job.request.error = RuntimeError(f"the decode step failed: {e}")
                job.request.finish_reason = "error"
                self._finished(job)
            self._set_running()
            return
        generated = 0
        for job in self._jobs.values():
            generated += job.request.new_tokens - job.seen_tokens
            job.seen_tokens = job.request.new_tokens
        self.metrics.tokens(generated)
        for request in done:
            job = self._jobs.get(request.id)
            if job is not None:
                self._finished(job)
        self._set_running()

    def _finished(self, job: Job) -> None:
        self._jobs.pop(job.request.id, None)
        r = job.request
        if r.new_tokens > job.seen_tokens:
            self.metrics.tokens(r.new_tokens - job.seen_tokens)
            job.seen_tokens = r.new_tokens
        if r.finish_reason != "cancelled":
            ttft = r.t_first - job.t0 if r.t_first else None
            self.metrics.observe(ttft, r.t_done - job.t0)
        job.post(("done", r.result, r.error))

    def _set_running(self) -> None:
        self._running = len(self.engine.running)


def _code(e: Exception) -> str:
    name = type(e).__name__
    return {"PromptTooLongError": "prompt_too_long", "GenerationLengthError": "prompt_too_long",
            "ImageError": "bad_image"}.get(name, "invalid_request")
