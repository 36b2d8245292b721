"""Fused rotate-half RoPE for q and k in one launch (spec §3.5 step 6, §7.3).

    y[..., :h] = x1 * cos[:h] - x2 * sin[:h]        x = [x1, x2], h = Dh / 2
    y[..., h:] = x2 * cos[h:] + x1 * sin[h:]

in fp32 (q, k upcast, rotated, cast back to their dtype), exactly the arithmetic of
`apply_rope_ref` (= `molmoe.ops.apply_rope_ref`, which builds rotate_half copies and
four fp32 temporaries per tensor). One program takes BLOCK_S positions of one sequence and a
group of HEADS heads from the list [q heads..., k heads...] (GQA: Hq != Hkv only moves the q/k
boundary), loads the cos/sin rows of its positions once and rotates its heads, so the tables are
read once per head group instead of once per head. Head groups exist so that a decode step
(B = S = 1) still runs on several programs; HEADS >= Hq + Hkv gives one group (tables read once).

cos/sin are read from the fp32 tables (B, S, Dh) that the model computes once per forward and
shares by all layers (`layers.rope_tables`), not recomputed in-kernel: the tables cost 8 bytes
per position and channel against 2x(Hq + Hkv) element reads of q/k, and reading them keeps the
angles bit-identical to the reference's fp32 `position * inv_freq` and torch's cos/sin, also at
large positions (4095, 32767).

Backward: the rotation is orthogonal, so dx is dy rotated by the inverse (transposed) rotation:
dx1 = dy1 * cos[:h] + dy2 * sin[h:], dx2 = dy2 * cos[h:] - dy1 * sin[:h]; same kernel, a flag.
cos/sin get no gradient (they are functions of integer positions).

Layouts: q (B, Hq, S, Dh), k (B, Hkv, S, Dh) with any strides and a unit last stride (the views
that the decoder's head split makes); outputs are contiguous (B, H, S, Dh). Limits: even Dh.

Legend: B batch, S positions, Hq query heads, Hkv key/value heads, Dh head dim, h = Dh / 2.

Tiles: (BLOCK_S, HEADS, num_warps) from `kernel_configs`, kept by `fits` (no tile longer
than S, no group wider than all heads, cos/sin tiles within a register budget), under the one
tile policy of kernels/_common.py (`POLICY`), keyed on (Dh, Hq, Hkv) and the power-of-two
bucket of S (decode and prefill want different tiles; S itself would re-tune per prompt
length). `MOLMOE_ROPE_CONFIG="BLOCK_S=16,HEADS=8,num_warps=4"` pins names; the interpreter (CPU)
uses one small fixed config. `autotune(q, k, cos, sin)` times the candidates once at start-up;
a launch only looks its config up (no tuning on the first call, CUDA-graph safe).

Fused into the attention prologue instead? Issue 5 asks for whichever measures faster; that
needs a GPU (bench/bench_rope.py reports RoPE time next to the causal attention it precedes).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

# this op's reference: the contract's own function (molmoe.ops), re-exported
from molmoe.ops import apply_rope_ref  # noqa: F401
from molmoe.kernels._common import TilePolicy, on_interpreter


_CONFIG_ENV = "MOLMOE_ROPE_CONFIG"  # e.g. "BLOCK_S=16,HEADS=8,num_warps=4"


# ------------------------------------------------------------------------------ tile policy


def kernel_configs(on_gpu: bool) -> list[dict]:
    """Candidate tiles (BLOCK_S positions, HEADS per program, num_warps)."""
    if not on_gpu:
        # 32 positions (the interpreter's cost is per program); HEADS=3 on purpose: head
        # groups then straddle the q/k boundary (Hq=4: q0-2 | q3 k0 k1)
        return [dict(BLOCK_S=32, HEADS=3, num_warps=1)]
    return [dict(BLOCK_S=bs, HEADS=hg, num_warps=w)
            for bs in (1, 2, 4, 8, 16, 32) for hg in (2, 4, 8, 16, 64) for w in (1, 2, 4, 8)]


_TABLE_REGS = 64  # fp32 cos/sin values one thread may hold (4 tiles of BLOCK_S x BLOCK_H)


def fits(c: dict, S: int, n_heads: int, half: int) -> bool:
    """No tile longer than the sequence (decode: S = 1), no head group wider than all heads, no
    more threads than elements in one head's tile (BLOCK_S x Dh/2), and the four cos/sin tiles
    a program keeps for all its heads within _TABLE_REGS registers per thread. Compiled for
    sm_90 at Dh 128 (tests/test_kernels_sm90.py): 64 per thread -> 118 registers; 128 -> 231;
    256 (BLOCK_S 32 on one warp) spilled 640 bytes of stack at the 255-register cap. (No
    shared memory: the kernel has no dot and no pipelined loads.)"""
    block_h = triton.next_power_of_2(half)
    return (c["BLOCK_S"] <= max(1, triton.next_power_of_2(S))
            and c["HEADS"] <= 2 * max(1, triton.next_power_of_2(n_heads))
            and 32 * c["num_warps"] <= max(32, c["BLOCK_S"] * half)
            and 4 * c["BLOCK_S"] * block_h <= _TABLE_REGS * 32 * c["num_warps"])


def _s_bucket(S: int) -> int:
    # The best tile differs between decode (S = 1) and prefill (S = 4096), but keying on S
    # itself would re-tune for every prompt length: key on its power-of-two bucket instead.
    return min(triton.next_power_of_2(max(S, 1)), 4096)


# ctx: Dh, Hq, Hkv, S_BUCKET (the shapes the best tile depends on). HEADS defaults to 8 heads a
# program; where the default does not fit (decode: one position, fewer warps) the closest
# fitting candidate replaces it.
POLICY = TilePolicy(
    "apply_rope", _CONFIG_ENV, ("BLOCK_S", "HEADS", "num_warps"),
    example="BLOCK_S=16,HEADS=8,num_warps=4",
    candidates=lambda ctx: kernel_configs(True),
    fits=lambda c, ctx: fits(c, ctx["S_BUCKET"], ctx["Hq"] + ctx["Hkv"], ctx["Dh"] // 2),
    default=lambda ctx: dict(BLOCK_S=16, HEADS=8, num_warps=4),
    interpreter=lambda ctx: kernel_configs(False)[0])


def _ctx(q, k) -> dict:
    return dict(Dh=q.shape[3], Hq=q.shape[1], Hkv=k.shape[1], S_BUCKET=_s_bucket(q.shape[2]))


def autotune(q, k, cos, sin) -> dict | None:
    """Time every config that fits on these tensors (GPU only; forward and backward share it),
    skipping any that fails; remember and return the fastest. Never on the launch path."""
    _check(q, k, cos, sin)
    return POLICY.autotune(_ctx(q, k), lambda: _launch(q, k, cos, sin, backward=False))


# ------------------------------------------------------------------------------ kernel


@triton.jit
def _rotate_heads(x_ptr, y_ptr, h_lo, h_hi, sx_b, sx_h, sx_s, sy_b, sy_h, sy_s, b, offs_s,
                  offs_d, mask, c1, c2, s1, s2, HALF: tl.constexpr, BACKWARD: tl.constexpr):
    for hd in range(h_lo, h_hi):
        xp = x_ptr + b * sx_b + hd * sx_h + offs_s[:, None] * sx_s + offs_d[None, :]
        yp = y_ptr + b * sy_b + hd * sy_h + offs_s[:, None] * sy_s + offs_d[None, :]
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transposed rotation
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(yp, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(yp + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, Hq, Hkv, Dh, S_BUCKET,
                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
                 sc_b, sc_s, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                 HEADS: tl.constexpr, BACKWARD: tl.constexpr):
    # grid (cdiv(S, BLOCK_S), B, head groups): a group is HEADS consecutive heads of the list
    # [q heads..., k heads...], so a decode step (B = S = 1) still spreads over several programs.
    b = tl.program_id(1).to(tl.int64)  # int64: b * stride overflows int32 past 2^31 elements
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_H)
    mask = (offs_s < S)[:, None] & (offs_d < HALF)[None, :]
    tp = b * sc_b + offs_s[:, None] * sc_s + offs_d[None, :]
    c1 = tl.load(cos_ptr + tp, mask=mask, other=0.0)
    c2 = tl.load(cos_ptr + tp + HALF, mask=mask, other=0.0)
    s1 = tl.load(sin_ptr + tp, mask=mask, other=0.0)
    s2 = tl.load(sin_ptr + tp + HALF, mask=mask, other=0.0)
    h_lo = tl.program_id(2) * HEADS
    h_hi = tl.minimum(h_lo + HEADS, Hq + Hkv)
    # q heads [h_lo, h_hi) & [0, Hq); k heads the rest, renumbered from 0
    _rotate_heads(q_ptr, qo_ptr, tl.minimum(h_lo, Hq), tl.minimum(h_hi, Hq), sq_b, sq_h, sq_s,
                  sqo_b, sqo_h, sqo_s, b, offs_s, offs_d, mask, c1, c2, s1, s2, HALF, BACKWARD)
    _rotate_heads(k_ptr, ko_ptr, tl.maximum(h_lo, Hq) - Hq, tl.maximum(h_hi, Hq) - Hq, sk_b, sk_h,
                  sk_s, sko_b, sko_h, sko_s, b, offs_s, offs_d, mask, c1, c2, s1, s2, HALF,
                  BACKWARD)


# ------------------------------------------------------------------------------ launcher


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q, k must be (B, H, S, Dh), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, Hq, S, Dh = q.shape
    if k.shape[0] != B or k.shape[2:] != (S, Dh):
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, S, Dh")
    if Dh % 2:
        raise ValueError(f"apply_rope: head dim {Dh} must be even (rotate-half)")
    if cos.shape != (B, S, Dh) or sin.shape != (B, S, Dh):
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)}, expected ({B}, {S}, {Dh})")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"apply_rope: cos/sin must be fp32 tables, got {cos.dtype}/{sin.dtype}")


def _launch(q, k, cos, sin, backward):
    B, Hq, S, Dh = q.shape
    Hkv = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko

    cfg = POLICY.config(_ctx(q, k), not on_interpreter(q.device))  # look-ups only
    grid = (triton.cdiv(S, cfg["BLOCK_S"]), B, triton.cdiv(Hq + Hkv, cfg["HEADS"]))
    _rope_kernel[grid](q, k, cos, sin, qo, ko, S, Hq, Hkv, Dh, _s_bucket(S),
                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                       qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
                       cos.stride(0), cos.stride(1), HALF=Dh // 2,
                       BLOCK_H=triton.next_power_of_2(Dh // 2), BACKWARD=backward,
                       BLOCK_S=cfg["BLOCK_S"], HEADS=cfg["HEADS"], num_warps=cfg["num_warps"])
    return qo, ko


@torch.library.custom_op("molmoe::apply_rope", mutates_args=())
def _apply_rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, cos, sin)
    return _launch(q, k, cos, sin, backward=False)


@_apply_rope_op.register_fake
def _(q, k, cos, sin):
    _check(q, k, cos, sin)
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("molmoe::apply_rope_bwd", mutates_args=())
def _apply_rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(dq, dk, cos, sin)
    return _launch(dq, dk, cos, sin, backward=True)


@_apply_rope_bwd_op.register_fake
def _(dq, dk, cos, sin):
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_shape, ctx.q_dtype, ctx.k_shape, ctx.k_dtype = q.shape, q.dtype, k.shape, k.dtype


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    # An output that did not reach the loss arrives as None: its gradient is zero.
    dq_out = dq_out if dq_out is not None else cos.new_zeros(ctx.q_shape).to(ctx.q_dtype)
    dk_out = dk_out if dk_out is not None else cos.new_zeros(ctx.k_shape).to(ctx.k_dtype)
    dq, dk = _apply_rope_bwd_op(dq_out, dk_out, cos, sin)
    return dq, dk, None, None


_apply_rope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rope(q, k, cos, sin):
    """Same contract as `molmoe.ops.apply_rope_ref`: (q, k) rotated, input dtypes."""
    return _apply_rope_op(q, k, cos, sin)
