"""What several kernels/<op>.py launchers share, written once: where a launch runs, the parsing
of a tile config pinned by an environment variable, and the q/k/v checks of the two attention
ops (kernels/attention.py, kernels/decode_attention.py). Plain Python and torch, no Triton.
"""
from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton runs every kernel in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_interpreter(device: torch.device) -> bool:
    """True when launches on `device` take the interpreter's launch policy (one small fixed tile
    config, no tuning): tensors off CUDA, or TRITON_INTERPRET=1."""
    return device.type != "cuda" or interpreter_enabled()


def check_launch_device(op: str, device: torch.device) -> None:
    """Triton launches on CUDA tensors, or on any tensors in its interpreter; say so up front
    rather than let the launch fail on a CPU pointer."""
    if device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"{op}: Triton needs CUDA tensors (or TRITON_INTERPRET=1)")


def parse_tile_config(env: str, spec: str, example: str, required=(), *,
                      entry: str | None = None) -> dict[str, int]:
    """Parse a pinned tile config "NAME=int,NAME=int" read from the environment variable `env`
    (`entry`: the one part of a larger `spec` to parse, as MOLMOE_MOE_CONFIG's "kind:" entries).

    Raises ValueError naming `env`, the bad `spec` and an `example` when an item is not
    NAME=int, or listing the `required` names that are missing. Whitespace around names and
    values is ignored; callers that accept spaces anywhere remove them before calling.
    """
    text = spec if entry is None else entry
    try:
        cfg = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise ValueError(f"{env}={spec!r}: expected '{example}'") from None
    missing = set(required) - set(cfg)
    if missing:
        raise ValueError(f"{env}={spec!r}: missing {sorted(missing)}")
    return cfg


def pinned_autotune_config(env: str, example: str, **defaults) -> tuple[dict, int] | None:
    """For kernels tuned by `triton.autotune`: the (meta-parameters, num_warps) pinned by `env`
    (spaces anywhere ignored; num_warps 4 and the given `defaults` where not named), or None
    when `env` is unset."""
    spec = os.environ.get(env)
    if not spec:
        return None
    meta = parse_tile_config(env, spec, example, entry=spec.replace(" ", ""))
    warps = meta.pop("num_warps", 4)
    for name, value in defaults.items():
        meta.setdefault(name, value)
    return meta, warps


def check_qkv(op: str, q, k, v, k_name: str = "k", v_name: str = "v"):
    """Checks shared by the attention ops: q (B, Hq, Sq, Dh), k == v (B, Hkv, Sk, Dh) shapes,
    Hq % Hkv == 0, Dh a power of two in 16..256, fp32/fp16/bf16 with one dtype for all three,
    tensors Triton can launch on. Messages name `op` and the tensors (`k_name`, `v_name`).
    Returns (B, Hq, Sq, Dh, Hkv, Sk)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{op}: expected q (B, Hq, Sq, Dh) and {k_name} == {v_name} "
                         f"(B, Hkv, Sk, Dh); got q {tuple(q.shape)}, {k_name} {tuple(k.shape)}, "
                         f"{v_name} {tuple(v.shape)}")
    B, Hq, Sq, Dh = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B or Dk != Dh:
        raise ValueError(f"{op}: batch/head dim mismatch: q {tuple(q.shape)}, "
                         f"{k_name} {tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{op}: {Hq} query heads not a multiple of {Hkv} kv heads")
    if Dh < 16 or Dh > 256 or Dh & (Dh - 1):
        raise ValueError(f"{op}: head dim {Dh} unsupported (power of two, 16..256)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: dtype {q.dtype} unsupported (fp32, fp16, bf16)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: dtypes differ: q {q.dtype}, {k_name} {k.dtype}, "
                         f"{v_name} {v.dtype}")
    check_launch_device(op, q.device)
    return B, Hq, Sq, Dh, Hkv, Sk
