"""The single switch between the readable reference and the Triton fast path.

Model modules never import kernels. Each asks `ops_for(backend)` for the few hot operations
(attention, MoE feed-forward, patch pooling) and calls them; the state-dict layout is the same for
both backends. The reference implementations (`molmoe.ops`) follow the official numerics (spec
§3, §7); the Triton ones live in `molmoe.kernels` and are imported only when asked for. This module only chooses: the op
contracts and the reference implementations live in `molmoe.ops`.
"""
from __future__ import annotations

import enum
import functools
import importlib.util

import torch

from molmoe.errors import UsageError
from molmoe.ops import REFERENCE_OPS, Ops


class Backend(str, enum.Enum):
    REFERENCE = "reference"
    TRITON = "triton"

    @classmethod
    def parse(cls, value: "str | Backend") -> "Backend":
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(b.value) for b in cls)
            raise UsageError(f"unknown backend {value!r}; supported: {names}") from None


def resolve_device(device: "str | torch.device | None" = None, *,
                   allow_meta: bool = False) -> torch.device:
    """The device to run on, checked against this machine: None -> CUDA when available, else the
    CPU. Only the CPU and existing CUDA devices run (the ops are written for them); "meta" only
    with `allow_meta` (`molmoe.load(device="meta")`: shapes without data, nothing runs)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu" or (allow_meta and dev.type == "meta"):
        return dev
    if dev.type != "cuda":
        raise UsageError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU found"
        raise UsageError(f"device {device!r}: CUDA is not available ({why}); use device 'cpu'")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise UsageError(f"device {device!r}: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return dev


def select_backend(backend: "str | Backend", device: "str | torch.device | None", *,
                   allow_meta: bool = False) -> tuple[Backend, torch.device]:
    """(backend, device) after checking that the backend can run there: Triton kernels launch on
    CUDA devices, or anywhere under its CPU interpreter (TRITON_INTERPRET=1, slow, for tests)."""
    from molmoe.kernels._common import interpreter_enabled  # plain Python, no Triton import

    backend, dev = Backend.parse(backend), resolve_device(device, allow_meta=allow_meta)
    if backend is Backend.TRITON:
        if importlib.util.find_spec("triton") is None:
            raise UsageError("backend 'triton' needs the triton package (pip install triton); "
                             "or use backend 'reference'")
        if dev.type != "cuda" and not interpreter_enabled():
            raise UsageError(f"backend 'triton' needs a CUDA device, not {str(dev)!r}; use backend "
                             f"'reference', or set TRITON_INTERPRET=1 for Triton's (slow) CPU "
                             f"interpreter")
    return backend, dev


@functools.lru_cache(maxsize=None)
def _triton_ops() -> Ops:
    from molmoe.kernels.attention import attention
    from molmoe.kernels.decode_attention import decode_attention
    from molmoe.kernels.moe import moe_ffn
    from molmoe.kernels.patch_pool import patch_pool
    from molmoe.kernels.rope import apply_rope

    return Ops(attention=attention, moe_ffn=moe_ffn, patch_pool=patch_pool, apply_rope=apply_rope,
               decode_attention=decode_attention)


def ops_for(backend: "str | Backend") -> Ops:
    backend = Backend.parse(backend)
    return REFERENCE_OPS if backend is Backend.REFERENCE else _triton_ops()
