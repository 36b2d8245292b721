"""molmoe.pointer: the trained BPE keeps MolmoE's special ids, and the initial checkpoint loads."""
from __future__ import annotations

import random

import torch

from molmoe import synthetic as S
from molmoe.demo import _SPECIALS
from molmoe.pointer import sincos_table, train_tokenizer_json, write_initial_checkpoint
from molmoe.processing.processor import prompt_text
from molmoe.processing.tokenizer import Tokenizer


def _texts(n=200):
    rng = random.Random(0)
    out = []
    for _ in range(n):
        s = S.make_sample(rng, sides=(160, 200))
        out += [prompt_text(s.question), " " + s.answer]
    return out


def test_tokenizer_and_checkpoint(tmp_path):
    texts = _texts()
    tok_json = train_tokenizer_json(texts, n_merges=120)
    assert train_tokenizer_json(texts, n_merges=120) == tok_json  # deterministic
    d = write_initial_checkpoint(tmp_path / "init", arch="p14-112", tokenizer_json=tok_json)
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_id == tok.bos_token_id == 256 and tok.pad_token_id == 257
    assert tok.image_start_id == 258 and tok.image_patch_id == 260
    for s in _SPECIALS:  # user text never names a special token
        assert all(i < 256 or i > 262 for i in tok.encode_text(s))
    answer = texts[1]
    ids = tok.encode_text(answer)
    assert tok.decode(ids) == answer
    assert len(ids) < len(answer.encode()) / 2  # merges shorten answers
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits and all(len(t) == 1 for t in digits)  # one digit per token

    import molmoe
    from molmoe.processing.processor import Processor

    model = molmoe.load(d)
    assert model.config.text.vocab_size == len(tok_json and __import__("json").loads(
        tok_json)["model"]["vocab"])
    proc = Processor.from_pretrained(d)
    x = proc("Point to the red circle.", S.render(S.make_sample(random.Random(1)).scene))
    inputs = {k: v[None] for k, v in x.items() if k != "original_size"}
    with torch.no_grad():
        h = model.embed(**inputs)[0]
    img = h[x["input_ids"] == tok.image_patch_id]
    # the vision init gives image features that vary across positions (the demo init: ~0.004)
    assert img.std(0).mean() > 0.2


def test_sincos_table():
    t = sincos_table(8, 96)
    assert t.shape == (65, 96) and torch.all(t[0] == 0)
    assert len({tuple(r.tolist()) for r in t[1:]}) == 64  # every patch position distinct


def test_parse_curriculum():
    import pytest

    from molmoe.pointer import CURRICULA, parse_curriculum

    for name in CURRICULA:
        assert parse_curriculum(name) == list(CURRICULA[name])
    p = parse_curriculum("objects=1-1,mix=single:1@100@10; @200@20")
    assert p == [("p0", "objects=1-1,mix=single:1", 100, 10), ("p1", "", 200, 20)]
    for bad in ("objects=9@1@1", "@0@1", ""):
        with pytest.raises((SystemExit, Exception)):
            parse_curriculum(bad)
