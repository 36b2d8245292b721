"""The synthetic pointing/counting data (molmoe.synthetic, docs/synthetic.md): determinism, the
answer grammar, that every annotated point is on its object as drawn, the scene rules (objects,
sizes, occlusion, backgrounds, image sizes), the question mix and distractors, the files that
`molmoe train` reads, the EXIF helpers and the CLI."""
from __future__ import annotations

import collections
import json
import math
import pathlib
import random

import numpy as np
import pytest
from PIL import Image

from molmoe import synthetic as S
from molmoe.cli import main
from molmoe.demo import _CONFIG, _PREPROCESSOR, build_tokenizer_json
from molmoe.errors import UsageError
from molmoe.points import check_points, parse_points
from molmoe.processing import Processor
from molmoe.processing.images import load_image
from molmoe.training.data import TrainingData

SMALL = (160, 320)  # small images keep the file fast; the rules do not depend on the size
N_SAMPLES = 300


@pytest.fixture(scope="module")
def samples() -> list[S.Sample]:
    return [S.make_sample(S._sample_rng(7, i), sides=SMALL) for i in range(N_SAMPLES)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    return S.write_dataset(out, 40, seed=3, sizes=(160, 480))


def _records(train: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (train.parent / "scenes.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- determinism


def _tree(d: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = S.write_dataset(tmp_path / "a", 12, seed=5, sizes=SMALL).parent
    b = S.write_dataset(tmp_path / "b", 12, seed=5, sizes=SMALL).parent
    c = S.write_dataset(tmp_path / "c", 12, seed=6, sizes=SMALL).parent
    ta, tb, tc = _tree(a), _tree(b), _tree(c)
    assert ta == tb
    assert ta["train.jsonl"] != tc["train.jsonl"]
    assert sum(ta[k] != tc.get(k) for k in ta if k.startswith("images/")) >= 10
    # Example i does not depend on n: a shorter dataset is a prefix of a longer one.
    d = S.write_dataset(tmp_path / "d", 5, seed=5, sizes=SMALL).parent
    lines = ta["train.jsonl"].decode().splitlines()
    assert _tree(d)["train.jsonl"].decode().splitlines() == lines[:5]


def test_no_global_rng():
    random.seed(123)
    np.random.seed(123)
    a = S.make_sample(S._sample_rng(7, 0), sides=SMALL)
    random.seed(999)
    np.random.seed(999)
    b = S.make_sample(S._sample_rng(7, 0), sides=SMALL)
    assert (a.question, a.answer) == (b.question, b.answer)
    assert np.array_equal(np.asarray(S.render(a.scene)), np.asarray(S.render(b.scene)))


# ----------------------------------------------------------------------------- answers


def test_answers_follow_the_grammar_and_the_scene(samples):
    for s in samples:
        check_points(s.answer)
        kind, t, objs = s.target["kind"], s.target, s.scene.objects
        parsed = parse_points(s.answer)
        if kind == "single":
            matches = [o for o in objs if (o.colour, o.shape) == (t["colour"], t["shape"])]
            assert len(matches) == 1 and s.question == f"Point to the {t['colour']} {t['shape']}."
            assert s.answer.startswith("<point ") and len(parsed.points) == 1
        elif kind == "absent":
            assert not any((o.colour, o.shape) == (t["colour"], t["shape"]) for o in objs)
            assert s.answer == "There are none." and t["indices"] == []
        elif kind == "multi":
            n = sum(o.shape == t["shape"] for o in objs)
            assert n >= 1 and len(parsed.points) == n
            assert s.answer.startswith("<point " if n == 1 else "<points ")
            assert s.question == f"Point to all the {S.PLURALS[t['shape']]}."
        else:
            n = sum(o.shape == t["shape"] for o in objs)
            assert parsed.count == n == t["count"] and len(parsed.points) == n
            assert s.question == f"How many {S.PLURALS[t['shape']]} are there?"
            assert s.answer == "There are none." if n == 0 else s.answer.startswith("Counting the")
        # Every point of the answer is on one of the named objects, each named object once.
        on = sorted(S.object_at(s.scene, x, y) for x, y in parsed.points)
        assert on == sorted(t["indices"])
        if parsed.groups:
            assert parsed.groups[0].alt == parsed.groups[0].text == t["label"]


def test_question_mix_and_counts(samples):
    kinds = collections.Counter(s.target["kind"] for s in samples)
    for kind, share in S.QUESTION_MIX.items():
        assert abs(kinds[kind] / len(samples) - share) < 0.08, (kind, kinds)
    counts = collections.Counter(s.target["count"] for s in samples if s.target["kind"] == "count")
    assert set(counts) >= {0, 1, 2, 3, 4, 5}  # 0..6, uniformly planned
    multis = collections.Counter(s.target["count"] for s in samples if s.target["kind"] == "multi")
    assert set(multis) >= {1, 2, 3, 4}


def test_distractors_at_the_documented_rate(samples):
    rates = {"shape": [], "colour": []}
    for s in samples:
        t = s.target
        if t["kind"] not in ("single", "absent"):
            continue
        objs = s.scene.objects
        rates["shape"].append(any(o.shape == t["shape"] and o.colour != t["colour"] for o in objs))
        rates["colour"].append(any(o.colour == t["colour"] and o.shape != t["shape"]
                                   for o in objs))
    # Planted at P_SAME_*; random fillers add some more.
    assert len(rates["shape"]) > 100
    assert S.P_SAME_SHAPE - 0.08 <= np.mean(rates["shape"]) <= 0.95
    assert S.P_SAME_COLOUR - 0.08 <= np.mean(rates["colour"]) <= 0.95


# ----------------------------------------------------------------------------- scenes


def test_points_on_the_visible_object_in_the_picture(samples):
    for s in samples[:120]:
        sc = s.scene
        for aa in (True, False):
            img = np.asarray(S.render(sc, antialias=aa))
            for i, o in enumerate(sc.objects):
                assert S.point_in_object(sc, i, *o.point)
                x, y = S._pixel(sc.width, sc.height, *o.point)
                assert tuple(img[y, x]) == o.rgb, (i, o)
            # The visible mask is what is drawn: its pixels have the object's colour except
            # along the anti-aliased edges.
            if aa:
                for i, o in enumerate(sc.objects):
                    m = sc.mask(i)
                    share = np.mean(np.all(img[m] == o.rgb, axis=-1))
                    assert share > (0.5 if o.size < 30 else 0.75), (i, o, share)


def test_scene_rules(samples):
    for s in samples:
        sc = s.scene
        W, H = sc.size
        short = min(W, H)
        assert SMALL[0] <= W <= SMALL[1] and SMALL[0] <= H <= SMALL[1]
        assert 0.5 <= W / H <= 2.0
        assert S.MIN_OBJECTS <= len(sc.objects) <= S.MAX_OBJECTS
        for i, o in enumerate(sc.objects):
            assert o.shape in S.SHAPES and o.colour in S.COLOURS
            assert S.SIZE_RANGE[0] * short <= o.size <= S.SIZE_RANGE[1] * short
            R = o.size / 2
            assert R <= o.cx <= W - R and R <= o.cy <= H - R  # wholly inside the image
            full, _, _ = S._mask(o, W, H)
            assert sc.mask(i).sum() >= S.MIN_VISIBLE * full.sum() > 0  # never (mostly) hidden
            assert o.point == (round(100 * o.cx / W, 1), round(100 * o.cy / H, 1))


def test_backgrounds_keep_contrast(samples):
    kinds = collections.Counter(s.scene.background.kind for s in samples)
    assert set(kinds) == set(S.BACKGROUNDS) and min(kinds.values()) > 60
    for s in samples[:60]:
        bg = S._render_background(s.scene.background, *s.scene.size).reshape(-1, 3).astype(int)
        noise = s.scene.background.noise
        for rgb in S.COLOURS.values():
            d = np.sqrt(((bg - np.array(rgb)) ** 2).sum(-1))
            assert d.min() >= S.MIN_CONTRAST - 2 * math.sqrt(3) * noise - 2


def test_load_scene_rebuilds_the_masks(dataset):
    for rec in _records(dataset)[:10]:
        sc = S.load_scene(rec)
        assert sc.size == Image.open(dataset.parent / rec["image"]).size
        for i, o in enumerate(sc.objects):
            assert S.point_in_object(sc, i, *o.point)
        assert S.render(sc).size == sc.size


def test_make_example_on_a_random_scene():
    rng = random.Random(1)
    for _ in range(40):
        sc = S.make_scene(rng, sides=SMALL)
        _, a, t = S.make_example(rng, sc)
        check_points(a)
        assert sorted(S.object_at(sc, x, y) for x, y in parse_points(a).points) == t["indices"]
    sc = S.make_scene(rng, [("circle", "red"), ("circle", "red")], size=(200, 200))
    with pytest.raises(UsageError, match="holds 2"):
        S.make_example(rng, sc, "single", "circle", "red")
    with pytest.raises(UsageError, match="which is there"):
        S.make_example(rng, sc, "absent", "circle", "red")
    assert S.make_example(rng, sc, "count", "star")[1] == "There are none."
    assert not S.point_in_object(sc, 0, 101.0, 50.0)


# ----------------------------------------------------------------------------- files


def test_dataset_files(dataset):
    recs = _records(dataset)
    train = [json.loads(line) for line in dataset.read_text().splitlines()]
    assert len(train) == len(recs) == 40
    fmts = collections.Counter()
    for tr, rec in zip(train, recs):
        assert set(tr) == {"image", "messages"} and tr["image"] == rec["image"]
        assert tr["messages"][1]["content"] == rec["answer"]
        with Image.open(dataset.parent / tr["image"]) as im:
            fmts[im.format] += 1
            W, H = im.size
            assert 160 <= W <= 480 and 160 <= H <= 480 and 0.5 <= W / H <= 2
            if im.format == "JPEG":
                assert S.JPEG_QUALITY[0] <= rec["quality"] <= S.JPEG_QUALITY[1]
            else:  # lossless: the file holds exactly what render() drew
                sc = S.load_scene(rec)
                assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(S.render(sc)))
    assert fmts["PNG"] >= 10 and fmts["JPEG"] >= 10


def test_training_data_reads_it_without_skips(dataset, tmp_path):
    config = {**_CONFIG, "max_position_embeddings": 1024,
              "vision_backbone": {**_CONFIG["vision_backbone"],
                                  "image_default_input_size": [112, 112]}}
    pre = {**_PREPROCESSOR, "base_image_input_size": [112, 112], "image_token_length_h": 4,
           "image_token_length_w": 4, "max_crops": 2, "overlap_margins": [2, 2]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    (tmp_path / "tokenizer.json").write_text(build_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}))
    data = TrainingData(dataset, Processor.from_pretrained(tmp_path))
    assert len(data) == 40 and data.skipped == {}
    assert data.report().endswith("none skipped")


def test_write_dataset_is_atomic(tmp_path, monkeypatch):
    calls = []

    def failing(image, path, fmt, quality=90):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        image.save(path, format="PNG")

    monkeypatch.setattr(S, "write_image", failing)
    with pytest.raises(OSError, match="disk full"):
        S.write_dataset(tmp_path / "out", 5, seed=0, sizes=SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not an empty directory"):
        S.write_dataset(tmp_path / "full", 5, seed=0)
    with pytest.raises(UsageError, match="formats"):
        S.write_dataset(tmp_path / "o", 5, seed=0, formats=("gif",))
    with pytest.raises(UsageError, match="sizes"):
        S.write_dataset(tmp_path / "o", 5, seed=0, sizes=(300, 200))


# ----------------------------------------------------------------------------- EXIF, CLI


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_copy_and_point_maps(tmp_path, orientation, ext):
    img = Image.new("RGB", (40, 24), (255, 255, 255))
    img.paste((255, 0, 0), (4, 4, 8, 8))  # a red block around (6, 6) = (15%, 25%)
    img.save(tmp_path / "a.png")
    size = S.exif_rotated_copy(tmp_path / "a.png", tmp_path / f"b{ext}", orientation, quality=60)
    shown = load_image(tmp_path / f"b{ext}")  # molmoe's loader applies the orientation
    assert shown.size == size == ((24, 40) if orientation >= 5 else (40, 24))
    x, y = S.displayed_point(15.0, 25.0, orientation)
    px, py = S._pixel(*size, x, y)
    r, g, b = (int(v) for v in shown.pixels[py, px])
    assert r > 180 and g < 100 and b < 100, (orientation, (px, py))
    assert S.stored_point(x, y, orientation) == pytest.approx((15.0, 25.0))


def test_cli(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "1", "--max-size", "256",
                 "--formats", "png"]) == 0
    assert str(out / "train.jsonl") in capsys.readouterr().out
    assert sorted(p.suffix for p in (out / "images").iterdir()) == [".png"] * 3
    assert main(["synth", "--out", str(out), "--n", "3"]) == 2
    assert "not an empty directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- curriculum knobs


def test_default_knobs_change_nothing():
    for i in range(20):
        a = S.make_sample(S._sample_rng(11, i), sides=SMALL)
        b = S.make_sample(S._sample_rng(11, i), sides=SMALL, knobs=S.Knobs())
        c = S.make_sample(S._sample_rng(11, i), sides=SMALL, knobs=S.Knobs.parse(""))
        for x in (b, c):
            assert (x.question, x.answer) == (a.question, a.answer)
            assert x.scene.to_json() == a.scene.to_json()


def test_knobs_parse():
    k = S.Knobs.parse("objects=2-4,same_shape=1,same_colour=0,distinct_colours=1,"
                      "backgrounds=plain+noisy,mix=single:3+count:1")
    assert k.objects == (2, 4) and k.p_same_shape == 1 and k.p_same_colour == 0
    assert k.distinct_colours and k.backgrounds == ("plain", "noisy")
    assert k.mix == {"single": 3.0, "count": 1.0}
    assert S.Knobs.parse("objects=3").objects == (3, 3)
    for bad in ("objects=0-2", "objects=3-7", "colour=1", "mix=point:1", "backgrounds=wood",
                "same_shape=2"):
        with pytest.raises(UsageError):
            S.Knobs.parse(bad)


def _knob_samples(spec, n=120, seed=21):
    k = S.Knobs.parse(spec)
    return [S.make_sample(S._sample_rng(seed, i), sides=SMALL, knobs=k) for i in range(n)]


def test_knobs_object_count_backgrounds_and_mix():
    one = _knob_samples("objects=1-1,backgrounds=plain,mix=single:1")
    assert all(len(s.scene.objects) == 1 for s in one)
    assert all(s.scene.background.kind == "plain" for s in one)
    assert all(s.target["kind"] == "single" for s in one)
    few = _knob_samples("objects=2-3,mix=multi:1+count:1")
    assert {len(s.scene.objects) for s in few} == {2, 3}
    assert {s.target["kind"] for s in few} == {"multi", "count"}
    # answers stay true to the scene whatever the knobs
    for s in one + few:
        assert s.target["count"] == len(s.target["indices"])
        for i, p in zip(s.target["indices"], s.target["points"]):
            assert S.point_in_object(s.scene, i, *p)


def test_knobs_distinct_colours_and_distractors():
    ss = _knob_samples("objects=2-6,distinct_colours=1,same_shape=1")
    for s in ss:
        colours = [o.colour for o in s.scene.objects]
        assert len(set(colours)) == len(colours)
        if s.target["kind"] == "single":  # every single scene holds a same-shape distractor
            assert any(o.shape == s.target["shape"] and o.colour != s.target["colour"]
                       for o in s.scene.objects)
    none = _knob_samples("objects=1-6,same_shape=0,same_colour=0,mix=single:1", n=200)
    planted = _knob_samples("objects=1-6,same_shape=1,same_colour=1,mix=single:1", n=200)

    def rate(samples):
        return np.mean([any(o.shape == s.target["shape"] and o.colour != s.target["colour"]
                            for o in s.scene.objects) for s in samples])
    assert rate(planted) == 1.0 and rate(none) < 0.5


def test_knobs_deterministic_dataset(tmp_path):
    k = S.Knobs.parse("objects=2-3,distinct_colours=1,mix=single:1")
    a = S.write_dataset(tmp_path / "a", 8, seed=4, sizes=SMALL, knobs=k).parent
    b = S.write_dataset(tmp_path / "b", 8, seed=4, sizes=SMALL, knobs=k).parent
    assert _tree(a) == _tree(b)


def test_knobs_size_sides_white():
    ss = _knob_samples("objects=1-2,backgrounds=white,size=20-30,sides=224,mix=single:1", n=40)
    for s in ss:
        assert s.scene.size == (224, 224)
        assert s.scene.background.colours == ((255, 255, 255),)
        assert all(0.2 * 224 <= o.size <= 0.3 * 224 for o in s.scene.objects)
        i = s.target["indices"][0]
        assert S.point_in_object(s.scene, i, *s.target["points"][0])
    for bad in ("size=1-10", "size=30-20", "sides=100-200"):
        with pytest.raises(UsageError):
            S.Knobs.parse(bad)


def test_knobs_shapes_colours():
    ss = _knob_samples("objects=1-3,shapes=circle,colours=red,backgrounds=white,mix=single:1",
                       n=20)
    assert all(s.question == "Point to the red circle." for s in ss)
    assert all(len(s.scene.objects) == 1 for s in ss)  # nothing else can be drawn
    ss = _knob_samples("objects=2-4,shapes=circle+square,colours=red+blue", n=60)
    assert all(o.shape in ("circle", "square") and o.colour in ("red", "blue")
               for s in ss for o in s.scene.objects)
    with pytest.raises(UsageError):
        S.Knobs.parse("shapes=hexagon")


def _check_anchored(ss, anchor_of, jitter=0.04, side=224):
    """Every object within `jitter` x the side of its anchor (`anchor_of(obj)`, fractions of the
    picture), and the target's answer point on the target."""
    for s in ss:
        for o in s.scene.objects:
            ax, ay = anchor_of(o)
            assert abs(o.cx - ax * side) <= jitter * side + 1e-6
            assert abs(o.cy - ay * side) <= jitter * side + 1e-6
        i = s.target["indices"][0]
        assert S.point_in_object(s.scene, i, *s.target["points"][0])


def test_knobs_anchor():
    ss = _knob_samples("objects=2-2,shapes=circle,backgrounds=white,size=15-20,sides=224,"
                       "distinct_colours=1,anchor=0.04,mix=single:1", n=40)
    _check_anchored(ss, lambda o: S.COLOUR_ANCHORS[o.colour])
    for bad in ("anchor=-0.1", "anchor=0.9", "anchor_by=size"):
        with pytest.raises(UsageError):
            S.Knobs.parse(bad)


def test_knobs_anchor_by_shape():
    """Shape-anchored scenes: two objects of one colour, different shapes, each shape at its
    own spot, so the shape word alone says where to point."""
    ss = _knob_samples("objects=2-2,same_colour=1,same_shape=0,backgrounds=white,size=15-20,"
                       "sides=224,anchor=0.04,anchor_by=shape,mix=single:1", n=40)
    _check_anchored(ss, lambda o: S.SHAPE_ANCHORS[o.shape])
    for s in ss:
        objs = s.scene.objects
        assert len(objs) == 2 and objs[0].colour == objs[1].colour
        assert objs[0].shape != objs[1].shape
        assert objs[s.target["indices"][0]].shape == s.target["shape"]
