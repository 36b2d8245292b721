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


def test_init_overrides_and_embedding_scale(tmp_path):
    import json

    from molmoe.checkpoint.loader import load
    from molmoe.pointer import parse_overrides

    assert parse_overrides("d_model=256, n_heads=8") == {"d_model": 256, "n_heads": 8}
    d = write_initial_checkpoint(tmp_path / "init", tokenizer_json=train_tokenizer_json(
        _texts(40), n_merges=40), embed_rms=1.0,
        overrides={"config": parse_overrides("d_model=64,n_heads=2,mlp_hidden_size=128")})
    assert json.loads((d / "config.json").read_text())["d_model"] == 64
    model = load(d, dtype="float32")
    assert model.config.text.d_model == 64 and model.config.text.n_heads == 2
    emb = model.decoder.embed.embedding
    assert abs(float(emb.pow(2).mean().sqrt()) - 1.0) < 1e-3


def test_training_data_points_at_the_named_colour(tmp_path):
    """What the trainer feeds (TrainingData: the saved file through the processor) holds the
    named colour at the answer's point, in the global crop the model sees, and the loss mask
    covers exactly the answer + EOS (bench/RESULTS.md, Issue 13, session 3: the full check is
    scripts/pointer_verify_data.py)."""
    from molmoe.points import parse_points
    from molmoe.processing.preprocess import scaled_size
    from molmoe.processing.processor import Processor
    from molmoe.training.data import TrainingData

    knobs = S.Knobs.parse("objects=2-2,shapes=circle,backgrounds=white,size=15-30,sides=224,"
                          "distinct_colours=1,mix=single:1")
    S.write_dataset(tmp_path / "data", n=24, seed=3, sizes=(160, 320), knobs=knobs)
    from molmoe.pointer import content_words

    d = write_initial_checkpoint(tmp_path / "init", tokenizer_json=train_tokenizer_json(
        _texts(200), n_merges=300, split_words=content_words()))
    proc = Processor.from_pretrained(d)
    st = proc.settings
    ds = TrainingData(tmp_path / "data" / "train.jsonl", proc)
    mean, std = torch.tensor(st.image_mean), torch.tensor(st.image_std)
    p, crop = st.image_patch_size, st.crop_size
    for i in range(len(ds)):
        (q, a), = ds.records[i].turns
        colour = q.split()[3]
        ex = ds[i]
        ans = ex.input_ids[ex.loss_mask].tolist()
        assert ans[-1] == proc.tokenizer.eos_token_id
        assert proc.tokenizer.decode(ans[:-1]) == " " + a
        assert colour in [proc.tokenizer.decode([t]) for t in ex.input_ids[~ex.loss_mask]]
        g = crop // p
        glob = ex.images[0].reshape(g, g, p, p, 3).permute(0, 2, 1, 3, 4).reshape(crop, crop, 3)
        glob = (glob * std + mean) * 255
        W, H = __import__("PIL.Image").Image.open(ds.records[i].image).size
        nh, nw = scaled_size(H, W, crop, crop)
        (x, y), = parse_points(a).points
        px = glob[int((crop - nh) // 2 + y / 100 * nh), int((crop - nw) // 2 + x / 100 * nw)]
        assert (px - torch.tensor(S.COLOURS[colour], dtype=torch.float32)).abs().max() < 60, \
            (q, a, px)


def test_mixture_phase_data(tmp_path):
    from molmoe.pointer import mix_parts, parse_curriculum, write_phase_data
    from molmoe.processing.processor import Processor
    from molmoe.training.data import TrainingData

    assert mix_parts("objects=1-1") == [(1.0, "objects=1-1")]
    assert mix_parts("0.25*objects=2-2,anchor=0.04|0.75*objects=2-2") == [
        (0.25, "objects=2-2,anchor=0.04"), (0.75, "objects=2-2")]
    assert len(parse_curriculum("c7")) == 5
    spec = ("0.25*objects=2-2,shapes=circle,distinct_colours=1,size=15-20,sides=224,anchor=0.04,"
            "mix=single:1|0.75*objects=2-2,shapes=circle,distinct_colours=1,mix=single:1")
    path = write_phase_data(tmp_path / "d", spec, n=8, seed=5, sizes=(160, 200))
    lines = path.read_text().splitlines()
    assert len(lines) == 8
    assert sum('"part-0/' in line for line in lines) == 2
    tok = train_tokenizer_json(_texts(40), n_merges=40)
    ds = TrainingData(path, Processor.from_pretrained(
        write_initial_checkpoint(tmp_path / "init", tokenizer_json=tok)))
    assert len(ds) == 8 and all(r.image.exists() for r in ds.records)
