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
