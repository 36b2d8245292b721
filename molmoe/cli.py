"""The `molmoe` command line: convert, generate, demo, train, profile, serve, synth."""
from __future__ import annotations

import argparse
import os
import sys


def _convert(args) -> int:
    import math

    from molmoe.checkpoint.convert import convert
    from molmoe.errors import UsageError

    gb = args.shard_gb
    shard_bytes = int(gb * (1 << 30)) if math.isfinite(gb) else 0  # int(inf) would raise
    if shard_bytes < 1:
        raise UsageError(f"--shard-gb {gb}: expected a positive, finite size in GiB "
                         "(at least one byte)")
    out = convert(args.src, args.dst, dtype=args.dtype, shard_bytes=shard_bytes,
                  overwrite=args.overwrite, progress=True, check_finite=args.check_finite)
    print(f"wrote {out}")
    return 0


def _profile_decode(args) -> int:
    import shlex

    from molmoe.profiling import ProfileOptions, format_report, profile_decode

    opts = ProfileOptions(
        model=args.model, layers=args.layers, d_model=args.d_model,
        expert_hidden=args.expert_hidden, image=None if args.image == "none" else args.image,
        prompt=args.prompt, batch=args.batch, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, backend=args.backend, compare=args.compare, dtype=args.dtype,
        device=args.device, mode=args.mode, out=args.out, repeats=args.repeats, seed=args.seed,
        top_ops=args.top_ops, profile_steps=args.profile_steps,
        command=shlex.join(["molmoe"] + sys.argv[1:]))
    print(format_report(profile_decode(opts)))
    return 0


def _train(args) -> int:
    from molmoe.training.trainer import TrainOptions, train

    freeze = tuple(f for f in (args.freeze or "").split(",") if f)
    opts = TrainOptions(
        model=args.model, data=args.data, out=args.out, steps=args.steps, batch=args.batch,
        micro_batch=args.micro_batch, lr=args.lr, vision_lr=args.vision_lr,
        connector_lr=args.connector_lr, min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        precision=args.precision, backend=args.backend, freeze=freeze,
        activation_checkpointing=args.activation_checkpointing, seed=args.seed,
        save_every=args.save_every, keep=args.keep, workers=args.workers,
        skip_bad=args.skip_bad, max_length=args.max_length, lb_coef=args.lb_coef,
        z_coef=args.z_coef, device=args.device, resume=args.resume, stop_at=args.stop_at,
        export=args.export,
        plot=args.plot, progress=not args.quiet)
    result = train(opts)
    if result.out is not None and (not args.quiet) and _is_rank0():
        last = result.last
        if last:
            print(f"step {last['step']}: loss {last['loss']:.4f} (ce {last['ce']:.4f}, "
                  f"lb {last['lb']:.4f}, z {last['z']:.4f})")
        print(f"log: {result.out / 'log.jsonl'}")
        if result.export is not None:
            print(f"model: {result.export} (molmoe generate --model {result.export} ...)")
        if result.plot is not None:
            print(f"plot: {result.plot}")
    return 0


def _synth(args) -> int:
    from molmoe.synthetic import write_dataset

    formats = tuple(f for f in args.formats.split(",") if f)
    path = write_dataset(args.out, args.n, args.seed, sizes=(args.min_size, args.max_size),
                         formats=formats)
    print(f"wrote {args.n} examples: {path} (geometry and targets: {path.parent / 'scenes.jsonl'})")
    return 0


def _add_synth_command(sub) -> None:
    from molmoe.synthetic import SIDE_RANGE

    s = sub.add_parser("synth", help="synthetic pointing/counting data for `molmoe train` "
                                     "(docs/synthetic.md)")
    s.add_argument("--out", required=True, help="new (or empty) output directory")
    s.add_argument("--n", type=int, required=True, help="number of examples (one per image)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same files")
    s.add_argument("--min-size", type=int, default=SIDE_RANGE[0], help="shortest image side, px")
    s.add_argument("--max-size", type=int, default=SIDE_RANGE[1],
                   help="longest image side, px (448 is plenty for training a small-crop model)")
    s.add_argument("--formats", default="png,jpeg", help="comma-separated: png, jpeg")
    s.set_defaults(func=_synth)


def _serve(args) -> int:
    from molmoe.serve import ServeOptions
    from molmoe.serve.server import load_and_create, serve

    options = ServeOptions(
        max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_len,
        max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels or None, allow_local_files=args.allow_local_files,
        allow_remote_images=args.allow_remote_images, api_key=args.api_key,
        shutdown_grace_s=args.shutdown_grace, decode_mode=args.decode_mode,
        max_connections=args.max_connections, header_timeout_s=args.header_timeout,
        fast_decode=args.fast_decode)
    app = load_and_create(args.model, options, host=args.host, port=args.port, dtype=args.dtype,
                          device=args.device, backend=args.backend)
    print(f"molmoe serve: {args.model} on http://{args.host}:{args.port} "
          f"(OpenAI API at /v1; Ctrl-C stops)", file=sys.stderr)
    serve(app, host=args.host, port=args.port)
    return 0


def _add_serve_command(sub) -> None:
    from molmoe.serve import ServeOptions

    d = ServeOptions()
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (docs/serve.md)")
    s.add_argument("--model", required=True, help="hub id or checkpoint directory")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but "
                                     "/health and the page / (or set MOLMOE_API_KEY)",
                   default=os.environ.get("MOLMOE_API_KEY"))
    s.add_argument("--max-batch", type=int, default=d.max_batch, help="decode rows")
    s.add_argument("--fast-decode", action="store_true",
                   help="decode large JPEGs at 1/2, 1/4 or 1/8 scale (PIL draft mode) when the "
                        "model needs at most half their size: faster, NOT bit-exact")
    s.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests admitted at once (waiting + running); beyond: 429")
    s.add_argument("--max-len", type=int, default=None,
                   help="KV cache slots per row, prompt + answer (default: the model's "
                        "positions, at most 4096)")
    s.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help="largest max_tokens a request may ask for")
    s.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections at once (503 beyond); memory for request bodies is "
                        "at most this x --max-body-bytes")
    s.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a connection has to send each request's headers")
    s.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="refuse larger images (0 = no limit)")
    s.add_argument("--allow-local-files", metavar="DIR",
                   help="accept image paths (file:// URLs) under DIR")
    s.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only, size and time limits)")
    s.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s,
                   help="seconds running requests get to finish on SIGINT/SIGTERM")
    s.add_argument("--dtype", default="float32",
                   help="float32 (default), amp_bf16, bfloat16, float16")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--backend", default="reference", choices=["reference", "triton"])
    s.add_argument("--decode-mode", default=None, choices=["eager", "compile", "graph"])
    s.set_defaults(func=_serve)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _add_train_command(sub) -> None:
    t = sub.add_parser("train", help="fine-tune on a JSONL file (FSDP2; run under torchrun for "
                                     "several processes)")
    t.add_argument("--model", required=True, help="hub id or checkpoint directory to start from")
    t.add_argument("--data", required=True, help="training data, JSONL (docs/training.md)")
    t.add_argument("--out", required=True, help="output directory: log.jsonl, checkpoints/, "
                                                "model/ (the export), training.png; a directory "
                                                "holding checkpoints of the same run resumes")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps in all")
    t.add_argument("--batch", type=int, default=8, help="global batch (examples per step)")
    t.add_argument("--micro-batch", type=int, help="examples per forward on one rank (default: "
                                                   "batch / ranks; smaller accumulates)")
    t.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    t.add_argument("--vision-lr", type=float, help="the ViT's peak rate (default: --lr)")
    t.add_argument("--connector-lr", type=float,
                   help="the connector's (pooling, projector) peak rate (default: --lr)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine schedule ends at lr x this")
    t.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip "
                                                                "(0: none)")
    t.add_argument("--precision", choices=["fp32", "bf16"],
                   help="bf16: bf16 compute with fp32 master weights (default on CUDA); fp32 "
                        "(default on the CPU)")
    t.add_argument("--backend", default="reference", choices=["reference", "triton"])
    t.add_argument("--freeze", help="comma-separated parts to keep fixed: vit, connector")
    t.add_argument("--no-activation-checkpointing", dest="activation_checkpointing",
                   action="store_false", help="keep every block's activations (more memory, "
                                              "less compute)")
    t.add_argument("--seed", type=int, default=0, help="data order")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and "
                                                               "at the end)")
    t.add_argument("--keep", type=int, default=2, help="complete checkpoints kept")
    t.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    t.add_argument("--skip-bad", action="store_true",
                   help="skip bad records (counted and reported) instead of stopping at the "
                        "first")
    t.add_argument("--max-length", type=int, help="refuse (or skip) longer examples (default: "
                                                  "the model's positions)")
    t.add_argument("--lb-coef", type=float, default=0.01, help="router load-balancing loss "
                                                               "weight")
    t.add_argument("--z-coef", type=float, default=0.001, help="router z-loss weight")
    t.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    t.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if --out holds checkpoints")
    t.add_argument("--stop-at", type=int, metavar="STEP",
                   help="end this invocation after STEP (checkpointed); run again to go on "
                        "(e.g. within a scheduler's time limit)")
    t.add_argument("--no-export", dest="export", action="store_false")
    t.add_argument("--no-plot", dest="plot", action="store_false")
    t.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    t.set_defaults(func=_train)


def _profile_train(args) -> int:
    import shlex

    from molmoe.profiling_train import TrainProfileOptions, format_train_report, profile_train

    opts = TrainProfileOptions(
        model=args.model, layers=args.layers, d_model=args.d_model,
        expert_hidden=args.expert_hidden, batch=args.batch, seq_len=args.seq_len,
        backend=args.backend, dtype=args.dtype, device=args.device, steps=args.steps,
        warmup=args.warmup, seed=args.seed, lr=args.lr, out=args.out, top_ops=args.top_ops,
        profile_steps=args.profile_steps, with_image=args.with_image,
        moe_layer=not args.no_moe_layer, plot=args.plot,
        command=shlex.join(["molmoe"] + sys.argv[1:]))
    print(format_train_report(profile_train(opts)))
    return 0


def _add_profile_commands(sub) -> None:
    from molmoe.profiling import BACKENDS, MODES

    p = sub.add_parser("profile", help="measure where the time goes (against transformers)")
    psub = p.add_subparsers(dest="what", required=True)
    d = psub.add_parser("decode", help="time to first token, per-token decode latency, op "
                                       "counts, top ops; side by side with transformers")
    d.add_argument("--model", required=True,
                   help="checkpoint directory / hub id, or a preset name (molmoe-1b, "
                        "molmo-7b-d, ..., tiny-molmoe) with RANDOM weights")
    d.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    d.add_argument("--d-model", type=int, help="preset only: another model width (same heads; "
                                               "for op counts at a model's depth on a small "
                                               "machine)")
    d.add_argument("--expert-hidden", type=int, help="preset only: another expert/FFN width")
    d.add_argument("--image", default="demo",
                   help="image file; 'demo' (default): the built-in demo image; 'none': text only")
    d.add_argument("--prompt", default="Describe this image.")
    d.add_argument("--batch", type=int, default=1, help="decode batch size")
    d.add_argument("--prompt-tokens", type=int, metavar="N",
                   help="pad the prompt with filler text to N tokens")
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--backend", default="reference", choices=BACKENDS)
    d.add_argument("--compare", choices=["transformers"],
                   help="also run the text decoder in transformers with the same weights")
    d.add_argument("--dtype", default="float32",
                   help="float32 (default), amp_bf16, bfloat16, float16")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    d.add_argument("--mode", default="eager", choices=MODES, help="how our decode step runs")
    d.add_argument("--out", help="directory for profile.json, profile.png and chrome traces")
    d.add_argument("--repeats", type=int, default=3,
                   help="timed repetitions (prefill runs; decode passes over --new-tokens)")
    d.add_argument("--seed", type=int, default=0, help="random weights' seed (presets)")
    d.add_argument("--top-ops", type=int, default=15, help="rows of each top-ops table")
    d.add_argument("--profile-steps", type=int, default=4,
                   help="decode steps under torch.profiler")
    d.set_defaults(func=_profile_decode)

    tr = psub.add_parser("train", help="one training step (loss forward, backward, AdamW): step "
                                       "time, tokens/s, MFU (GPU), peak memory, top ops; "
                                       "reference and Triton side by side")
    tr.add_argument("--model", required=True,
                    help="checkpoint directory / hub id, or a preset name (molmoe-1b, ..., "
                         "tiny-molmoe) with RANDOM weights")
    tr.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    tr.add_argument("--d-model", type=int, help="preset only: another model width")
    tr.add_argument("--expert-hidden", type=int, help="preset only: another expert/FFN width")
    tr.add_argument("--batch", type=int, default=1, help="rows per step")
    tr.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    tr.add_argument("--backend", default="reference",
                    help="reference (default), triton (GPU) or both (same weights and batch)")
    tr.add_argument("--dtype", default="float32", help="float32 (default), amp_bf16, bfloat16")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    tr.add_argument("--steps", type=int, default=5, help="timed steps per backend")
    tr.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    tr.add_argument("--seed", type=int, default=0, help="random weights' and tokens' seed")
    tr.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    tr.add_argument("--out", help="directory for profile_train.json and chrome traces")
    tr.add_argument("--top-ops", type=int, default=15, help="rows of each top-ops table")
    tr.add_argument("--profile-steps", type=int, default=1, help="steps under torch.profiler")
    tr.add_argument("--with-image", action="store_true",
                    help="the demo image through the processor (ViT and connector backward "
                         "included); default: text-only decoder batches of random tokens")
    tr.add_argument("--no-moe-layer", action="store_true",
                    help="skip timing one MoE layer alone (and megablocks' dMoE)")
    tr.add_argument("--plot", action="store_true", help="also write profile_train.png")
    tr.set_defaults(func=_profile_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="write a checkpoint as sharded safetensors (atomic)")
    p.add_argument("src", help="hub id or checkpoint directory (any supported layout)")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shard-gb", type=float, default=4.0, help="maximum shard size in GiB")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is empty or an unchanged molmoe convert output")
    from molmoe.app import add_app_commands, add_check_finite_arg  # an import error must show

    add_check_finite_arg(p)
    p.set_defaults(func=_convert)

    add_app_commands(sub)
    _add_train_command(sub)
    _add_profile_commands(sub)
    _add_serve_command(sub)
    _add_synth_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from molmoe.errors import MolmoeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MolmoeError as e:  # the user's input; anything else is a bug and keeps its traceback
        print(f"molmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what a command was writing is already cleaned up
        print(f"molmoe {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except BrokenPipeError:  # the reader went away (`molmoe generate ... | head`): stop quietly
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
