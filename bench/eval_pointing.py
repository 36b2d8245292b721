"""Pointing and counting accuracy of a Molmo checkpoint on held-out synthetic scenes (issue 13).

    python bench/eval_pointing.py --model runs/pointer/run/model              # 300 scenes
    python bench/eval_pointing.py --model DIR --n 100 --variants base         # quick look

Scenes. Scene i is `molmoe.synthetic.make_sample(random.Random("molmoe-synth:{seed}:{i}"),
kind)` (the generator's own per-example RNG), drawn at the issue's sizes (160-1024 px, aspect
1:2..2:1, PNG or JPEG at quality 60-95 like `write_dataset`). The default seed is 1,000,000 and
evaluation seeds are >= 1,000,000; training data is written with seeds < 1,000,000
(`molmoe.pointer`, scripts/train_default_model.sh use 0), and different seeds never share a
scene RNG, so no evaluation scene is a training scene. Question kinds follow the generator's mix
exactly (of 300: 120 single, 60 multi, 75 count, 45 absent), in a seeded shuffled order; count
questions have 0-6 matching objects (uniform).

Metrics (per variant; `score_answer` scores one answer, `aggregate` sums them):
  * single:      the answer has >= 1 point and every point lies on the named object's visible
                 pixels (`point_in_object`). Target >= 90%.
  * multi:       points matched to the named objects (each object matched at most once; a second
                 point on it, or a point on anything else, is a false positive): precision =
                 matched / predicted points, recall = matched / named objects, both summed over
                 the questions (micro). Targets >= 85% each.
  * count:       the stated count (`parse_points(...).count`: "a total of N", "There are none." =
                 0; without one, the number of points) equals the truth. Target >= 85%.
  * distractors: of the single and absent questions whose scene holds an object of the named
                 shape in another colour, the share whose answer points at such an object.
                 Target <= 5%.
  * also: absent accuracy ("There are none.", no point), the grammar pass rate (`check_points`),
    count accuracy per true count.
Variants: base (the generator's own files), noaa (re-rendered with hard edges: no
anti-aliasing, PNG), jpeg60 (JPEG quality 60), exif (an EXIF-rotated copy, orientation 2-8 in
turn: the model sees the displayed picture and its points are mapped back with
`stored_point`). The robustness variants run on the first --robust-n scenes.

Writes JSON (--out) and prints a table. Greedy decoding in batches (`Engine.generate`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from molmoe import synthetic as S  # noqa: E402
from molmoe.points import PointsFormatError, check_points, parse_points  # noqa: E402

EVAL_SEED = 1_000_000  # evaluation seeds are >= this; training seeds are below it
TARGETS = {"single": (">=", 0.90), "multi_precision": (">=", 0.85),
           "multi_recall": (">=", 0.85), "count_exact": (">=", 0.85),
           "distractor_rate": ("<=", 0.05)}
VARIANTS = ("base", "noaa", "jpeg60", "exif")


# ----------------------------------------------------------------------------- scenes


def kind_schedule(n: int, seed: int) -> list[str]:
    """The question kind of each of n scenes: the generator's mix by largest remainder, in a
    seeded shuffled order."""
    mix = S.QUESTION_MIX
    counts = {k: int(n * share) for k, share in mix.items()}
    rest = sorted(mix, key=lambda k: -(n * mix[k] - counts[k]))
    for k in rest[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k in mix for _ in range(counts[k])]
    random.Random(f"molmoe-eval-kinds:{seed}").shuffle(kinds)
    return kinds


def make_scenes(n: int, seed: int = EVAL_SEED, sides=S.SIDE_RANGE) -> list[dict]:
    """n held-out examples: {index, sample, format, quality, orientation}."""
    if seed < EVAL_SEED:
        raise SystemExit(f"evaluation seeds are >= {EVAL_SEED} (training uses the ones below)")
    out = []
    for i, kind in enumerate(kind_schedule(n, seed)):
        rng = S._sample_rng(seed, i)
        sample = S.make_sample(rng, kind, sides=tuple(sides))
        fmt = rng.choice(("png", "jpeg"))
        quality = rng.randint(*S.JPEG_QUALITY) if fmt == "jpeg" else None
        out.append({"index": i, "sample": sample, "format": fmt, "quality": quality,
                    "orientation": 2 + i % 7})
    return out


def write_variant(scene: dict, variant: str, directory: pathlib.Path) -> tuple[str, int]:
    """The picture of `scene` for `variant` as a file; (path, EXIF orientation to undo)."""
    sample, i = scene["sample"], scene["index"]
    if variant == "base":
        ext = "png" if scene["format"] == "png" else "jpg"
        path = directory / f"{i:06d}-base.{ext}"
        S.write_image(S.render(sample.scene), path, scene["format"], scene["quality"] or 0)
        return str(path), 1
    if variant == "noaa":
        path = directory / f"{i:06d}-noaa.png"
        S.write_image(S.render(sample.scene, antialias=False), path, "png")
        return str(path), 1
    if variant == "jpeg60":
        path = directory / f"{i:06d}-q60.jpg"
        S.write_image(S.render(sample.scene), path, "jpeg", 60)
        return str(path), 1
    if variant == "exif":
        src = directory / f"{i:06d}-src.png"
        S.write_image(S.render(sample.scene), src, "png")
        o = scene["orientation"]
        path = directory / f"{i:06d}-exif{o}.png"
        S.exif_rotated_copy(src, path, o)
        return str(path), o
    raise SystemExit(f"unknown variant {variant!r}; expected {', '.join(VARIANTS)}")


# ----------------------------------------------------------------------------- scoring


def score_answer(scene: S.Scene, target: dict, answer: str, orientation: int = 1) -> dict:
    """One answer against its scene and target (`Sample.target`). Points are in percent of the
    picture the model saw; `orientation` (EXIF) maps them back to the stored scene."""
    parsed = parse_points(answer)
    pts = [S.stored_point(x, y, orientation) for x, y in parsed.points]
    on = [S.object_at(scene, x, y) for x, y in pts]
    try:
        check_points(answer)
        grammar = True
    except PointsFormatError:
        grammar = False
    kind, named = target["kind"], set(target["indices"])
    objs = scene.objects
    r = {"kind": kind, "answer": answer, "n_points": len(pts), "grammar": grammar}
    if kind in ("single", "absent"):
        distractors = {i for i, o in enumerate(objs)
                       if o.shape == target["shape"] and o.colour != target["colour"]}
        r["has_distractor"] = bool(distractors)
        r["distractor_hit"] = any(o in distractors for o in on)
        if kind == "single":
            r["correct"] = bool(pts) and all(o in named for o in on)
            tx, ty = target["points"][0]
            # distance (percent units) of the first point from the annotated centre: shows
            # localisation improving before the accuracy moves; the centre of the picture
            # as a blind guess scores `error_centre`
            r["error"] = (((pts[0][0] - tx) ** 2 + (pts[0][1] - ty) ** 2) ** 0.5
                          if pts else None)
            r["error_centre"] = ((50 - tx) ** 2 + (50 - ty) ** 2) ** 0.5
        else:
            r["correct"] = not pts and parsed.count == 0
    elif kind == "multi":
        hit = set()
        tp = 0
        for o in on:
            if o in named and o not in hit:
                hit.add(o)
                tp += 1
        r.update(tp=tp, predicted=len(pts), truth=len(named))
        r["correct"] = tp == len(named) == len(pts)
    elif kind == "count":
        stated = parsed.count if parsed.count is not None else (len(pts) if pts else None)
        r.update(stated=stated, truth=target["count"])
        r["correct"] = stated == target["count"]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return r


def _ratio(a, b):
    return a / b if b else None


def aggregate(results: list[dict]) -> dict:
    """The metrics of a list of `score_answer` results (module docstring)."""
    by = {k: [r for r in results if r["kind"] == k] for k in ("single", "multi", "count",
                                                              "absent")}
    m = {"n": len(results), "n_by_kind": {k: len(v) for k, v in by.items()}}
    m["single"] = _ratio(sum(r["correct"] for r in by["single"]), len(by["single"]))
    errors = [r["error"] for r in by["single"] if r["error"] is not None]
    m["single_mean_error"] = sum(errors) / len(errors) if errors else None
    m["single_centre_error"] = _ratio(sum(r["error_centre"] for r in by["single"]),
                                      len(by["single"]))
    pred = sum(r["predicted"] for r in by["multi"])
    m["multi_precision"] = _ratio(sum(r["tp"] for r in by["multi"]), pred)
    if by["multi"] and not pred:
        m["multi_precision"] = 0.0  # no points at all: nothing right
    m["multi_recall"] = _ratio(sum(r["tp"] for r in by["multi"]),
                               sum(r["truth"] for r in by["multi"]))
    m["multi_exact"] = _ratio(sum(r["correct"] for r in by["multi"]), len(by["multi"]))
    m["count_exact"] = _ratio(sum(r["correct"] for r in by["count"]), len(by["count"]))
    m["count_by_truth"] = {}
    for c in range(S.MAX_OBJECTS + 1):
        rs = [r for r in by["count"] if r["truth"] == c]
        if rs:
            m["count_by_truth"][str(c)] = {"n": len(rs),
                                           "exact": sum(r["correct"] for r in rs) / len(rs)}
    d = [r for r in by["single"] + by["absent"] if r["has_distractor"]]
    m["distractor_rate"] = _ratio(sum(r["distractor_hit"] for r in d), len(d))
    m["distractor_n"] = len(d)
    m["absent"] = _ratio(sum(r["correct"] for r in by["absent"]), len(by["absent"]))
    m["grammar"] = _ratio(sum(r["grammar"] for r in results), len(results))
    m["passed"] = {k: (m[k] is not None and (m[k] >= t if op == ">=" else m[k] <= t))
                   for k, (op, t) in TARGETS.items()}
    return m


# ----------------------------------------------------------------------------- running


def run_model(model_dir: str, prompts: list[tuple[str, str]], *, batch: int = 64,
              max_new_tokens: int | None = None, answers_for_length: list[str] = ()) -> list[str]:
    """Greedy answers to (question, image path) prompts, `batch` at a time."""
    import torch

    from molmoe.generation.engine import Engine, GenerationConfig
    from molmoe.pipeline import generate_many, load_pipeline

    proc, model, eos = load_pipeline(model_dir, device="cpu")
    if max_new_tokens is None:  # room for the longest expected answer, and some
        longest = max((len(proc.tokenizer.encode_text(" " + a)) for a in answers_for_length),
                      default=200)
        max_new_tokens = longest + 16
    limit = model.config.text.max_position_embeddings - max_new_tokens
    engine = Engine(model, proc.tokenizer, max_batch=batch)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    out = [None] * len(prompts)
    # Images are decoded and preprocessed on worker threads while the engine decodes.
    with torch.no_grad():  # not switched off globally: callers may train afterwards
        for item in generate_many(engine, proc, prompts, config, max_length=limit):
            if item.error is not None:
                raise item.error
            out[item.index] = item.result.text
    return out


def evaluate(model_dir: str, *, n: int = 300, seed: int = EVAL_SEED, sides=S.SIDE_RANGE,
             variants=VARIANTS, robust_n: int = 100, batch: int = 64,
             max_new_tokens: int | None = None, keep_answers: bool = True) -> dict:
    t0 = time.perf_counter()
    scenes = make_scenes(n, seed, sides)
    report = {"model": str(model_dir), "n": n, "seed": seed, "sides": list(sides),
              "robust_n": min(robust_n, n), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="eval-pointing-") as tmp:
        tmp = pathlib.Path(tmp)
        for variant in variants:
            t1 = time.perf_counter()
            subset = scenes if variant == "base" else scenes[:robust_n]
            files = [write_variant(s, variant, tmp) for s in subset]
            answers = run_model(model_dir, [(s["sample"].question, f) for s, (f, _) in
                                            zip(subset, files)], batch=batch,
                                max_new_tokens=max_new_tokens,
                                answers_for_length=[s["sample"].answer for s in subset])
            results = []
            for s, (_, o), a in zip(subset, files, answers):
                r = score_answer(s["sample"].scene, s["sample"].target, a, o)
                r.update(index=s["index"], question=s["sample"].question,
                         expected=s["sample"].answer)
                results.append(r)
            metrics = aggregate(results)
            metrics["seconds"] = time.perf_counter() - t1
            entry = {"metrics": metrics}
            if keep_answers:
                entry["results"] = results
            report["variants"][variant] = entry
    report["seconds"] = time.perf_counter() - t0
    return report


def _pct(v) -> str:
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def table(report: dict) -> str:
    cols = [("single", "single"), ("multi P", "multi_precision"), ("multi R", "multi_recall"),
            ("count", "count_exact"), ("distr.", "distractor_rate"), ("absent", "absent"),
            ("grammar", "grammar")]
    lines = [f"model {report['model']}: {report['n']} scenes (seed {report['seed']}, sides "
             f"{report['sides'][0]}-{report['sides'][1]}), robustness variants on the first "
             f"{report['robust_n']}",
             f"{'variant':8s} {'n':>4s} " + " ".join(f"{c:>7s}" for c, _ in cols) + "   time"]
    for name, v in report["variants"].items():
        m = v["metrics"]
        lines.append(f"{name:8s} {m['n']:4d} " + " ".join(f"{_pct(m[k]):>7s}" for _, k in cols)
                     + f"  {m['seconds']:5.0f}s")
    lines.append("targets: single >= 90%, multi P/R >= 85%, count >= 85%, distractors <= 5%")
    base = report["variants"].get("base")
    if base:
        m = base["metrics"]
        lines.append("base: " + ", ".join(f"{k} {'PASS' if ok else 'fail'}"
                                          for k, ok in m["passed"].items()))
        if m.get("single_mean_error") is not None:
            lines.append(f"single: mean distance of the point from the target centre "
                         f"{m['single_mean_error']:.1f} (percent units; always answering the "
                         f"picture's centre: {m['single_centre_error']:.1f})")
        lines.append("count exact by true count: " + ", ".join(
            f"{c}: {_pct(v['exact']).strip()} of {v['n']}" for c, v in
            m["count_by_truth"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--sides", type=int, nargs=2, default=list(S.SIDE_RANGE))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--robust-n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: 2 threads thrash on 2 shared cores)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="JSON report")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}; expected {', '.join(VARIANTS)}")
    report = evaluate(args.model, n=args.n, seed=args.seed, sides=args.sides,
                      variants=variants, robust_n=args.robust_n, batch=args.batch,
                      max_new_tokens=args.max_new_tokens)
    print(table(report), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
