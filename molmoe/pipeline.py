"""`molmoe.load_pipeline`: processor, model and EOS id of one checkpoint, checked to belong
together. What `molmoe generate` and `molmoe demo` load, for Python callers too, so both stop
generating at the same id.
"""
from __future__ import annotations

import os
from collections.abc import Callable

# The steps `progress` is told about, in order.
LOAD_STEPS = ("locating checkpoint", "tokenizer and processor", "weights")


def load_pipeline(model_id: str | os.PathLike, *, dtype="float32", backend="reference",
                  device: str | None = None, check_finite: bool = True, compat: str = "molmoe",
                  progress: Callable[[int, int, str], None] | None = None):
    """-> (processor, model, eos_id) for a hub id or checkpoint directory.

    `device` None: cuda if available, else cpu. dtype, backend, check_finite and compat are
    `molmoe.load`'s (compat is the processor's too). The tokenizer must fit the model's
    embedding rows (`check_vocabulary`); the EOS id is `engine_eos(model, tokenizer)`: the
    checkpoint's generation_config.json id, else the tokenizer's. `progress(done, total, step)`
    is called as each of LOAD_STEPS begins (done = steps finished) and once at the end
    (done == total, step "done"): loading is the slow part, a caller may show it.
    """
    import torch

    from molmoe.checkpoint import load
    from molmoe.checkpoint.files import resolve
    from molmoe.generation.eos import check_vocabulary, engine_eos
    from molmoe.processing import Processor

    report = progress or (lambda done, total, step: None)
    total = len(LOAD_STEPS)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    report(0, total, LOAD_STEPS[0])
    directory = resolve(model_id)
    report(1, total, LOAD_STEPS[1])
    proc = Processor.from_pretrained(directory, compat=compat)
    report(2, total, LOAD_STEPS[2])
    model = load(directory, dtype=dtype, backend=backend, device=device,
                 check_finite=check_finite, compat=compat)
    report(3, total, "done")
    check_vocabulary(proc.tokenizer, model.config)
    return proc, model, engine_eos(model, proc.tokenizer)


class ItemResult:
    """One item of `generate_many`: its index, and the result or the error that stopped it."""

    __slots__ = ("index", "result", "error", "original_size", "prepared_s")

    def __init__(self, index, result=None, error=None, original_size=None, prepared_s=0.0):
        self.index, self.result, self.error = index, result, error
        self.original_size = original_size  # (W, H) the points refer to, or None
        self.prepared_s = prepared_s  # image decode + processor, on a worker thread

    def __repr__(self):
        what = f"error={self.error!r}" if self.error else f"text={self.result.text!r}"
        return f"ItemResult({self.index}, {what})"


def generate_many(engine, processor, items, config=None, *, workers: int = 2,
                  ahead: int | None = None, max_length: int | None = None):
    """Answer many (prompt text, image or None) items, yielding `ItemResult`s as they finish.

    Images are decoded and preprocessed on `workers` threads, up to `ahead` items (default
    2 x the engine's batch) before the engine needs them, so the CPU work of the next requests
    overlaps the model's work (ViT, prefill, decode steps) on the current ones; PIL's decode and
    the native preprocessing op release the GIL. Items enter the engine as soon as they are
    ready, in order, while earlier ones decode (continuous batching).

    A bad item (unreadable image, prompt too long, ...) yields its `MolmoeError` and the others
    go on. max_length: refuse longer prompts (default: the positions left after the answer).
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    from molmoe.errors import MolmoeError, UsageError
    from molmoe.generation.engine import GenerationConfig, prompt_allowance

    config = config or GenerationConfig()
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
    ahead = ahead if ahead is not None else 2 * (engine.max_batch or 8)
    if not isinstance(ahead, int) or ahead < 1:
        raise UsageError(f"ahead must be an integer >= 1, got {ahead!r}")
    if engine.has_work():
        raise UsageError("generate_many() needs an idle engine (requests are running)")
    if max_length is None:
        max_length = prompt_allowance(engine.model.config.text.max_position_embeddings,
                                      config.max_new_tokens)

    def prepare(text, image):
        t0 = time.perf_counter()
        inputs = processor(text, images=image, max_length=max_length)
        size = inputs.pop("original_size", None)
        return inputs, size, time.perf_counter() - t0

    items = iter(enumerate(items))
    pending = []  # (index, future) in item order: at most `ahead`
    running = {}  # Request -> (index, size, prepared_s): at most the engine's rows
    rows = engine.max_batch or engine.DEFAULT_MAX_BATCH
    with ThreadPoolExecutor(workers, thread_name_prefix="molmoe-prepare") as pool:
        def refill():
            while len(pending) < ahead:
                try:
                    i, (text, image) = next(items)
                except StopIteration:
                    return
                pending.append((i, pool.submit(prepare, text, image)))

        try:
            refill()
            while pending or running:
                # Hand prepared items to the engine, never more than its rows (the rest wait
                # here, so memory stays bounded by rows + ahead items); block on the next one
                # only when the engine has nothing to do.
                while pending and len(running) < rows and (pending[0][1].done()
                                                           or not engine.has_work()):
                    i, future = pending.pop(0)
                    try:
                        inputs, size, took = future.result()
                        request = engine.submit(inputs, config, label=f"item {i}")
                    except MolmoeError as e:
                        yield ItemResult(i, error=e)
                        continue
                    running[request] = (i, size, took)
                refill()
                if engine.has_work():
                    for request in engine.step():
                        i, size, took = running.pop(request)
                        yield ItemResult(i, result=request.result, error=request.error,
                                         original_size=size, prepared_s=took)
        finally:
            for request in running:
                engine.cancel(request)
            for _, future in pending:
                future.cancel()
