"""Continuous batching in the engine: requests join a running batch between steps, a finished or
cancelled request frees its row at once, and every request gets exactly the tokens it gets alone
(greedy and seeded sampling), whatever else is in the batch."""
from __future__ import annotations

import pytest
import torch

from molmoe.generation import Engine, GenerationConfig, GenerationLengthError
from tiny import random_inputs, random_model

GREEDY = GenerationConfig(max_new_tokens=9, stop_strings=())


class _Tok:
    """A tokenizer stand-in that spells ids as text ('<12>'): the tiny models' vocabulary is
    not a real tokenizer's. No EOS: requests run to their token limit."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def _prompt(model, n_text: int, seed: int, image: bool) -> dict:
    ids, images, masks, idx = random_inputs(model.config, crops=2, text=n_text, seed=seed)
    if not image:
        return {"input_ids": ids[0, -n_text:].clamp(min=1)}
    return {"input_ids": ids[0].clamp(min=1), "images": images[0], "image_masks": masks[0],
            "image_input_idx": idx[0]}


def _configs():
    """Greedy and seeded sampling, different lengths per request."""
    out = []
    for i in range(8):
        if i % 3 == 2:
            out.append(GenerationConfig(max_new_tokens=5 + i, do_sample=True, temperature=0.9,
                                        top_k=20, seed=100 + i, stop_strings=()))
        else:
            out.append(GenerationConfig(max_new_tokens=4 + i, stop_strings=()))
    return out


@pytest.mark.parametrize("name", ["tiny-molmoe", "tiny-7b-d", "tiny-7b-o"])
def test_eight_requests_arriving_at_different_steps_equal_alone(name):
    model = random_model(name)
    prompts = [_prompt(model, 3 + 2 * i, seed=i, image=i % 4 == 1) for i in range(8)]
    configs = _configs()
    alone = [Engine(model, _Tok()).generate(p, c) for p, c in zip(prompts, configs)]

    engine = Engine(model, _Tok(), max_batch=4, max_len=400)
    arrivals = {0: [0, 1, 2], 1: [3], 3: [4, 5], 4: [6], 7: [7]}  # step -> requests submitted
    requests, step, seen_rows = {}, 0, set()
    while step <= max(arrivals) or engine.has_work():
        for i in arrivals.get(step, []):
            requests[i] = engine.submit(prompts[i], configs[i])
        engine.step()
        seen_rows.update(r.row for r in engine.running)
        assert len(engine.running) <= 4
        step += 1
    assert seen_rows == {0, 1, 2, 3}  # the batch really ran 4 wide
    for i, r in requests.items():
        assert r.result.token_ids == alone[i].token_ids, i
        assert r.result.text == alone[i].text and r.result.finish_reason == alone[i].finish_reason


def test_finished_request_frees_its_row_at_once():
    model = random_model("tiny-molmoe")
    engine = Engine(model, _Tok(), max_batch=2, max_len=64)
    short = engine.submit(_prompt(model, 4, 0, False), GenerationConfig(max_new_tokens=2,
                                                                        stop_strings=()))
    long = engine.submit(_prompt(model, 5, 1, False), GenerationConfig(max_new_tokens=8,
                                                                       stop_strings=()))
    third = engine.submit(_prompt(model, 6, 2, False), GenerationConfig(max_new_tokens=3,
                                                                        stop_strings=()))
    engine.step()  # admits two (prefill gives token 1), decodes token 2: `short` is done
    assert short.finished and short.row is None and third.row is None
    engine.step()  # `third` takes the free row before this step's decode
    assert third.row == 0 and long.row == 1
    while engine.has_work():
        engine.step()
    assert [len(r.result.token_ids) for r in (short, long, third)] == [2, 8, 3]


def test_cancel_frees_the_row_and_the_batch_goes_on():
    model = random_model("tiny-7b-d")
    prompts = [_prompt(model, 4 + i, i, False) for i in range(3)]
    alone = [Engine(model, _Tok()).generate(p, GREEDY) for p in prompts]
    engine = Engine(model, _Tok(), max_batch=2, max_len=64)
    a, b, c = (engine.submit(p, GREEDY) for p in prompts)
    engine.step()
    engine.step()
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and a.row is None
    assert len(a.result.token_ids) == 3  # what it had when cancelled
    engine.step()
    assert c.row == 0  # took the cancelled row
    while engine.has_work():
        engine.step()
    assert b.result.token_ids == alone[1].token_ids
    assert c.result.token_ids == alone[2].token_ids


def test_too_long_request_is_refused_alone():
    model = random_model("tiny-molmoe")
    engine = Engine(model, _Tok(), max_batch=2, max_len=30)
    ok = engine.submit(_prompt(model, 5, 0, False), GREEDY)
    engine.step()
    with pytest.raises(GenerationLengthError, match="max_len=30"):
        engine.submit(_prompt(model, 25, 1, False), GREEDY)  # 25 + 9 - 1 slots > 30
    limit = model.config.text.max_position_embeddings
    with pytest.raises(GenerationLengthError, match="max_position_embeddings"):
        engine.submit(_prompt(model, 5, 2, False), GenerationConfig(max_new_tokens=limit))
    while engine.has_work():
        engine.step()
    assert ok.result.token_ids == Engine(model, _Tok()).generate(
        _prompt(model, 5, 0, False), GREEDY).token_ids


def test_step_work_does_not_grow_with_the_sequence():
    """The decode step dispatches the same ops at slot 50 and slot 2,000 (static shapes: the
    cost per token does not grow with the tokens before it, apart from attention's reads)."""
    from molmoe.generation.step import decode_step
    from test_decode_step import OpCounter

    model = random_model("tiny-molmoe")
    counts = []
    with torch.no_grad():
        model.new_kv_cache(2, 2100)
        for pos in (50, 2000):
            with OpCounter() as c:
                decode_step(model, torch.tensor([3, 4]), torch.tensor([pos, pos + 1]))
            counts.append(c.ops)
    assert counts[0] == counts[1]


def test_compiled_engine_gives_eager_tokens():
    torch._dynamo.reset()
    model = random_model("tiny-molmoe")
    prompts = [_prompt(model, 3 + 4 * i, i, i == 1) for i in range(2)]
    eager = Engine(model, _Tok(), max_batch=2).generate(prompts, GREEDY)
    compiled = Engine(model, _Tok(), max_batch=2, mode="compile").generate(prompts, GREEDY)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]


def test_two_engines_on_one_model_interleave():
    """Each engine's steps read its own cache, even when another engine (or a plain
    model.new_kv_cache) bound a different one to the same model in between."""
    model = random_model("tiny-7b-o")
    p, q = _prompt(model, 5, 0, False), _prompt(model, 8, 1, True)
    alone = [Engine(model, _Tok()).generate(x, GREEDY).token_ids for x in (p, q)]
    a, b = Engine(model, _Tok(), max_len=400), Engine(model, _Tok(), max_len=400)
    ra, rb = a.submit(p, GREEDY), b.submit(q, GREEDY)
    while a.has_work() or b.has_work():
        a.step()
        model.new_kv_cache(1, 4)  # someone else's cache, bound in between
        b.step()
    assert [ra.result.token_ids, rb.result.token_ids] == alone


@pytest.mark.parametrize("stop, why", [((), "length"), (("<8",), "stop_string")])
def test_streamed_deltas_concatenate_to_the_text_for_every_finish(stop, why):
    model = random_model("tiny-molmoe")
    for n in (1, 4):
        got = []
        r = Engine(model, _Tok()).generate(
            _prompt(model, 5, 0, False), GenerationConfig(max_new_tokens=n, stop_strings=stop),
            on_text=lambda i, d: got.append(d))
        assert r.finish_reason == why or n == 1, (r.finish_reason, r.text)
        assert "".join(got) == r.text and r.text


def test_a_failed_request_leaves_no_nan_in_its_row():
    """A request whose logits are NaN (its prompt holds a token with a NaN embedding row) fails
    alone; the next, shorter request in the same row answers as it does alone (the reference
    attention multiplies masked keys by zero weights: a NaN left in the row would spread)."""
    model = random_model("tiny-7b-d")
    poisoned = 7
    with torch.no_grad():
        model.decoder.embed.embedding[poisoned] = float("nan")
    bad = {"input_ids": torch.tensor([3, 4, poisoned, 5, 6, 8, 9, 10, 11, 12])}
    good = {"input_ids": torch.tensor([3, 4, 5])}
    alone = Engine(model, _Tok()).generate(good, GREEDY).token_ids
    engine = Engine(model, _Tok(), max_batch=1, max_len=64)
    rb = engine.submit(bad, GREEDY)
    engine.step()
    assert rb.finish_reason == "error" and "NaN" in str(rb.error)
    rg = engine.submit(good, GREEDY)
    while engine.has_work():
        engine.step()
    assert rg.result.token_ids == alone


def test_callbacks_that_cancel_or_raise_fail_only_their_request():
    model = random_model("tiny-molmoe")
    prompts = [_prompt(model, 4 + i, i, False) for i in range(3)]
    sampled = [GenerationConfig(max_new_tokens=8, do_sample=True, seed=s, stop_strings=())
               for s in (1, 2, 3)]
    alone = [Engine(model, _Tok()).generate(p, c).token_ids for p, c in zip(prompts, sampled)]
    engine = Engine(model, _Tok(), max_len=64)
    calls = []

    def cancel_b(delta):  # a client that goes away: cancels another request mid-step
        calls.append(delta)
        if len(calls) == 3:
            engine.cancel(b)

    def boom(delta):
        raise RuntimeError("client callback failed")

    a = engine.submit(prompts[0], sampled[0], on_text=cancel_b)
    b = engine.submit(prompts[1], sampled[1], on_text=boom)
    c = engine.submit(prompts[2], sampled[2])
    while engine.has_work():
        engine.step()
    assert b.finish_reason == "error" and "client callback failed" in str(b.error)
    assert a.result.token_ids == alone[0] and c.result.token_ids == alone[2]


def test_an_idle_engine_grows_its_rows_for_a_bigger_batch():
    model = random_model("tiny-molmoe")
    engine = Engine(model, _Tok())
    engine.generate(_prompt(model, 4, 0, False), GREEDY)
    assert engine._runner.cache.batch == 1
    engine.generate([_prompt(model, 4 + i, i, False) for i in range(8)], GREEDY)
    assert engine._runner.cache.batch == 8


def test_compiled_engine_survives_many_prompt_lengths():
    """A server meets new prompt lengths all the time: cache sizes are rounded to powers of two
    and the step is compiled with automatic dynamic shapes, so it never hits dynamo's
    recompile limit (fullgraph=True would make that a hard error)."""
    torch._dynamo.reset()
    model = random_model("tiny-molmoe")
    engine = Engine(model, _Tok(), mode="compile")
    cfg = GenerationConfig(max_new_tokens=3, stop_strings=())
    for n in range(10, 200, 19):
        r = engine.generate(_prompt(model, n, 0, False), cfg)
        assert r.finish_reason == "length"


def test_memory_fallback_keeps_batching(monkeypatch):
    """When the cache wanted for everything waiting does not fit, the engine first shrinks the
    slots to the head request's, then the rows; it does not run every request alone, nor
    reallocate at every idle moment."""
    from molmoe.config import InsufficientMemoryError

    model = random_model("tiny-molmoe")
    sizes, real = [], model.new_kv_cache

    def limited(rows, slots, **kw):  # memory for 256 row-slots
        sizes.append((rows, slots))
        if rows * slots > 256:
            raise InsufficientMemoryError(f"{rows} x {slots} does not fit")
        return real(rows, slots, **kw)

    monkeypatch.setattr(model, "new_kv_cache", limited)
    engine = Engine(model, _Tok())
    cfg = GenerationConfig(max_new_tokens=4, stop_strings=())
    small = [engine.submit(_prompt(model, 6, i, False), cfg) for i in range(8)]
    big = engine.submit({"input_ids": torch.arange(1, 200)}, cfg)
    widest = 0
    while engine.has_work():
        engine.step()
        widest = max(widest, len(engine.running))
    assert widest == 8 and all(r.finish_reason == "length" for r in small + [big])
    assert [s for s in sizes if s[0] * s[1] <= 256] == [(16, 16), (1, 256)]


def test_a_callback_cancelling_its_own_request_finishes_it_once():
    model = random_model("tiny-molmoe")
    engine = Engine(model, _Tok())
    box = {}
    r = box["r"] = engine.submit(_prompt(model, 6, 0, False),
                                 GenerationConfig(max_new_tokens=1, stop_strings=()),
                                 on_text=lambda d: engine.cancel(box["r"]))
    done = []
    while engine.has_work():
        done += engine.step()
    assert r.finish_reason == "cancelled" and r not in done and not engine.running


def test_engine_refuses_graph_mode_off_cuda_at_construction():
    from molmoe.errors import UsageError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="needs a CUDA device"):
        Engine(random_model("tiny-molmoe"), _Tok(), mode="graph")
