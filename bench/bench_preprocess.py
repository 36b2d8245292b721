"""Image decode and preprocessing: the Python path (the released processor's arithmetic) against
the native op (csrc/) and the GPU path, per image size, as ratios measured in one run.

    python -m bench.bench_preprocess              # the issue's sizes, 2 threads (all cores)
    python -m bench.bench_preprocess --quick      # fewer repetitions
    python -m bench.bench_preprocess --answers CHECKPOINT_DIR   # + fast-decode answer changes

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
greedy answers of that checkpoint change on synthetic scenes saved as large JPEGs.
"""
from __future__ import annotations

import json
import pathlib
import random
import tempfile

import torch
from PIL import Image

from bench.common import bench_parser, environment, time_fn
from molmoe.processing import Processor, load_image
from molmoe.processing import native
from molmoe.processing.preprocess import ImageSettings, ImageTokenIds, preprocess_image

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


def write_jpegs(directory: pathlib.Path) -> dict[tuple[int, int], pathlib.Path]:
    src = photo()
    paths = {}
    for w, h in SIZES:
        path = directory / f"photo_{w}x{h}.jpg"
        src.resize((w, h), Image.LANCZOS).save(path, quality=90)
        paths[(w, h)] = path
    return paths


def cuda_timer(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def bench_size(path: pathlib.Path, settings: ImageSettings, reps: int, fast_proc) -> dict:
    pixels = load_image(path).pixels
    row = {"decode": time_fn(lambda: load_image(path), reps=reps),
           "decode_fast": time_fn(lambda: fast_proc.load(path), reps=reps),
           "python": time_fn(lambda: preprocess_image(pixels, settings, IDS, backend="python"),
                             reps=max(3, reps // 4)),
           "native": time_fn(lambda: preprocess_image(pixels, settings, IDS, backend="native"),
                             reps=reps)}
    if torch.cuda.is_available():
        row["cuda"] = time_fn(cuda_timer(
            lambda: preprocess_image(pixels, settings, IDS, device="cuda")), reps=reps)
    exact = preprocess_image(pixels, settings, IDS, backend="native").images
    fast = fast_proc.load(path)
    approx = preprocess_image(fast.pixels, settings, IDS, backend="native",
                              size=(fast.size[1], fast.size[0])).images
    diff = (exact - approx).abs()
    row["fast_decode_pixels"] = list(fast.pixels.shape[:2])
    row["fast_decode_error"] = {"max": diff.max().item(), "mean": diff.mean().item()}
    return row


def answer_changes(checkpoint: str, n: int, directory: pathlib.Path) -> dict:
    """Greedy answers of `checkpoint` with exact and fast decode on n synthetic scenes, each
    upscaled 4x (so draft mode applies) and saved as a quality-90 JPEG."""
    from molmoe.generation.engine import Engine, GenerationConfig
    from molmoe.pipeline import load_pipeline
    from molmoe.synthetic import make_sample, render

    torch.set_grad_enabled(False)
    proc, model, eos = load_pipeline(checkpoint, device="cpu")
    engine = Engine(model, proc.tokenizer, eos_token_id=eos, max_batch=16)
    config = GenerationConfig(max_new_tokens=48)
    prompts = []
    for i in range(n):
        sample = make_sample(random.Random(2_000_000 + i))
        img = render(sample.scene)
        path = directory / f"scene_{i}.jpg"
        img.resize((img.width * 4, img.height * 4), Image.BICUBIC).save(path, quality=90)
        prompts.append((sample.question, path))
    answers = {}
    for fast in (False, True):
        proc.fast_decode = fast
        inputs = [{k: v for k, v in proc(q, p).items() if k != "original_size"}
                  for q, p in prompts]
        answers[fast] = [r.text for r in engine.generate(inputs, config)]
    proc.fast_decode = False
    changed = sum(a != b for a, b in zip(answers[False], answers[True]))
    return {"checkpoint": checkpoint, "scenes": n, "changed": changed,
            "changed_fraction": changed / n}


def main(argv=None) -> dict:
    parser = bench_parser(__doc__, quick_help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, all cores)")
    parser.add_argument("--answers", metavar="CHECKPOINT", default=None,
                        help="also count greedy answers changed by fast decode")
    parser.add_argument("--scenes", type=int, default=100)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.native_available():
        raise SystemExit(f"the native op is not built ({native._load()}); {native.BUILD_HINT}")
    reps = 10 if args.quick else 40
    settings = ImageSettings()
    fast_proc = Processor.__new__(Processor)  # only .load / .decode_target are used
    fast_proc.settings, fast_proc.max_pixels, fast_proc.compat = settings, None, "molmoe"
    fast_proc.fast_decode = True
    report = {"environment": {**environment(), "threads": torch.get_num_threads()},
              "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(pathlib.Path(tmp))
        for (w, h), path in paths.items():
            row = bench_size(path, settings, reps, fast_proc)
            report["sizes"][f"{w}x{h}"] = {
                k: (vars(v) if hasattr(v, "p50_ms") else v) for k, v in row.items()}
        if args.answers:
            report["answers"] = answer_changes(args.answers, args.scenes, pathlib.Path(tmp))
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
        lines.append(f"{name:<10} {row['decode']['p50_ms']:7.1f} {row['decode_fast']['p50_ms']:8.1f}"
                     f" {py:8.1f} {nat:8.2f} {cuda} {py / nat:7.1f}x  {goal:<12}"
                     f" {err['max']:.3f} / {err['mean']:.4f} "
                     f"(decoded {row['fast_decode_pixels'][1]}x{row['fast_decode_pixels'][0]})")
        lines.append(f"{'':10} spread p20-p80: python [{row['python']['p20_ms']:.1f}, "
                     f"{row['python']['p80_ms']:.1f}] native [{row['native']['p20_ms']:.2f}, "
                     f"{row['native']['p80_ms']:.2f}] ms")
    if "answers" in report:
        a = report["answers"]
        lines.append(f"fast decode changed {a['changed']} of {a['scenes']} greedy answers "
                     f"({a['changed_fraction']:.1%}) of {a['checkpoint']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
