"""The `molmoe` command line: convert, generate, demo."""
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
