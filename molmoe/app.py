"""`molmoe generate` and `molmoe demo`: image + prompt -> streamed answer, points, annotated PNG.

Both commands run the same path: load the image (EXIF-rotated, as the processor sees it),
process the prompt, load the model, generate, parse the points of the answer, convert them to
pixels of the original image and draw them.
"""
from __future__ import annotations

import json
import pathlib
import sys

from molmoe.errors import UsageError

DEMO_OUT = "molmoe-demo.png"


def add_app_commands(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt about an image")
    p.add_argument("--model", required=True, help="hub id or checkpoint directory")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    _add_generation_args(p, max_new_tokens=200)
    p.add_argument("--dtype", default="float32",
                   help="float32 (default), amp_bf16 (Ai2's eval setting), bfloat16, float16")
    p.add_argument("--backend", default="reference", choices=["reference", "triton"])
    p.add_argument("--decode-mode", default=None, choices=["eager", "compile", "graph"],
                   help="how the decode step runs: eager, torch.compile, or CUDA graphs "
                        "(default: graph on CUDA where it can be captured, else eager)")
    p.add_argument("--compat", default="molmoe", choices=["molmoe", "released"],
                   help="released: the released processor and crop rule bit for bit (no EXIF, "
                        "special strings in the prompt become special tokens), for reproducing "
                        "published numbers; molmoe (default): the corrected behaviour")
    add_check_finite_arg(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--points-out", metavar="IMAGE",
                   help="write the image with the points drawn, in the format its extension names "
                        "(.png, .jpg, ...); never the input image")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels (default: the decompression-bomb limit "
                        "of ~179 Mpx; 0 = no limit, for trusted files only)")
    p.add_argument("--json", action="store_true",
                   help="print answer, points, count and timings as JSON (no streaming)")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode a JPEG at 1/2, 1/4 or 1/8 scale (PIL draft mode) when the model "
                        "resizes it to at most half its size: much faster on phone photos, NOT "
                        "bit-exact (the README gives the measured error); --points-out then "
                        "draws on the reduced picture, point pixels stay the full picture's")
    p.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="run the whole path on the built-in tiny checkpoint "
                                    "(RANDOM weights: the answer is noise)")
    d.add_argument("--out", default=DEMO_OUT, help=f"annotated image (default ./{DEMO_OUT})")
    d.add_argument("--cache-dir", help="where the demo checkpoint is built (default "
                                       "$MOLMOE_CACHE or ~/.cache/molmoe)")
    _add_generation_args(d, max_new_tokens=48)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_demo)


def add_check_finite_arg(p) -> None:
    p.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                   help="skip the NaN/Inf check of the weights (trusted checkpoints only)")


def _add_generation_args(p, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)


# ----------------------------------------------------------------------------- the shared path


def _load(model_id, *, dtype="float32", backend="reference", device=None, check_finite=True,
          compat="molmoe"):
    """`molmoe.load_pipeline` (processor, model, EOS id) with a progress bar on stderr (loading
    is the slow part)."""
    from tqdm import tqdm

    from molmoe.pipeline import LOAD_STEPS, load_pipeline

    with tqdm(total=len(LOAD_STEPS), desc="loading", unit="step", file=sys.stderr,
              leave=False) as bar:
        def progress(done, _total, step):
            bar.update(done - bar.n)
            bar.set_postfix_str(step)

        return load_pipeline(model_id, dtype=dtype, backend=backend, device=device,
                             check_finite=check_finite, compat=compat, progress=progress)


def _max_pixels(args):
    """--max-pixels: None (flag absent) -> the default limit, 0 -> no limit."""
    from molmoe.processing import DEFAULT_MAX_PIXELS

    value = getattr(args, "max_pixels", None)
    if value is None:
        return DEFAULT_MAX_PIXELS
    if value < 0:
        raise UsageError(f"--max-pixels must be >= 0 (0 = no limit), got {value}")
    return value or None


def _visible(text: str) -> str:
    """Control and other invisible characters escaped (random weights emit bytes such as BEL; a
    model's answer may hold terminal escape sequences such as ESC [2J)."""
    return "".join(c if c.isprintable() or c in "\n\t" else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)


def _check_prompt(prompt: str) -> str:
    """The prompt as valid Unicode text: argv bytes that are not UTF-8 reach Python as lone
    surrogates (U+DC80..U+DCFF, the byte + 0xDC00), which no tokenizer can encode."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = prompt[e.start]
        offset = len(prompt[: e.start].encode("utf-8"))
        what = (f"the byte 0x{ord(ch) - 0xDC00:02x}, not UTF-8" if 0xDC80 <= ord(ch) <= 0xDCFF
                else f"a lone surrogate U+{ord(ch):04X}")
        raise UsageError(f"--prompt: {what}, at byte offset {offset}; pass UTF-8 text") from None
    return prompt


def _generation_config(args):
    """GenerationConfig from the flags (it validates them: one line per bad value)."""
    from molmoe.generation import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed)


def _run(proc, model, eos, *, prompt, image, config, max_pixels, stream: bool,
         escape: bool = False, decode_mode: str | None = None):
    """-> (GenerationResult, PointingAnswer, original PIL image or None)."""
    from PIL import Image

    from molmoe.generation import Engine, prompt_allowance
    from molmoe.points import parse_points
    from molmoe.processing import LoadedImage, PromptTooLongError, load_image

    pil = None
    loaded = None
    if image is not None:
        # As the processor sees it (EXIF applied, unless compat="released"): points refer to
        # this picture (a LoadedImage: the full picture's size, maybe fewer pixels)
        loaded = image if isinstance(image, LoadedImage) else load_image(
            image, max_pixels=max_pixels, compat=proc.compat)
        pil = Image.fromarray(loaded.pixels)
    limit = prompt_allowance(model.config.text.max_position_embeddings, config.max_new_tokens)
    try:
        proc.max_pixels = max_pixels
        inputs = proc(prompt, images=loaded, max_length=limit)
    except PromptTooLongError as e:  # say where the allowance comes from
        raise PromptTooLongError(e.needed, e.image_tokens, e.allowed, note=(
            f"{model.config.text.max_position_embeddings} positions minus "
            f"{config.max_new_tokens} kept for the answer (--max-new-tokens)")) from None
    inputs = {k: v for k, v in inputs.items() if k != "original_size"}
    on_text = None
    if stream:
        def on_text(_i, delta):
            sys.stdout.write(_visible(delta) if escape else delta)
            sys.stdout.flush()
    engine = Engine(model, proc.tokenizer, eos_token_id=eos, mode=decode_mode)
    result = engine.generate(inputs, config, on_text=on_text)
    if stream:
        sys.stdout.write("\n")
    return result, parse_points(result.text), pil


def _points_json(answer, size):
    out = []
    for g in answer.groups:
        pixels = g.pixels(size) if size else [(None, None)] * len(g.points)
        for (x, y), (px, py) in zip(g.points, pixels):
            out.append({"label": g.label, "alt": g.alt, "text": g.text, "x_pct": x, "y_pct": y,
                        "x_px": px, "y_px": py})
    return out


def _report(result, answer, size, *, as_json: bool, extra: dict | None = None,
            err=None) -> None:
    """Print the JSON document, or (after a streamed answer) points and timings to `err`.
    Labels come from the model's answer: printed with repr(), their control characters show as
    escapes on any stream."""
    t = result.timings
    if as_json:
        doc = {"answer": result.text, "finish_reason": result.finish_reason,
               "points": _points_json(answer, size), "count": answer.count,
               "image_size": list(size) if size else None, "timings": t.as_dict()}
        doc.update(extra or {})
        print(json.dumps(doc, indent=2))
        return
    err = err or sys.stderr
    if answer.points:
        for g in answer.groups:
            pix = g.pixels(size) if size else [None] * len(g.points)
            for (x, y), p in zip(g.points, pix):
                at = f" -> pixel ({p[0]:.1f}, {p[1]:.1f})" if p else ""
                print(f"point {g.label!r}: ({x:.1f}%, {y:.1f}%){at}", file=err)
    else:
        print("the answer contains no point", file=err)
    if answer.count is not None:
        print(f"stated count: {answer.count}", file=err)
    print(f"finish: {result.finish_reason}; {t.new_tokens} tokens; prefill {t.prefill_s:.3f} s, "
          f"decode {t.decode_s:.3f} s ({t.tokens_per_s:.1f} tokens/s)", file=err)


# ----------------------------------------------------------------------------- commands


def _generate(args) -> int:
    from molmoe.backends import select_backend
    from molmoe.points import check_image_output, draw_points, save_image
    from molmoe.processing import load_image

    # Every argument is checked before the (slow) model load, so a mistake costs no waiting.
    prompt = _check_prompt(args.prompt)
    config = _generation_config(args)
    max_pixels = _max_pixels(args)
    _backend, device = select_backend(args.backend, args.device)
    if args.points_out is not None and not args.image:
        raise UsageError("--points-out needs --image")
    if args.decode_mode == "graph" and device.type != "cuda":
        raise UsageError(f"--decode-mode graph captures CUDA graphs: it needs a CUDA device, "
                         f"not {str(device)!r}")
    image = None
    if args.image:  # a missing or broken image fails before the (slow) model load, decoded once
        fast = None
        if args.fast_decode:  # the decode target needs the checkpoint's crop geometry
            from molmoe.checkpoint.files import resolve
            from molmoe.processing.processor import decode_target, image_settings

            settings = image_settings(resolve(args.model))
            fast = lambda size: decode_target(settings, size)  # noqa: E731
        image = load_image(args.image, max_pixels=max_pixels, compat=args.compat,
                           fast_decode=fast)
    out_format = None
    if args.points_out is not None:
        out_format = check_image_output(args.points_out, inputs=[args.image], size=image.size,
                                        name="--points-out")
    proc, model, eos = _load(args.model, dtype=args.dtype, backend=args.backend,
                             device=str(device), check_finite=args.check_finite,
                             compat=args.compat)
    tty = sys.stdout.isatty()  # a terminal gets escapes shown, a pipe the exact answer
    result, answer, pil = _run(proc, model, eos, prompt=prompt, image=image, config=config,
                               max_pixels=max_pixels, stream=not args.json, escape=tty,
                               decode_mode=args.decode_mode)
    size = image.size if image is not None else None
    extra = {}
    if out_format is not None:
        save_image(draw_points(pil, answer.groups), args.points_out, out_format,
                   name="--points-out")
        extra["points_image"] = str(args.points_out)
        if not args.json:
            what = "drawn" if answer.points else "none in the answer, image copied unmarked"
            print(f"wrote {args.points_out} (points: {what})", file=sys.stderr)
    _report(result, answer, size, as_json=args.json, extra=extra)
    return 0


def _red_pixels_example(pil) -> str:
    """An example pointing answer computed from the demo image's red pixels (not model output),
    written by the official-style formatter, to show parsing and drawing on a real location."""
    import numpy as np

    from molmoe.points import format_points

    a = np.asarray(pil.convert("RGB")).astype(np.int32)
    red = (a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)
    ys, xs = np.nonzero(red)
    W, H = pil.size
    return format_points([(100.0 * xs.mean() / W, 100.0 * ys.mean() / H)], "red circle",
                         alt="EXAMPLE, not model output: red circle")


def _demo(args) -> int:
    import torch

    # The demo model is tiny (d_model 64): its matmuls are far too small to split across
    # threads, and on a busy machine idle OpenMP workers spinning for cores made decoding ~40x
    # slower (9 s instead of 0.2 s for 48 tokens on a loaded 2-core box). One thread, restored
    # afterwards because the setting is process-wide.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo_single_thread(args)
    finally:
        torch.set_num_threads(threads)


def _demo_single_thread(args) -> int:
    from molmoe.demo import DEMO_IMAGE, DEMO_PROMPT, demo_checkpoint
    from molmoe.points import check_image_output, draw_points, parse_points, save_image

    say = sys.stderr if args.json else sys.stdout
    print("molmoe demo: tiny MolmoE with RANDOM weights. The whole path runs for real (preprocess, "
          "ViT, pooling, decoder, generation, pointing, drawing), but the answer is NOISE.",
          file=say)
    config = _generation_config(args)
    out_format = check_image_output(args.out, inputs=[DEMO_IMAGE], name="--out")
    checkpoint = demo_checkpoint(args.cache_dir)
    proc, model, eos = _load(checkpoint, device="cpu")
    print(f"image: {DEMO_IMAGE}\nprompt: {DEMO_PROMPT}\nanswer (random weights, control "
          f"characters escaped):", file=say)
    say.flush()
    result, answer, pil = _run(proc, model, eos, prompt=DEMO_PROMPT, image=DEMO_IMAGE,
                               config=config, max_pixels=_max_pixels(args), stream=not args.json,
                               escape=True)
    example = _red_pixels_example(pil)
    groups = list(answer.groups)
    ex_groups = list(parse_points(example).groups)
    print("Drawn: the answer's points (if any) and an EXAMPLE answer computed from the image's "
          f"red pixels, NOT model output:\n  {example}", file=say)
    out = pathlib.Path(args.out)
    save_image(draw_points(pil, groups + ex_groups), out, out_format, name="--out")
    _report(result, answer, pil.size, as_json=args.json, extra={
        "weights": "random", "example_answer": example, "annotated_image": str(out.resolve())},
        err=say)
    print(f"annotated image: {out.resolve()}", file=say)
    return 0
