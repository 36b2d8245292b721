"""What several kernels/<op>.py launchers share, written once: where a launch runs, the one tile
policy every kernel uses (`TilePolicy`), the parsing of a tile config pinned by an environment
variable, and the q/k/v checks of the two attention ops (kernels/attention.py,
kernels/decode_attention.py). Plain Python and torch; Triton only inside `TilePolicy.autotune`.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (H100/H200: 227 KiB)


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


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype` (4 for fp32, 2 for fp16/bf16): what shared memory and
    register budgets scale with."""
    return torch.empty((), dtype=dtype).element_size()


def parse_tile_config(env: str, spec: str, example: str, required=(), *,
                      entry: str | None = None, keys=None) -> dict[str, int]:
    """Parse a pinned tile config "NAME=int,NAME=int" read from the environment variable `env`
    (`entry`: the one part of a larger `spec` to parse, as MOLMOE_MOE_CONFIG's "kind:" entries).

    Raises ValueError naming `env`, the bad `spec` and an `example` when an item is not
    NAME=int, listing the `required` names that are missing, or, given the valid `keys`, naming
    the unknown names and the valid ones (a typo such as BLOK_N is an error, not ignored).
    BLOCK_* values must be positive powers of two (tl.arange's rule). Whitespace around names
    and values is ignored; callers that accept spaces anywhere remove them before calling.
    """
    text = spec if entry is None else entry
    try:
        cfg = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise ValueError(f"{env}={spec!r}: expected '{example}'") from None
    missing = set(required) - set(cfg)
    if missing:
        raise ValueError(f"{env}={spec!r}: missing {sorted(missing)}")
    if keys is not None:
        unknown = sorted(set(cfg) - set(keys))
        if unknown:
            raise ValueError(f"{env}={spec!r}: unknown name(s) {unknown}; valid names: "
                             f"{sorted(keys)}")
    for name, value in cfg.items():
        if name.startswith("BLOCK_") and (value < 1 or value & (value - 1)):
            raise ValueError(f"{env}={spec!r}: {name}={value} must be a power of two")
    return cfg


def tma_ok(*tensors, strides: int | None = None) -> bool:
    """Tensor descriptors (Hopper's TMA) need 16-byte aligned bases and every stride but the
    last a multiple of 16 bytes (the last stride is 1); `strides`: how many leading strides
    to check (all but the last by default). Views that fail take the pointer loads."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and
               all(st * t.element_size() % 16 == 0
                   for st in t.stride()[:strides if strides is not None else t.dim() - 1])
               for t in tensors)


_ALLOCATOR_SET = False


def ensure_tma_allocator() -> None:
    """In-kernel tensor descriptors live in a small global scratch buffer Triton asks the
    framework for at launch: give it torch's caching allocator (graph-capture safe), once."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        import triton

        triton.set_allocator(lambda size, alignment, stream:
                             torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _closest(configs: list[dict], want: dict) -> dict:
    """The config of `configs` sharing the most values with `want` (the first on a tie)."""
    return max(configs, key=lambda c: sum(c.get(k) == v for k, v in want.items()))


class TilePolicy:
    """One kernel's launch policy, the same rules for every kernel of molmoe:

      * `candidates(ctx)`: the GPU tile configs (dicts of BLOCK_*, num_warps, num_stages, ...);
      * `fits(cfg, ctx)`: whether a config fits sm_90 for this context: shared memory within
        SMEM_LIMIT at the context's element size (fp32 tiles take twice bf16's), registers
        within a spill-free budget; `pruned(ctx)` keeps the candidates that fit;
      * `default(ctx)`: the untuned GPU choice; if it does not fit, the fitting candidate
        closest to it is used instead (so no default can overflow shared memory for its dtype);
        if no candidate fits either, the default stays and a RuntimeWarning says so, once;
      * `interpreter(ctx)`: one small fixed config for Triton's CPU interpreter (no pruning);
      * a pin: the environment variable `env` ("NAME=int,..."), or `pin(ctx)` where a kernel's
        variable has more structure (MOLMOE_MOE_CONFIG's "kind:" entries). Pinned names override
        the same names of the config otherwise used; an unknown name is an error naming `keys`;
      * `autotune(ctx, run)`: times every pruned candidate by calling `run` (GPU, at start-up,
        never on the launch path), skips candidates that fail to compile or launch (out of
        resources), and remembers the fastest for `config(ctx)`.

    `ctx` is a small dict of hashable values (dtype, head dim, kernel kind, ...): the things the
    best tile depends on, and the key under which a tuned config is kept. `config` only reads
    dictionaries, so a launch never tunes (CUDA-graph capture is safe after one warm-up call).
    """

    def __init__(self, op: str, env: str, keys, *, candidates: Callable[[dict], list[dict]],
                 fits: Callable[[dict, dict], bool], default: Callable[[dict], dict],
                 interpreter: Callable[[dict], dict], example: str,
                 pin: Callable[[dict], dict] | None = None):
        self.op, self.env, self.keys, self.example = op, env, tuple(keys), example
        self._candidates, self._fits, self._default = candidates, fits, default
        self._interpreter, self._pin = interpreter, pin
        self.tuned: dict[tuple, dict] = {}
        self._warned: set[tuple] = set()

    @staticmethod
    def key(ctx: dict) -> tuple:
        return tuple(sorted(ctx.items()))

    def pinned(self, ctx: dict | None = None) -> dict:
        """The pinned names (empty when nothing is pinned)."""
        if self._pin is not None:
            return self._pin(ctx or {})
        spec = os.environ.get(self.env, "").replace(" ", "")
        if not spec:
            return {}
        return parse_tile_config(self.env, spec, self.example, keys=self.keys)

    def candidates(self, ctx: dict) -> list[dict]:
        return [dict(c) for c in self._candidates(ctx)]

    def fits(self, cfg: dict, ctx: dict) -> bool:
        return bool(self._fits(cfg, ctx))

    def pruned(self, ctx: dict) -> list[dict]:
        return [c for c in self.candidates(ctx) if self._fits(c, ctx)]

    def config(self, ctx: dict, on_gpu: bool) -> dict:
        """Pinned names over (tuned, else the default pruned to what fits)."""
        if not on_gpu:
            cfg = dict(self._interpreter(ctx))
        elif self.key(ctx) in self.tuned:
            cfg = dict(self.tuned[self.key(ctx)])
        else:
            cfg = dict(self._default(ctx))
            if not self._fits(cfg, ctx):
                kept = self.pruned(ctx)
                if kept:
                    cfg = dict(_closest(kept, cfg))
                elif self.key(ctx) not in self._warned:  # keep the default, but say so once
                    self._warned.add(self.key(ctx))
                    warnings.warn(f"{self.op}: no tile config fits the sm_90 limits for {ctx}; "
                                  f"launching the default {cfg}, which may spill or fail to "
                                  f"launch (pin one with {self.env})", RuntimeWarning,
                                  stacklevel=2)
        cfg.update(self.pinned(ctx))
        return cfg

    def autotune(self, ctx: dict, run: Callable[[], object], bench=None) -> dict | None:
        """Time `run` under every pruned candidate (by `bench`, default
        triton.testing.do_bench); remember and return the fastest, or None (and forget any
        earlier choice) when no candidate ran. Failing candidates are skipped."""
        if bench is None:
            import triton.testing

            bench = triton.testing.do_bench
        key = self.key(ctx)
        best, best_ms = None, float("inf")
        for cfg in self.pruned(ctx):
            self.tuned[key] = cfg
            try:
                ms = bench(run)
            except Exception:  # out of resources, a compile error: not a candidate
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            self.tuned.pop(key, None)
        else:
            self.tuned[key] = best
        return best


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
