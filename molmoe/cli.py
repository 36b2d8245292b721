"""The `molmoe` command line: convert, generate, demo, profile."""
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
    _add_profile_commands(sub)
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
