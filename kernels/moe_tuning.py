"""Launch policy of the MoE kernels: tile configs, their pruning, pinning and tuning, the row
tile and the decode/grouped choice. All from static shapes; nothing here runs on the launch path
except dictionary look-ups (CUDA-graph capture). See kernels/moe.py for the op.

Kinds (one config each): gate_up, down (forward, grouped), down_bwd (dh + silu backward), dx,
dw_gate_up, dw_down (backward), gate_up_decode, down_decode (decode path). A config is a dict of
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; the row-tiled grouped kinds share
BLOCK_M with the permutation (`block_m_for`), the dW kinds tile the weight (BLOCK_M x BLOCK_N)
and step over rows (BLOCK_K).
"""
from __future__ import annotations

import os

import torch

from molmoe.kernels._common import (SMEM_LIMIT, TilePolicy, element_size, on_interpreter,
                                    parse_tile_config)

_CONFIG_ENV = "MOLMOE_MOE_CONFIG"
_EXAMPLE = "BLOCK_M=64;gate_up:BLOCK_N=64,BLOCK_K=64,num_warps=4,num_stages=4"
DECODE_MAX_TOKENS = 8  # decode path up to this many tokens (its rows are tokens: <= BLOCK_M)

KINDS = ("gate_up", "down", "down_bwd", "dx", "dw_gate_up", "dw_down", "gate_up_decode",
         "down_decode")
# kernels that load two B tiles a step: two weights, or dw_down's gate and up
_TWO_B_TILES = {"gate_up", "dx", "gate_up_decode", "dw_down"}
_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_TMA_KINDS = {"gate_up", "down", "gate_up_decode", "down_decode"}


def kernel_configs(kind: str, on_gpu: bool, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Candidate tiles of one kernel kind for `dtype`. The interpreter gets one small one (fast
    tests). fp32 runs IEEE dots as FMAs with its operands in registers: narrower, shallower
    tiles."""
    if kind not in KINDS:
        raise ValueError(f"moe: unknown kernel kind {kind!r}; known: {KINDS}")
    if not on_gpu:  # 64-wide: the tests' odd widths take one or two tiles (few programs)
        return [dict(BLOCK_M=64 if kind.startswith("dw_") else 16, BLOCK_N=64,
                     BLOCK_K=16 if kind.startswith("dw_") else 64, GROUP_M=2, num_warps=1,
                     num_stages=1)]
    # Kept small on purpose: `autotune` compiles every candidate (~1-2 s each on the host).
    if kind.endswith("_decode"):  # bandwidth-bound: narrow column tiles -> many programs
        return [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, GROUP_M=1, num_warps=w, num_stages=4)
                for n in (16, 32, 64) for k in (128, 256) for w in (2, 4)]
    fp32 = dtype == torch.float32
    if kind.startswith("dw_"):  # BLOCK_M/BLOCK_N over the weight's two dims, BLOCK_K over rows
        return [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=1, num_warps=w, num_stages=s)
                for m in (64, 128) for n in (64, 128) for k in ((32, 64) if fp32 else (64,))
                for w in (4, 8) for s in (3, 4)]
    return [dict(BLOCK_M=0, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)
            for n in ((32, 64, 128) if fp32 else (64, 128, 256))
            for k in ((16, 32, 64) if fp32 else (64, 128)) for w in (4, 8) for s in (3, 4)]


def _smem_bytes(c: dict, kind: str, block_m: int, dtype: torch.dtype) -> int:
    """The pipelined operand tiles in shared memory: num_stages - 1 buffers (what Triton's
    sm_90 pipeliner allocates; the fp32 dx default of 128 x 128 x 64 in 3 stages compiled to
    2 x 131,072 = 262,144 B) of the A tiles (BLOCK_M x BLOCK_K, two for dx / dw_gate_up) and the
    B tiles (BLOCK_K x BLOCK_N, two for the kernels that load two of them a step), at the
    dtype's element size (fp32 twice bf16). tests/test_moe_sm90.py compiles the survivors."""
    bm = c["BLOCK_M"] or block_m
    n_b = 2 if kind in _TWO_B_TILES else 1
    n_a = 2 if kind in ("dx", "dw_gate_up") else 1
    # The forward GEMMs load their weights by TMA in 16-bit dtypes (kernels/moe.py `_use_tma`):
    # those pipelines keep num_stages buffers (gate_up 128 x 128 x 64 in 4 stages compiled to
    # 4 x 49,152 B), the cp.async ones num_stages - 1.
    # In 16-bit dtypes every kernel's pipeline keeps num_stages buffers too: the bf16 dx
    # candidates 128 x 64 x 128 in 3 stages and 128 x 128 x 64 in 4 compiled to 3 x 98,304 and
    # 4 x 65,536 B (over the limit while this counted num_stages - 1). fp32's FMA dots keep
    # num_stages - 1 (the 262,144 B above).
    buffers = c["num_stages"] if dtype != torch.float32 else max(c["num_stages"] - 1, 1)
    return buffers * element_size(dtype) * c["BLOCK_K"] * (n_a * bm + n_b * c["BLOCK_N"])


def fits(c: dict, kind: str, block_m: int, dtype: torch.dtype) -> bool:
    """A tile fits sm_90: operand stages within SMEM_LIMIT for the dtype, and the fp32
    accumulators within 128 registers a thread (wider ones spilled). fp32 runs IEEE dots as
    FMAs with the operand tiles in registers too, so there accumulators + one step's operands
    stay within 80 values a thread (compiled for sm_90: dx 128 x 64 x 64, 128 a thread,
    spilled 64 B; gate_up 128 x 64 x 32, 96, spilled 16 B; dw_down 128 x 128 x 64, 160,
    spilled 704 B)."""
    bm = c["BLOCK_M"] or block_m
    n_acc = 2 if kind in ("gate_up", "dw_gate_up", "gate_up_decode") else 1
    if kind == "down_bwd":  # its epilogue holds gate and up beside the accumulator
        n_acc = 3  # (fp32 128 x 128 on 8 warps, 192 a thread, spilled 440 B)
    threads = 32 * c["num_warps"]
    per_thread = n_acc * bm * c["BLOCK_N"] / threads
    # 128 a thread fits on 8 warps (gate_up's 128 x 256 wide dot: 254 registers) but not on
    # one warpgroup (bf16 dw_down 128 x 128 x 64 on 4 warps: 255 registers, spilled 40 B)
    ok = per_thread < 128 if c["num_warps"] <= 4 else per_thread <= 128
    if kind in ("gate_up", "gate_up_decode"):
        # one (2 BLOCK_N, BLOCK_K) tile of the interleaved gate|up weight: a TMA box holds at
        # most 256 rows, and wgmma's n is at most 256
        ok = ok and 2 * c["BLOCK_N"] <= 256
    if kind == "gate_up_decode":  # 16 x 64 x 128 on 2 warps kept an 8-byte stack on sm_90
        ok = ok and c["num_warps"] >= 4
    if dtype == torch.float32:
        n_b = 2 if kind in _TWO_B_TILES else 1
        n_a = 2 if kind in ("dx", "dw_gate_up") else 1
        operands = (n_a * bm + n_b * c["BLOCK_N"]) * c["BLOCK_K"]
        ok = ok and (n_acc * bm * c["BLOCK_N"] + operands) / threads <= 80
    return ok and _smem_bytes(c, kind, block_m, dtype) <= SMEM_LIMIT


def prune_configs(configs: list[dict], kind: str, block_m: int, dtype: torch.dtype) -> list[dict]:
    """The configs that `fits` for this kind, row tile and dtype (the first if none does)."""
    kept = [c for c in configs if fits(c, kind, block_m, dtype)]
    return kept or configs[:1]


def _pinned(kind: str) -> dict:
    """MOLMOE_MOE_CONFIG entries that apply to `kind` (bare entries apply to all kinds)."""
    spec = os.environ.get(_CONFIG_ENV, "").replace(" ", "")
    out: dict = {}
    for entry in filter(None, spec.split(";")):
        scope, _, body = entry.rpartition(":")
        if scope and scope not in KINDS:
            raise ValueError(f"{_CONFIG_ENV}: unknown kind {scope!r}; known: {KINDS}")
        if scope and scope != kind:
            continue
        out.update(parse_tile_config(_CONFIG_ENV, spec, _EXAMPLE, entry=body, keys=_KEYS))
    return out


def _gpu_default(kind: str, block_m: int) -> dict:
    """Defaults chosen for MolmoE-1B (D 2048, F 1024) on H100, for bf16; `POLICY` swaps in the
    closest fitting candidate where one does not fit (fp32: dx's 128 x 128 x 64 tiles in 3
    stages need 262,144 B, past SMEM_LIMIT)."""
    big = block_m >= 128
    cfg = {
        # 128-row tiles: one 128 x 256 dot over the interleaved gate|up tile (128 columns of
        # each: wgmma n = 256; weights by TMA)
        "gate_up": (dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3) if big
                    else dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)),
        "down": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if big else 4,
                     num_stages=4),
        "down_bwd": dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8 if big else 4,
                         num_stages=4),
        "dx": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8 if big else 4,
                   num_stages=3),
        "dw_gate_up": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=8,
                           num_stages=3),
        "dw_down": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=8,
                        num_stages=3),
        "gate_up_decode": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4,
                               num_stages=4),
        "down_decode": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4,
                            num_stages=4),
    }[kind]
    cfg.setdefault("BLOCK_M", 0)
    return cfg


# ctx: kind, dtype, D, F, block_m (the row tile of the row-tiled kinds; 0 on the decode path)
POLICY = TilePolicy(
    "moe", _CONFIG_ENV, _KEYS, example=_EXAMPLE,
    candidates=lambda ctx: kernel_configs(ctx["kind"], True, ctx["dtype"]),
    fits=lambda c, ctx: fits(c, ctx["kind"], ctx["block_m"] or 16, ctx["dtype"]),
    default=lambda ctx: _gpu_default(ctx["kind"], ctx["block_m"]),
    interpreter=lambda ctx: kernel_configs(ctx["kind"], False)[0],
    pin=lambda ctx: _pinned(ctx["kind"]))
_TUNED = POLICY.tuned  # (ctx items) -> config, filled by `autotune`


def _ctx(kind, dtype, D, F_, block_m) -> dict:
    return dict(kind=kind, dtype=dtype, D=D, F=F_, block_m=block_m)


def block_m_for(num_assignments: int, num_experts: int, on_gpu: bool) -> int:
    """Row tile of the grouped path from the expected rows per expert (static shapes only):
    small tiles waste less padding when experts get few rows, large ones reuse each weight tile
    over more rows. MOLMOE_MOE_CONFIG="BLOCK_M=..." pins it."""
    pinned = _pinned("gate_up").get("BLOCK_M")
    if pinned:
        return pinned
    if not on_gpu:
        return 16
    per_expert = num_assignments / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= 96 else 128


def default_config(kind: str, dtype: torch.dtype, D: int, F_: int, block_m: int,
                   on_gpu: bool) -> dict:
    """Pinned entries over tuned over the default for this dtype (`POLICY`)."""
    if kind not in KINDS:
        raise ValueError(f"moe: unknown kernel kind {kind!r}; known: {KINDS}")
    cfg = POLICY.config(_ctx(kind, dtype, D, F_, block_m), on_gpu)
    cfg.setdefault("BLOCK_M", 0)
    if not kind.startswith("dw_") and not kind.endswith("_decode"):
        cfg["BLOCK_M"] = block_m  # shared with the permutation
    return cfg


def choose_path(num_tokens: int, needs_grad: bool, path: str | None) -> str:
    """'decode' for a few tokens without gradients, else 'grouped'; `path` forces one."""
    if path not in (None, "decode", "grouped"):
        raise ValueError(f"moe_ffn: path must be None, 'decode' or 'grouped', got {path!r}")
    if path == "decode" and (needs_grad or num_tokens > DECODE_MAX_TOKENS):
        raise ValueError(f"moe_ffn: the decode path serves <= {DECODE_MAX_TOKENS} tokens without "
                         f"gradients (got {num_tokens} tokens, needs_grad={needs_grad})")
    if path is not None:
        return path
    return "decode" if num_tokens <= DECODE_MAX_TOKENS and not needs_grad else "grouped"


def autotune(x, router_w, w_gate, w_up, w_down, top_k, renormalize=False,
             kinds=KINDS) -> dict[str, dict]:
    """Time every pruned config of each kernel kind on these tensors (GPU only), one kind at a
    time with the others at their current choice; remember and return the fastest. Forward
    kinds are timed on the forward, backward kinds on forward + backward."""
    from molmoe.kernels.moe import moe_ffn  # the op this tunes (imports this module)

    T, D = x.shape
    E, F_, _ = w_gate.shape
    on_gpu = not on_interpreter(x.device)
    if not on_gpu:
        raise RuntimeError("moe autotune needs a GPU")
    block_m = block_m_for(T * top_k, E, on_gpu)
    params = [t.detach().requires_grad_() for t in (x, router_w, w_gate, w_up, w_down)]
    best_by_kind = {}
    for kind in kinds:
        decode = kind.endswith("_decode")
        if decode and T > DECODE_MAX_TOKENS:
            continue
        bwd = kind in ("down_bwd", "dx", "dw_gate_up", "dw_down")
        if bwd:
            y = moe_ffn(*params, top_k, renormalize)[0]
            dy = torch.randn_like(y)

            def run():
                out = moe_ffn(*params, top_k, renormalize)[0]
                torch.autograd.grad(out, params, dy)
        else:
            def run():
                with torch.no_grad():
                    moe_ffn(x, router_w, w_gate, w_up, w_down, top_k, renormalize,
                            path="decode" if decode else "grouped")
        best = POLICY.autotune(_ctx(kind, x.dtype, D, F_, 0 if decode else block_m), run)
        if best is not None:
            best_by_kind[kind] = best
    return best_by_kind
