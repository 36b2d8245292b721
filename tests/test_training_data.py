"""The fine-tuning data (molmoe.training.data): the JSONL format, the example layout and loss mask
against a hand-built expectation, every kind of bad record (its error, or its counted skip),
padding that changes no loss, and the deterministic length-bucketed batch order.

A tiny checkpoint with a byte-level tokenizer (one token per byte) and a reduced processor
geometry (112 px crops, 4x4 tokens per crop, at most 2 crops) keeps the file fast."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from molmoe.config import from_hf_config
from molmoe.demo import _CONFIG, _PREPROCESSOR, build_tokenizer_json
from molmoe.model import Molmo
from molmoe.points import format_count, format_points
from molmoe.processing import Processor
from molmoe.training import training_loss
from molmoe.training.data import (
    BucketSampler,
    DataError,
    TrainingData,
    answer_tokens,
    collate,
    loader,
    rank_batches,
)

CONFIG = {**_CONFIG, "max_position_embeddings": 1024,
          "vision_backbone": {**_CONFIG["vision_backbone"], "image_default_input_size": [112, 112]}}
PREPROCESSOR = {**_PREPROCESSOR, "base_image_input_size": [112, 112], "image_token_length_h": 4,
                "image_token_length_w": 4, "max_crops": 2, "overlap_margins": [2, 2]}
POINT = format_points([(61.5, 40.6)], "red circle")
COUNT = format_count([(10.2, 30.0), (55.0, 31.4)], "dogs")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("ckpt")
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (d / "tokenizer.json").write_text(build_tokenizer_json())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}))
    return d


@pytest.fixture(scope="module")
def proc(ckpt) -> Processor:
    return Processor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def model() -> Molmo:
    torch.manual_seed(0)
    m = Molmo(from_hf_config(CONFIG))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "_ln.weight")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05)
    return m.train()


def _image(path: pathlib.Path, size=(40, 30), color=(200, 30, 30)) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _rec(*turns, image=None, **extra) -> dict:
    messages = []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"image": image, "messages": messages, **extra}


def _write(path: pathlib.Path, lines) -> pathlib.Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines))
    return path


def _expected(proc, turns, image) -> tuple[list[int], list[bool]]:
    """The layout of spec §5.2 written out by hand from the tokenizer."""
    tok = proc.tokenizer
    first = proc(turns[0][0], images=image)["input_ids"].tolist()
    ids, mask = list(first), [False] * len(first)
    for k, (user, answer) in enumerate(turns):
        if k:
            q = tok.encode_text(f" User: {user} Assistant:")
            ids += q
            mask += [False] * len(q)
        a = tok.encode_text(" " + answer) + [tok.eos_token_id]
        ids += a
        mask += [True] * len(a)
    return ids, mask


# ----------------------------------------------------------------------------- a good file


@pytest.fixture(scope="module")
def good(tmp_path_factory, proc):
    d = tmp_path_factory.mktemp("good")
    _image(d / "imgs" / "a.png")
    absolute = _image(d / "elsewhere" / "b.jpg", size=(200, 160), color=(20, 200, 90))
    path = _write(d / "train.jsonl", [
        _rec(("Point to the red circle.", POINT), image="imgs/a.png"),
        "",
        _rec(("How many dogs?", COUNT), ("And cats? <|endoftext|>", "There are none."),
             image=str(absolute)),
        _rec(("Say hi.", "hi")),
        "   ",
        _rec(("Describe.", "A <point x=\"5.0\" y=\"7.5\" alt=\"spot\">red spot</point> there."),
             ("Again?", "Yes."), image="imgs/a.png"),
    ])
    return path, TrainingData(path, proc)


def test_good_file_layout_and_loss_mask(good, proc):
    path, data = good
    assert len(data) == 4 and data.skipped == {}
    assert [r.source for r in data.records] == [f"{path}:{n}" for n in (1, 3, 4, 6)]
    assert data.records[0].image == path.parent / "imgs" / "a.png"
    assert data.records[1].image == path.parent / "elsewhere" / "b.jpg"
    assert data.records[2].image is None
    assert data.report() == f"{path}: 4 examples, none skipped"
    for i, rec in enumerate(data.records):
        ex = data[i]
        ids, mask = _expected(proc, rec.turns, rec.image)
        assert ex.input_ids.dtype == torch.int64 and ex.loss_mask.dtype == torch.bool
        assert ex.input_ids.tolist() == ids and ex.loss_mask.tolist() == mask
        assert len(ex.input_ids) == rec.length == data.lengths[i]
        assert int(ex.loss_mask.sum()) == rec.answer_tokens
        assert ex.source == rec.source
        if rec.image is None:
            assert ex.images is ex.image_masks is ex.image_input_idx is None
        else:
            want = proc(rec.turns[0][0], images=rec.image)
            for key in ("images", "image_masks", "image_input_idx"):
                assert torch.equal(getattr(ex, key), want[key])
    assert answer_tokens(data, [0, 2]) == data.records[0].answer_tokens + \
        data.records[2].answer_tokens


def test_layout_by_hand(good, proc):
    """The text-only record spelled out byte by byte (the tokenizer is byte-level)."""
    _, data = good
    ex = data[2]
    eos = proc.tokenizer.eos_token_id
    body = list(b" User: Say hi. Assistant:")
    answer = list(b" hi") + [eos]
    assert ex.input_ids.tolist() == [eos] + body + answer
    assert ex.loss_mask.tolist() == [False] * (1 + len(body)) + [True] * len(answer)
    # a special string typed in the data stays text (its bytes), never the EOS id
    multi = data[1]
    second_q = list(b" User: And cats? <|endoftext|> Assistant:")
    assert multi.input_ids.tolist().count(eos) == 1 + 2
    assert second_q == multi.input_ids[-len(second_q) - len(b" There are none.") - 1:
                                       -len(b" There are none.") - 1].tolist()


def test_scan_threads_give_the_same_records(good, proc):
    path, data = good
    threaded = TrainingData(path, proc, workers=2)
    assert threaded.records == data.records


# ----------------------------------------------------------------------------- bad records


def _bad_cases(d: pathlib.Path):
    """(name, line, reason, words the message must hold)."""
    _image(d / "ok.png")
    (d / "text.png").write_text("this is not a picture")
    buf = (d / "ok.png").read_bytes()
    _image(d / "big.png", size=(200, 160))
    (d / "cut.png").write_bytes((d / "big.png").read_bytes()[:len(buf) // 2 + 60])
    ok = ("Point.", POINT)
    pt = lambda x, y: f'<point x="{x}" y="{y}" alt="c">c</point>'
    return [
        ("bad json", "{not json", "bad json", "not JSON"),
        ("not an object", "[1, 2]", "bad record", "must be a JSON object, got a list"),
        ("missing messages", {"image": "ok.png"}, "bad record", "'messages' must be"),
        ("empty messages", {"messages": []}, "bad record", "'messages' must be a non-empty"),
        ("wrong role order", {"messages": [{"role": "assistant", "content": "a"},
                                           {"role": "user", "content": "q"}]},
         "bad record", "must have role 'user'"),
        ("non-string content", {"messages": [{"role": "user", "content": 3},
                                             {"role": "assistant", "content": "a"}]},
         "bad record", "'content' must be a non-empty string"),
        ("unknown key", _rec(ok, imgae="ok.png"), "bad record", "unknown key 'imgae'"),
        ("missing image", _rec(ok, image="nope.png"), "missing image", "nope.png"),
        ("text file as png", _rec(ok, image="text.png"), "unreadable image", "text.png"),
        ("truncated png", _rec(ok, image="cut.png"), "unreadable image", "cut.png"),
        ("bad number", _rec(("q", pt("61", "40.6"))), "malformed points", 'x="61"'),
        ("over 100", _rec(("q", pt("100.5", "40.6"))), "malformed points", 'x="100.5"'),
        ("one-point points", _rec(("q", '<points x1="1.0" y1="2.0" alt="c">c</points>')),
         "malformed points", "at least 2 points"),
        ("unclosed tag", _rec(("q", '<point x="1.0" y="2.0" alt="c">c')),
         "malformed points", "unclosed"),
        ("count mismatch", _rec(("q", COUNT.replace("total of 2", "total of 3"))),
         "malformed points", "the count says 3 but its tag holds 2 points"),
        ("too long", _rec(("q" * 300, "a")), "too long", "over max_length 200"),
    ]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return d, _bad_cases(d)


@pytest.mark.parametrize("case", range(16))
def test_each_bad_record_names_file_line_and_problem(bad_dir, proc, case):
    d, cases = bad_dir
    name, line, reason, words = cases[case]
    good = _rec(("Point.", POINT), image="ok.png")
    path = _write(d / f"case{case}.jsonl", [good, good, line, good])
    with pytest.raises(DataError) as info:
        TrainingData(path, proc, max_length=200)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert words in msg, (name, msg)
    assert info.value.reason == reason and info.value.source == f"{path}:3"


def test_skip_bad_counts_each_kind(bad_dir, proc):
    d, cases = bad_dir
    good = _rec(("Point.", POINT), image="ok.png")
    path = _write(d / "mixed.jsonl", [good] + [line for _, line, _, _ in cases] + [good])
    data = TrainingData(path, proc, max_length=200, skip_bad=True)
    assert len(data) == 2
    want: dict[str, int] = {}
    for _, _, reason, _ in cases:
        want[reason] = want.get(reason, 0) + 1
    assert data.skipped == want
    report = data.report()
    assert report.startswith(f"{path}: 2 examples, 16 skipped (1 bad json, 6 bad record, "
                             f"1 missing image, 2 unreadable image, 5 malformed points, "
                             f"1 too long): first: {path}:2: not JSON"), report


def test_all_bad_or_empty_file_is_an_error(bad_dir, proc):
    d, cases = bad_dir
    path = _write(d / "allbad.jsonl", [line for _, line, _, _ in cases[:3]])
    with pytest.raises(DataError, match=r"no usable examples \(3 skipped .*first: .*:1: "):
        TrainingData(path, proc, skip_bad=True)
    empty = _write(d / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable examples"):
        TrainingData(empty, proc)
    with pytest.raises(DataError, match="no such file"):
        TrainingData(d / "absent.jsonl", proc)


def test_default_max_length_is_the_model_limit(tmp_path, proc):
    path = _write(tmp_path / "t.jsonl", [_rec(("q" * 1100, "a"))])
    with pytest.raises(DataError, match=r":1: example needs 1122 tokens .* max_length 1024"):
        TrainingData(path, proc)


# ----------------------------------------------------------------------------- batches


def test_collate_right_pads(good):
    _, data = good
    examples = [data[i] for i in range(4)]
    inputs, mask = collate(examples)
    B, S = 4, max(len(e.input_ids) for e in examples)
    assert inputs["input_ids"].shape == mask.shape == (B, S)
    T = max(e.images.shape[0] for e in examples if e.images is not None)
    assert [0 if e.images is None else e.images.shape[0] for e in examples] == [2, 3, 0, 2]
    assert inputs["images"].shape[:2] == inputs["crop_valid"].shape == (B, T)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        assert torch.equal(inputs["input_ids"][b, :n], e.input_ids)
        assert (inputs["input_ids"][b, n:] == -1).all() and not mask[b, n:].any()
        assert torch.equal(mask[b, :n], e.loss_mask)
        crops = 0 if e.images is None else e.images.shape[0]
        assert inputs["crop_valid"][b].tolist() == [True] * crops + [False] * (T - crops)
        for key in ("images", "image_masks", "image_input_idx"):
            assert (inputs[key][b, crops:] == -1).all()
            if crops:
                assert torch.equal(inputs[key][b, :crops], getattr(e, key).to(inputs[key].dtype))
    text_only, _ = collate([examples[2]])
    assert set(text_only) == {"input_ids"}


def test_padding_changes_no_loss(good, model):
    """The summed cross-entropy of a padded mixed batch is the sum over its examples alone."""
    _, data = good
    examples = [data[i] for i in range(4)]
    inputs, mask = collate(examples)
    total = int(mask[:, 1:].sum())
    assert total == answer_tokens(data, range(4))
    batch = training_loss(model, inputs, mask, ce_tokens=total)
    alone = sum(training_loss(model, *collate([e]), ce_tokens=total).ce for e in examples)
    torch.testing.assert_close(batch.ce, alone, rtol=1e-5, atol=1e-6)
    batch.total.backward()


def _lengths(n=64, seed=0):
    return np.random.default_rng(seed).integers(10, 500, n).tolist()


def test_bucket_sampler_is_deterministic_and_covers_each_epoch():
    lengths = _lengths()
    a = BucketSampler(lengths, 8, seed=3)
    b = BucketSampler(lengths, 8, seed=3)
    assert a.steps_per_epoch == 8
    steps = [a.batch(s) for s in range(20)]
    assert steps == [b.batch(s) for s in range(20)]
    assert [b.batch(s) for s in (17, 2, 9)] == [steps[17], steps[2], steps[9]]  # any order
    for epoch in range(2):
        seen = sorted(i for s in range(8 * epoch, 8 * epoch + 8) for i in steps[s])
        assert seen == list(range(64))
    assert steps[:8] != steps[8:16]  # a new shuffle each epoch
    assert BucketSampler(lengths, 8, seed=4).batch(0) != steps[0]
    ragged = BucketSampler(lengths[:61], 8, seed=3)  # the remainder is dropped
    assert ragged.steps_per_epoch == 7
    once = [i for s in range(7) for i in ragged.batch(s)]
    assert len(once) == len(set(once)) == 56
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BucketSampler(lengths[:5], 8, seed=0)


def test_buckets_pad_less_than_random_batches():
    lengths = _lengths(256, seed=1)
    sampler = BucketSampler(lengths, 8, seed=0, bucket_batches=8)
    rng = np.random.default_rng(0)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)
    bucketed = padding([sampler.batch(s) for s in range(sampler.steps_per_epoch)])
    shuffled = padding(rng.permutation(256).reshape(-1, 8).tolist())
    assert bucketed < 0.3 * shuffled, (bucketed, shuffled)


def test_rank_batches_slice_each_global_batch():
    sampler = BucketSampler(_lengths(), 8, seed=1)
    got = {r: list(rank_batches(sampler, rank=r, world=2, micro_batch=2, start_step=5, steps=3))
           for r in range(2)}
    for r in range(2):
        assert [(s, m) for s, m, _ in got[r]] == [(5, 0), (5, 1), (6, 0), (6, 1), (7, 0), (7, 1)]
    for step in (5, 6, 7):
        batch = sampler.batch(step)
        for r in range(2):
            mine = [i for s, _, idx in got[r] if s == step for i in idx]
            assert mine == batch[r * 4:(r + 1) * 4]
    with pytest.raises(ValueError, match="not divisible"):
        rank_batches(sampler, rank=0, world=3, micro_batch=1, start_step=0, steps=1)


def test_loader_with_workers_equals_without(tmp_path, proc):
    _image(tmp_path / "a.png", size=(50, 40))
    _image(tmp_path / "b.png", size=(120, 40), color=(0, 0, 250))
    records = [_rec((f"Question {i}?" + " more" * (i % 5), POINT if i % 2 else "plain"),
                    image=[None, "a.png", "b.png"][i % 3]) for i in range(12)]
    data = TrainingData(_write(tmp_path / "t.jsonl", records), proc)
    sampler = BucketSampler(data.lengths, 4, seed=7, bucket_batches=2)
    kw = {"rank": 1, "world": 2, "micro_batch": 1, "start_step": 2, "steps": 4}
    plain = list(loader(data, sampler, num_workers=0, **kw))
    workers = list(loader(data, sampler, num_workers=2, **kw))
    assert [(s, m) for s, m, _, _ in plain] == [(s, m) for s in range(2, 6) for m in range(2)]
    assert len(plain) == len(workers)
    for (s, m, inputs, mask), (s2, m2, inputs2, mask2) in zip(plain, workers):
        assert (s, m) == (s2, m2) and torch.equal(mask, mask2)
        assert inputs.keys() == inputs2.keys()
        assert all(torch.equal(inputs[k], inputs2[k]) for k in inputs)
    first = next(iter(rank_batches(sampler, **kw)))[2]
    assert torch.equal(plain[0][2]["input_ids"], collate([data[i] for i in first])[0]["input_ids"])


@pytest.mark.parametrize("line,words", [
    (('{"messages": [{"role": "user", "content": "q\\ud800"}, '
      '{"role": "assistant", "content": "a"}]}'), "lone surrogate"),
    (_rec(("q", "a"), image=3), "'image' must be a path string or null"),
    ({"messages": [{"role": "user", "content": "q"}]}, "end with an assistant answer"),
    (_rec(("q", "   ")), "'content' must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "q", "name": "x"},
                   {"role": "assistant", "content": "a"}]}, "unknown key 'name'"),
])
def test_more_bad_records(tmp_path, proc, line, words):
    path = _write(tmp_path / "t.jsonl", [line])
    with pytest.raises(DataError, match=f"^{path}:1: .*{words}"):
        TrainingData(path, proc)
