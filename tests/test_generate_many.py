"""`molmoe.pipeline.generate_many`: images prepared on worker threads ahead of the engine (the
next requests' CPU work overlaps the current ones' model work), same answers as one at a time,
a bad item reported alone."""
import threading
import time

import numpy as np
import pytest

from molmoe.errors import MolmoeError, UsageError
from molmoe.generation import Engine, GenerationConfig
from molmoe.pipeline import generate_many, load_pipeline
from tests.train_fixtures import tiny_checkpoint


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    directory = tiny_checkpoint(tmp_path_factory.mktemp("gm") / "ckpt")
    return load_pipeline(directory, device="cpu")  # (never switch grad off globally: it leaks)


class Recording:
    """The processor, with the thread and time of each call written down."""

    def __init__(self, proc):
        self.proc, self.calls, self.lock = proc, {}, threading.Lock()

    def __call__(self, text, images=None, max_length=None):
        start = time.perf_counter()
        out = self.proc(text, images=images, max_length=max_length)
        with self.lock:
            self.calls[text] = (threading.current_thread().name, start, time.perf_counter())
        return out


def _items(n):
    rng = np.random.default_rng(0)
    return [(f"Point to thing {i}.", rng.integers(0, 256, (90 + 13 * i, 140, 3), dtype=np.uint8))
            for i in range(n)]


def test_same_answers_as_one_at_a_time_and_prepared_ahead(pipeline):
    proc, model, eos = pipeline
    config = GenerationConfig(max_new_tokens=6)
    items = _items(5)
    want = []
    for text, image in items:
        inputs = {k: v for k, v in proc(text, image).items() if k != "original_size"}
        want.append(Engine(model, proc.tokenizer, eos_token_id=eos).generate(inputs, config).text)

    rec = Recording(proc)
    engine = Engine(model, proc.tokenizer, eos_token_id=eos, max_batch=2)
    finished = {}
    got = {}
    for item in generate_many(engine, rec, items, config, workers=2, ahead=3):
        assert item.error is None, item.error
        finished[item.index] = time.perf_counter()
        got[item.index] = item.result.text
        assert item.original_size == (items[item.index][1].shape[1], items[item.index][1].shape[0])
    assert [got[i] for i in range(len(items))] == want
    # Preparation ran on the worker threads, and item 1 was being prepared before item 0's
    # answer was done (its image work overlapped the engine's work on item 0).
    assert all(name.startswith("molmoe-prepare") for name, _, _ in rec.calls.values())
    assert rec.calls[items[1][0]][1] < finished[0]
    assert not engine.has_work()


def test_a_bad_item_fails_alone(pipeline, tmp_path):
    proc, model, eos = pipeline
    engine = Engine(model, proc.tokenizer, eos_token_id=eos, max_batch=2)
    items = _items(3)
    items.insert(1, ("Point to nothing.", str(tmp_path / "missing.png")))
    out = {i.index: i for i in generate_many(engine, proc, items,
                                             GenerationConfig(max_new_tokens=3))}
    assert sorted(out) == [0, 1, 2, 3]
    assert isinstance(out[1].error, MolmoeError) and "missing.png" in str(out[1].error)
    assert all(out[i].error is None and out[i].result is not None for i in (0, 2, 3))


def test_refuses_bad_arguments_and_cleans_up(pipeline):
    proc, model, eos = pipeline
    engine = Engine(model, proc.tokenizer, eos_token_id=eos)
    with pytest.raises(UsageError, match="workers"):
        list(generate_many(engine, proc, _items(1), workers=0))
    with pytest.raises(UsageError, match="ahead"):
        list(generate_many(engine, proc, _items(1), ahead=0))
    # Leaving the loop early cancels what is running: the engine is idle again.
    gen = generate_many(engine, proc, _items(4), GenerationConfig(max_new_tokens=20))
    next(gen)
    gen.close()
    assert not engine.has_work()


class CountingEngine(Engine):
    """The engine, counting how many submitted requests are unfinished at once."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.live, self.peak = [], 0

    def submit(self, *a, **kw):
        request = super().submit(*a, **kw)
        self.live.append(request)
        self.peak = max(self.peak, sum(not r.finished for r in self.live))
        return request


def test_memory_is_bounded_by_rows_and_ahead(pipeline):
    """Prepared items wait outside the engine: never more than its rows inside it (before, every
    prepared item was queued in the engine, so `ahead` bounded nothing)."""
    proc, model, eos = pipeline
    engine = CountingEngine(model, proc.tokenizer, eos_token_id=eos, max_batch=1)
    rec = Recording(proc)
    seen = 0
    for item in generate_many(engine, rec, _items(8), GenerationConfig(max_new_tokens=4),
                              workers=2, ahead=2):
        assert item.error is None
        seen += 1
        # prepared so far <= finished + in the engine (1 row) + waiting here (ahead 2)
        assert len(rec.calls) <= seen + 1 + 2
    assert seen == 8 and engine.peak == 1
