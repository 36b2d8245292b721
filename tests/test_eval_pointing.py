"""bench/eval_pointing.py's scoring: fake model answers -> metrics (no model runs)."""
from __future__ import annotations

import random

import pytest

from bench import eval_pointing as E
from molmoe import synthetic as S
from molmoe.points import format_count, format_points


def _scene():
    # A red circle, a blue circle (same shape, other colour) and a red square.
    rng = random.Random(7)
    return S.make_scene(rng, [("circle", "red"), ("circle", "blue"), ("square", "red")],
                        size=(400, 300))


def _target(scene, kind, shape, colour=None):
    return S.make_example(random.Random(0), scene, kind, shape, colour)[2]


def _off_objects(scene):
    """A point (percent) on the background."""
    for y in range(scene.height):
        for x in range(scene.width):
            if scene.labels[y, x] == 0:
                return (100 * (x + 0.5) / scene.width, 100 * (y + 0.5) / scene.height)
    raise AssertionError


def test_single_right_wrong_and_distractor():
    scene = _scene()
    t = _target(scene, "single", "circle", "red")
    red, blue = scene.objects[0].point, scene.objects[1].point
    r = E.score_answer(scene, t, format_points([red], "red circle"))
    assert r["correct"] and r["grammar"] and r["has_distractor"] and not r["distractor_hit"]
    assert r["error"] == 0.0 and r["error_centre"] > 0
    r = E.score_answer(scene, t, format_points([blue], "red circle"))
    assert not r["correct"] and r["distractor_hit"]
    r = E.score_answer(scene, t, format_points([red, blue], "red circle"))
    assert not r["correct"] and r["distractor_hit"]  # every point must be on the target
    r = E.score_answer(scene, t, "There are none.")
    assert not r["correct"] and not r["distractor_hit"]
    r = E.score_answer(scene, t, "garbage \x07")
    assert not r["correct"]


def test_absent():
    scene = _scene()
    t = _target(scene, "absent", "circle", "green")
    assert E.score_answer(scene, t, "There are none.")["correct"]
    r = E.score_answer(scene, t, format_points([scene.objects[1].point], "green circle"))
    assert not r["correct"] and r["distractor_hit"] and r["has_distractor"]
    assert not E.score_answer(scene, t, "")["correct"]


def test_multi_precision_recall():
    scene = _scene()
    t = _target(scene, "multi", "circle")
    a, b = scene.objects[0].point, scene.objects[1].point
    sq = scene.objects[2].point
    r = E.score_answer(scene, t, format_points([a, b], "circles"))
    assert (r["tp"], r["predicted"], r["truth"], r["correct"]) == (2, 2, 2, True)
    r = E.score_answer(scene, t, format_points([a, a], "circles"))  # twice the same object
    assert (r["tp"], r["predicted"]) == (1, 2)
    r = E.score_answer(scene, t, format_points([a, sq, _off_objects(scene)], "circles"))
    assert (r["tp"], r["predicted"]) == (1, 3)
    m = E.aggregate([E.score_answer(scene, t, format_points([a, b], "circles")),
                     E.score_answer(scene, t, format_points([a, sq], "circles"))])
    assert m["multi_precision"] == pytest.approx(3 / 4)
    assert m["multi_recall"] == pytest.approx(3 / 4)
    assert m["multi_exact"] == pytest.approx(1 / 2)
    # no points at all: precision 0, not undefined
    m = E.aggregate([E.score_answer(scene, t, "There are none.")])
    assert m["multi_precision"] == 0.0 and m["multi_recall"] == 0.0


def test_count():
    scene = _scene()
    t = _target(scene, "count", "circle")
    pts = [o.point for o in scene.objects[:2]]
    assert E.score_answer(scene, t, format_count(pts, "circles"))["correct"]
    r = E.score_answer(scene, t, format_count(pts[:1], "circles"))
    assert r["stated"] == 1 and not r["correct"]
    # a bare list of points without a stated total counts its points
    assert E.score_answer(scene, t, format_points(pts, "circles"))["stated"] == 2
    t0 = _target(scene, "count", "star")
    assert E.score_answer(scene, t0, "There are none.")["correct"]
    assert not E.score_answer(scene, t0, "nothing")["correct"]


def test_exif_points_map_back():
    scene = _scene()
    t = _target(scene, "single", "circle", "red")
    x, y = scene.objects[0].point
    for o in range(1, 9):
        shown = S.displayed_point(x, y, o)
        assert E.score_answer(scene, t, format_points([shown], "red circle"), o)["correct"]
    # the stored coordinates are wrong on a rotated picture (unless the map fixes them)
    wrong = [o for o in range(2, 9)
             if not E.score_answer(scene, t, format_points([(x, y)], "red circle"), o)["correct"]]
    assert wrong


def test_aggregate_targets_and_distractor_rate():
    scene = _scene()
    single = _target(scene, "single", "circle", "red")
    red, blue = scene.objects[0].point, scene.objects[1].point
    results = [E.score_answer(scene, single, format_points([red], "red circle"))] * 19
    results.append(E.score_answer(scene, single, format_points([blue], "red circle")))
    m = E.aggregate(results)
    assert m["single"] == pytest.approx(0.95) and m["distractor_rate"] == pytest.approx(0.05)
    assert m["distractor_n"] == 20
    assert m["passed"]["single"] and m["passed"]["distractor_rate"]
    assert not m["passed"]["count_exact"]  # no count question: not measured, not passed
    assert m["count_exact"] is None


def test_kind_schedule_and_scenes_are_held_out():
    kinds = E.kind_schedule(300, E.EVAL_SEED)
    assert [kinds.count(k) for k in ("single", "multi", "count", "absent")] == [120, 60, 75, 45]
    assert E.kind_schedule(300, E.EVAL_SEED) == kinds
    assert len(E.kind_schedule(7, E.EVAL_SEED)) == 7
    with pytest.raises(SystemExit):
        E.make_scenes(2, seed=0)  # a training seed
    a = E.make_scenes(3, sides=(160, 200))
    b = E.make_scenes(3, sides=(160, 200))
    assert [s["sample"].answer for s in a] == [s["sample"].answer for s in b]
    # each generated answer is right by the evaluator's own rules
    for s in a:
        assert E.score_answer(s["sample"].scene, s["sample"].target, s["sample"].answer)["correct"]


def test_variants_write_files(tmp_path):
    scenes = E.make_scenes(2, sides=(160, 200))
    for v in E.VARIANTS:
        path, o = E.write_variant(scenes[0], v, tmp_path)
        assert (tmp_path / path).exists() if not path.startswith("/") else True
        assert o == (scenes[0]["orientation"] if v == "exif" else 1)


def test_table_renders():
    scene = _scene()
    t = _target(scene, "single", "circle", "red")
    m = E.aggregate([E.score_answer(scene, t, format_points([scene.objects[0].point],
                                                            "red circle"))])
    m["seconds"] = 1.0
    report = {"model": "x", "n": 1, "seed": E.EVAL_SEED, "sides": [160, 1024], "robust_n": 1,
              "variants": {"base": {"metrics": m}}}
    text = E.table(report)
    assert "100.0%" in text and "single PASS" in text
