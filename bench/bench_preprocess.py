"""Image decode and preprocessing: the Python path (the released processor's arithmetic) against
the native op (csrc/) and the GPU path, per image size, as ratios measured in one run.

    python -m bench.bench_preprocess              # the issue's sizes, 2 threads (all cores)
    python -m bench.bench_preprocess --quick      # fewer repetitions
    python -m bench.bench_preprocess --answers CKPT --data SET.jsonl   # + fast-decode answers

Per size (a photo, resized and saved as a quality-90 JPEG):
  decode        load_image: read, JPEG decode, RGB (what every path pays first)
  decode_fast   the same with fast_decode (PIL draft mode: DCT-scaled decode), NOT bit-exact
  python        preprocess_image(backend="python"): crops, masks, feature positions, tokens
  native        preprocess_image(backend="native"): the same outputs from csrc/preprocess.cpp
  cuda          preprocess_image(device="cuda") when a GPU is present (upload included)
Each is the p50 of repeated wall-clock runs with the p20/p80 spread; `speedup` is python / native
from the same run. Targets (issue 16, this 2-core CPU): 640x480 <= 3 ms, 1920x1080 <= 8 ms,
4032x3024 <= 40 ms, each >= 8x the Python path.

Fast decode's cost in accuracy: the max and mean absolute difference of the processor's `images`
(normalised pixels) between the exact and the fast decode, per size; with --answers, how many
greedy answers of that checkpoint change, and how far its first point moves, on pictures of its
own domain (a fine-tuning JSONL) enlarged and saved as JPEGs.
"""
from __future__ import annotations

import json
import pathlib
import random
import tempfile

import torch
from PIL import Image

from bench.common import bench_parser, environment, time_fn
from molmoe.processing import load_image
from molmoe.processing import native
from molmoe.processing.preprocess import ImageSettings, ImageTokenIds, preprocess_image
from molmoe.processing.processor import decode_target

SIZES = [(640, 480), (1920, 1080), (4032, 3024), (1344, 1008)]  # (W, H)
TARGET_MS = {(640, 480): 3.0, (1920, 1080): 8.0, (4032, 3024): 40.0}
TARGET_SPEEDUP = 8.0
IDS = ImageTokenIds(start=1, end=2, patch=3, col=4)


def photo() -> Image.Image:
    """A real photograph when matplotlib's sample data is installed (the bench extra), else a
    synthetic scene."""
    try:
        import matplotlib.cbook

        return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    except (ImportError, OSError, ValueError):
        from molmoe.synthetic import make_sample, render
        return render(make_sample(random.Random(0)).scene)


def write_jpegs(directory: pathlib.Path, sizes) -> dict[tuple[int, int], pathlib.Path]:
    src = photo()
    paths = {}
    for w, h in sizes:
        path = directory / f"photo_{w}x{h}.jpg"
        src.resize((w, h), Image.LANCZOS).save(path, quality=90)
        paths[(w, h)] = path
    return paths


def cuda_timer(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def bench_size(path: pathlib.Path, settings: ImageSettings, reps: int) -> dict:
    def fast_load():
        return load_image(path, fast_decode=lambda size: decode_target(settings, size))

    pixels = load_image(path).pixels
    row = {"decode": time_fn(lambda: load_image(path), reps=reps),
           "decode_fast": time_fn(fast_load, reps=reps),
           "python": time_fn(lambda: preprocess_image(pixels, settings, IDS, backend="python"),
                             reps=max(3, reps // 4)),
           "native": time_fn(lambda: preprocess_image(pixels, settings, IDS, backend="native"),
                             reps=reps)}
    if torch.cuda.is_available():
        row["cuda"] = time_fn(cuda_timer(
            lambda: preprocess_image(pixels, settings, IDS, device="cuda")), reps=reps)
    exact = preprocess_image(pixels, settings, IDS, backend="native").images
    fast = fast_load()
    approx = preprocess_image(fast.pixels, settings, IDS, backend="native",
                              size=(fast.size[1], fast.size[0])).images
    diff = (exact - approx).abs()
    row["fast_decode_pixels"] = list(fast.pixels.shape[:2])
    row["fast_decode_error"] = {"max": diff.max().item(), "mean": diff.mean().item()}
    return row


def answer_changes(checkpoint: str, data: pathlib.Path, n: int, upscale: int,
                   directory: pathlib.Path) -> dict:
    """Greedy answers of `checkpoint` with the exact and the fast decode, on the first n
    examples of a fine-tuning JSONL (molmoe train's format: in-domain for the checkpoint), each
    picture upscaled `upscale`x and saved as a quality-90 JPEG so that draft mode applies."""
    from molmoe.generation.engine import Engine, GenerationConfig
    from molmoe.pipeline import generate_many, load_pipeline
    from molmoe.points import parse_points

    proc, model, eos = load_pipeline(checkpoint, device="cpu")
    engine = Engine(model, proc.tokenizer, eos_token_id=eos, max_batch=32)
    config = GenerationConfig(max_new_tokens=48)
    items = []
    for k, line in enumerate(data.read_text().splitlines()[:n]):
        record = json.loads(line)
        img = Image.open(data.parent / record["image"]).convert("RGB")
        path = directory / f"answers_{k}.jpg"
        img.resize((img.width * upscale, img.height * upscale), Image.BICUBIC).save(
            path, quality=90)
        items.append((record["messages"][0]["content"], str(path)))
    answers, decoded = {}, None
    for fast in (False, True):
        proc.fast_decode = fast
        out = [None] * len(items)
        with torch.no_grad():
            for item in generate_many(engine, proc, items, config):
                if item.error is not None:
                    raise item.error
                out[item.index] = item.result.text
        answers[fast] = out
        if fast:
            decoded = list(proc.load(items[0][1]).pixels.shape[:2])
    proc.fast_decode = False
    changed = sum(a != b for a, b in zip(answers[False], answers[True]))
    shifts = []
    for a, b in zip(answers[False], answers[True]):
        pa, pb = parse_points(a).points, parse_points(b).points
        if pa and pb:
            shifts.append(((pa[0][0] - pb[0][0]) ** 2 + (pa[0][1] - pb[0][1]) ** 2) ** 0.5)
    return {"checkpoint": checkpoint, "data": str(data), "examples": len(items),
            "upscale": upscale, "stored_size": list(Image.open(items[0][1]).size),
            "fast_decoded_hw": decoded, "changed": changed,
            "changed_fraction": changed / len(items),
            "first_point_shift_pct": {"n": len(shifts),
                                      "mean": sum(shifts) / len(shifts) if shifts else None,
                                      "max": max(shifts) if shifts else None}}


def main(argv=None) -> dict:
    parser = bench_parser(__doc__, quick_help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, all cores)")
    parser.add_argument("--answers", metavar="CHECKPOINT", default=None,
                        help="also count greedy answers changed by fast decode (with --data)")
    parser.add_argument("--data", type=pathlib.Path, default=None,
                        help="fine-tuning JSONL in the checkpoint's domain, for --answers")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--sizes", default=None,
                        help="comma-separated WxH (default: " +
                             ",".join(f"{w}x{h}" for w, h in SIZES) + ")")
    parser.add_argument("--upscale", type=int, default=8,
                        help="enlarge each picture this much before saving it as JPEG")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.native_available():
        raise SystemExit(f"the native op is not built ({native._load()}); {native.BUILD_HINT}")
    reps = 10 if args.quick else 40
    settings = ImageSettings()
    report = {"environment": {**environment(), "threads": torch.get_num_threads()},
              "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = SIZES if not args.sizes else [
            tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
        paths = write_jpegs(pathlib.Path(tmp), sizes)
        for (w, h), path in paths.items():
            row = bench_size(path, settings, reps)
            report["sizes"][f"{w}x{h}"] = {
                k: (vars(v) if hasattr(v, "p50_ms") else v) for k, v in row.items()}
        if args.answers:
            if args.data is None:
                raise SystemExit("--answers needs --data (a JSONL in the checkpoint's domain)")
            report["answers"] = answer_changes(args.answers, args.data, args.examples,
                                               args.upscale, pathlib.Path(tmp))
    print(table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def table(report: dict) -> str:
    env = report["environment"]
    lines = [f"{env['device']}, {env['threads']} threads, torch {env['torch']}, "
             f"commit {env['commit']}",
             "size        decode  fast-dec  python   native   cuda   speedup  target   "
             "fast-decode error (max / mean)"]
    for name, row in report["sizes"].items():
        w, h = (int(v) for v in name.split("x"))
        py, nat = row["python"]["p50_ms"], row["native"]["p50_ms"]
        cuda = f"{row['cuda']['p50_ms']:6.2f}" if "cuda" in row else "   n/a"
        target = TARGET_MS.get((w, h))
        ok = "" if target is None else (
            "PASS" if nat <= target and py / nat >= TARGET_SPEEDUP else "FAIL")
        goal = f"<={target:g}ms {ok}" if target else ""
        err = row["fast_decode_error"]
        decode, fast = row["decode"]["p50_ms"], row["decode_fast"]["p50_ms"]
        lines.append(f"{name:<10} {decode:7.1f} {fast:8.1f}"
                     f" {py:8.1f} {nat:8.2f} {cuda} {py / nat:7.1f}x  {goal:<12}"
                     f" {err['max']:.3f} / {err['mean']:.4f} "
                     f"(decoded {row['fast_decode_pixels'][1]}x{row['fast_decode_pixels'][0]})")
        lines.append(f"{'':10} spread p20-p80: python [{row['python']['p20_ms']:.1f}, "
                     f"{row['python']['p80_ms']:.1f}] native [{row['native']['p20_ms']:.2f}, "
                     f"{row['native']['p80_ms']:.2f}] ms")
    if "answers" in report:
        a = report["answers"]
        shift = a["first_point_shift_pct"]
        lines.append(f"fast decode changed {a['changed']} of {a['examples']} greedy answers "
                     f"({a['changed_fraction']:.1%}) of {a['checkpoint']} on {a['data']} "
                     f"(pictures {a['stored_size'][0]}x{a['stored_size'][1]}, fast-decoded to "
                     f"{a['fast_decoded_hw'][1]}x{a['fast_decoded_hw'][0]}); first point moved "
                     f"{shift['mean'] if shift['mean'] is None else round(shift['mean'], 2)}% "
                     f"of the picture on average (max {shift['max']}) over {shift['n']} answers")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
