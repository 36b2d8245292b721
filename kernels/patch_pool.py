"""Fused 2x2 attention pooling (spec §3.2, §3.3, §7.7): gather, pad-embedding add, mean query,
4-key softmax per head and the weighted sum of V in one Triton kernel; projections stay GEMMs.

The reference (`patch_pool_ref` = `molmoe.ops.patch_pool_ref`) adds the pad embeddings
to the whole feature map, copies the 4 members of every cell into an (M, 4, C) tensor, and runs
M tiny attentions over 4 keys through SDPA with fp32 copies of q, k, v. Here:

    q_raw = mean_2x2(f) Wq^T          (N, Gc, E)  torch mean over a strided view + cuBLAS GEMM
    k_raw = f Wk^T, v_raw = f Wv^T    (N, P, E)   cuBLAS GEMMs over all patches, no gather copy
    pad_u = pad_embed W^T             (3, 2, E)   the pad embeddings projected (q, k, v)
    o     = attend(q_raw, k_raw, v_raw, coef, pad_u, bias)   <- the Triton kernel
    out   = o Wo^T + bo                              cuBLAS GEMM

Pad embeddings by linearity: (f + a*pe0 + p*pe1) W^T + b = f W^T + a*(pe0 W^T) + p*(pe1 W^T) + b,
with a = (mask == 0), p = (mask < 1 and mask != 0) per patch (-1 counts as partial, §3.2), and
for the query the cell means of a and p. The kernel gathers the 4 member rows of k_raw/v_raw
straight from the (N, g*g) grid order, adds a*u0 + p*u1 + b in fp32, and does the attention in
fp32 (§7.7: q/k/v fp32 in the softmax), writing o in the input dtype. So the feature map is read
by the GEMMs and the cell mean only and nothing of size (M, 4, C) or (N, P, C) is materialised.

How fast it can be: the projection GEMMs do the same FLOPs here as in the reference (k and v of
every patch), so the speedup over the reference module is bounded by the reference's time over
the GEMMs' time; bench/bench_patch_pool.py reports both (`gemm_floor`). Going past that bound
needs fewer GEMM FLOPs, e.g. scores as (Wk_h^T q_h) . x_j and o_h = Wv_h (sum_j p_j x_j), which
cut the k/v GEMMs ~4x but only pay off fused (the (M, H, C) intermediates are large).

Numerics against the reference: identical math; the roundings differ slightly (the bias and pad
terms are added in fp32 after the GEMM instead of in the feature dtype before it, so the MolmoE
cast-back of f + pad to the feature dtype, §7.1, has no rounding to reproduce; in fp32 this is
exact up to summation order, in bf16 it is within bf16 rounding).

Backward: the kernel's backward recomputes the 4-key softmax per (cell, head) and writes dq_raw
(M, E) and dk_raw/dv_raw (N, P, E) scattered back to grid order (every patch belongs to exactly
one cell, so no atomics); the pad/bias gradients are two small reductions in torch and the GEMM
gradients come from torch autograd. The k bias gets an exact zero gradient: it shifts the 4 scores
of a (cell, head) alike, which the softmax ignores (the reference returns rounding noise there).

Legend: N crops, P = g*g patches per crop (576), g grid side (24), Gc = (g/2)^2 cells per crop
(144), M = N*Gc cells, C feature dim (2048), E pooled width (1024), H heads (16), D = E/H (64).

Where the idea comes from: the algebra of attention over a fixed tiny key set (every cell is a
4-token sequence, so the whole softmax lives in registers); vLLM's molmo.py computes the same
pooling through SDPA. Limits: 2x2 cells on an even square grid only; the per-head dim must fit in
one register block (D <= 256); the cell order is hard-wired (row-major cells, §3.3).

Mixed dtypes: the pad embeddings are projected in fp32 with autocast off (pad_u, (3, 2, E)), so
an fp32 `pad_embed` beside low-precision features and weights works (MolmoE's cast_back case).

Tiles: BLOCK_M x num_warps from `kernel_configs`, kept by `fits` (register budget, no tile
taller than the cell count), under the one tile policy of kernels/_common.py (`POLICY`), keyed on
(E, D) and the power-of-two bucket of M (M itself would re-tune per image);
`MOLMOE_PATCH_POOL_CONFIG="BLOCK_M=32,num_warps=4"` pins names; the interpreter (CPU) uses one
small fixed config. `autotune(...)` times the candidates once up front; a launch only looks its
config up (no tuning on the first call, CUDA-graph safe).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# patch_pool_ref: this op's reference, the contract's own function (molmoe.ops), re-exported
from molmoe.ops import pad_masks, patch_pool_ref  # noqa: F401
from molmoe.kernels._common import TilePolicy, on_interpreter


_CONFIG_ENV = "MOLMOE_PATCH_POOL_CONFIG"  # e.g. "BLOCK_M=32,num_warps=4"


# ------------------------------------------------------------------------------ tile policy


def kernel_configs(on_gpu: bool) -> list[dict]:
    """Candidate tiles (BLOCK_M cells, num_warps)."""
    if not on_gpu:
        # 64 cells: the interpreter's cost is per program; crops of 9 or 144 cells still
        # straddle tile edges in the tests
        return [dict(BLOCK_M=64, num_warps=1)]
    # No 2-warp configs: compiled for sm_90 (tests/test_kernels_sm90.py, E 1024, 16 heads) a
    # 2-warp program of 16 cells with pad embeddings spilled (255 registers + 320 B of stack,
    # forward and backward) and one of 8 cells took 168, where 4 and 8 warps stay spill-free
    # (at most 201 registers, the backward at 144 tile values per thread) up to the budget below.
    return [dict(BLOCK_M=bm, num_warps=w) for bm in (8, 16, 32, 64) for w in (4, 8)]


def fits(c: dict, M: int, block_d: int) -> bool:
    """A program holds 9 BLOCK_M x BLOCK_D fp32 tiles (q, 4 k, 4 v; the backward a few more):
    keep them within ~160 registers per thread so nothing spills, and no tile taller than the
    number of cells (one crop has only (g/2)^2 of them). (No shared memory: no dot, no
    pipelined loads.)"""
    return (9 * c["BLOCK_M"] * block_d <= 160 * 32 * c["num_warps"]
            and c["BLOCK_M"] <= max(8, triton.next_power_of_2(M)))


def _m_bucket(M: int) -> int:
    # Tile choice depends on how many cells there are to spread over the SMs (1 crop: 144,
    # 13 crops: 1872, a batch: more), but keying on M itself would re-tune per image: bucket it.
    return min(triton.next_power_of_2(max(M, 1)), 1 << 16)


# ctx: E, D, M_BUCKET, BLOCK_D (what the best tile depends on)
POLICY = TilePolicy(
    "patch_pool", _CONFIG_ENV, ("BLOCK_M", "num_warps"), example="BLOCK_M=32,num_warps=4",
    candidates=lambda ctx: kernel_configs(True),
    fits=lambda c, ctx: fits(c, ctx["M_BUCKET"], ctx["BLOCK_D"]),
    default=lambda ctx: dict(BLOCK_M=32, num_warps=4),
    interpreter=lambda ctx: kernel_configs(False)[0])


def _ctx(sizes: dict) -> dict:
    return {k: sizes[k] for k in ("E", "D", "M_BUCKET", "BLOCK_D")}


def autotune(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads) -> dict | None:
    """Time every config that fits on these (projected) tensors, forward + backward (one
    config serves both), GPU only, skipping any that fails; remember and return the fastest.
    Never on the launch path."""
    _, sizes, _ = _launch_args(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads)

    def run():
        o = patch_pool_attend(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads)
        patch_pool_attend_bwd(torch.ones_like(o), q_raw, k_raw, v_raw, coef, pad_u, bias,
                              num_heads)

    return POLICY.autotune(_ctx(sizes), run)


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _row(ptr, col, d_mask):
    """One (BLOCK_D,) fp32 row of a bias / projected pad embedding, broadcast over cells."""
    return tl.load(ptr + col, mask=d_mask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _member(k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, row, col, mask2, m_mask, d_mask, E,
            HAS_PAD: tl.constexpr):
    """k, v (BLOCK_M, BLOCK_D) fp32 of one member patch row, with bias and pad terms added."""
    offs = row[:, None] * E + col[None, :]
    k = tl.load(k_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
    k += _row(b_ptr + E, col, d_mask)
    v += _row(b_ptr + 2 * E, col, d_mask)
    a = tl.zeros(row.shape, tl.float32)
    p = tl.zeros(row.shape, tl.float32)
    if HAS_PAD:
        a = tl.load(coef_ptr + row * 2, mask=m_mask, other=0.0)
        p = tl.load(coef_ptr + row * 2 + 1, mask=m_mask, other=0.0)
        # pad_u is (3, 2, E) fp32: [q|k|v][all_pad|partial]
        k += a[:, None] * _row(u_ptr + 2 * E, col, d_mask)
        k += p[:, None] * _row(u_ptr + 3 * E, col, d_mask)
        v += a[:, None] * _row(u_ptr + 4 * E, col, d_mask)
        v += p[:, None] * _row(u_ptr + 5 * E, col, d_mask)
    return k, v, a, p


@triton.jit
def _cell_setup(q_ptr, k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, M, Gc, GW, G, P, E, D,
                HAS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets, q (with bias/pad) and the 4 members' k, v for a block of cells and one head."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    # int64 cells: row * E overflows int32 past 2^31 elements (a large batch of images)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D
    mask2 = m_mask[:, None] & d_mask[None, :]
    col = h * D + offs_d
    # cell m = crop n, cell t = GW*i + j; members (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
    n = offs_m // Gc
    t = offs_m % Gc
    row0 = n * P + (2 * (t // GW)) * G + 2 * (t % GW)
    k0, v0, a0, p0 = _member(k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, row0, col, mask2, m_mask,
                             d_mask, E, HAS_PAD)
    k1, v1, a1, p1 = _member(k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, row0 + 1, col, mask2, m_mask,
                             d_mask, E, HAS_PAD)
    k2, v2, a2, p2 = _member(k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, row0 + G, col, mask2, m_mask,
                             d_mask, E, HAS_PAD)
    k3, v3, a3, p3 = _member(k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, row0 + G + 1, col, mask2, m_mask,
                             d_mask, E, HAS_PAD)
    q = tl.load(q_ptr + offs_m[:, None] * E + col[None, :], mask=mask2, other=0.0).to(tl.float32)
    q += _row(b_ptr, col, d_mask)
    if HAS_PAD:  # the query is the cell mean, so its pad terms are the mean indicators
        a_mean = (a0 + a1 + a2 + a3) * 0.25
        p_mean = (p0 + p1 + p2 + p3) * 0.25
        q += a_mean[:, None] * _row(u_ptr, col, d_mask) + p_mean[:, None] * _row(u_ptr + E, col, d_mask)
    return offs_m, col, mask2, row0, q, k0, k1, k2, k3, v0, v1, v2, v3


@triton.jit
def _softmax4(q, k0, k1, k2, k3, scale):
    s0 = tl.sum(q * k0, axis=1) * scale
    s1 = tl.sum(q * k1, axis=1) * scale
    s2 = tl.sum(q * k2, axis=1) * scale
    s3 = tl.sum(q * k3, axis=1) * scale
    mx = tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3))
    e0 = tl.exp(s0 - mx)
    e1 = tl.exp(s1 - mx)
    e2 = tl.exp(s2 - mx)
    e3 = tl.exp(s3 - mx)
    inv = 1.0 / (e0 + e1 + e2 + e3)
    return e0 * inv, e1 * inv, e2 * inv, e3 * inv


@triton.jit
def _pool_fwd_kernel(q_ptr, k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, o_ptr, M, Gc, GW, G, P, E, D,
                     M_BUCKET, scale, HAS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m, col, mask2, row0, q, k0, k1, k2, k3, v0, v1, v2, v3 = _cell_setup(
        q_ptr, k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, M, Gc, GW, G, P, E, D, HAS_PAD, BLOCK_M, BLOCK_D)
    p0, p1, p2, p3 = _softmax4(q, k0, k1, k2, k3, scale)
    o = p0[:, None] * v0 + p1[:, None] * v1 + p2[:, None] * v2 + p3[:, None] * v3
    tl.store(o_ptr + offs_m[:, None] * E + col[None, :], o.to(o_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _member_grads(dk_ptr, dv_ptr, row, col, mask2, E, do, q, v, pj, dsj, scale):
    offs = row[:, None] * E + col[None, :]
    tl.store(dv_ptr + offs, (pj[:, None] * do).to(dv_ptr.dtype.element_ty), mask=mask2)
    tl.store(dk_ptr + offs, (scale * dsj[:, None] * q).to(dk_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _pool_bwd_kernel(do_ptr, q_ptr, k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, dq_ptr, dk_ptr, dv_ptr,
                     M, Gc, GW, G, P, E, D, M_BUCKET, scale, HAS_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    offs_m, col, mask2, row0, q, k0, k1, k2, k3, v0, v1, v2, v3 = _cell_setup(
        q_ptr, k_ptr, v_ptr, coef_ptr, u_ptr, b_ptr, M, Gc, GW, G, P, E, D, HAS_PAD, BLOCK_M, BLOCK_D)
    p0, p1, p2, p3 = _softmax4(q, k0, k1, k2, k3, scale)
    do = tl.load(do_ptr + offs_m[:, None] * E + col[None, :], mask=mask2, other=0.0).to(tl.float32)
    # softmax backward: ds_j = p_j (dp_j - sum_i p_i dp_i), dp_j = <do, v_j>
    dp0 = tl.sum(do * v0, axis=1)
    dp1 = tl.sum(do * v1, axis=1)
    dp2 = tl.sum(do * v2, axis=1)
    dp3 = tl.sum(do * v3, axis=1)
    delta = p0 * dp0 + p1 * dp1 + p2 * dp2 + p3 * dp3
    ds0 = p0 * (dp0 - delta)
    ds1 = p1 * (dp1 - delta)
    ds2 = p2 * (dp2 - delta)
    ds3 = p3 * (dp3 - delta)
    dq = scale * (ds0[:, None] * k0 + ds1[:, None] * k1 + ds2[:, None] * k2 + ds3[:, None] * k3)
    tl.store(dq_ptr + offs_m[:, None] * E + col[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask2)
    _member_grads(dk_ptr, dv_ptr, row0, col, mask2, E, do, q, v0, p0, ds0, scale)
    _member_grads(dk_ptr, dv_ptr, row0 + 1, col, mask2, E, do, q, v1, p1, ds1, scale)
    _member_grads(dk_ptr, dv_ptr, row0 + G, col, mask2, E, do, q, v2, p2, ds2, scale)
    _member_grads(dk_ptr, dv_ptr, row0 + G + 1, col, mask2, E, do, q, v3, p3, ds3, scale)


# ------------------------------------------------------------------------------ launchers


def _check(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads):
    if q_raw.dim() != 3 or k_raw.dim() != 3 or k_raw.shape != v_raw.shape:
        raise ValueError(f"patch_pool: q_raw (N, Gc, E) and k_raw == v_raw (N, P, E) expected, got "
                         f"{tuple(q_raw.shape)}, {tuple(k_raw.shape)}, {tuple(v_raw.shape)}")
    N, Gc, E = q_raw.shape
    P = k_raw.shape[1]
    g = math.isqrt(P)
    if g * g != P or g % 2 or Gc != (g // 2) ** 2 or k_raw.shape[0] != N or k_raw.shape[2] != E:
        raise ValueError(f"patch_pool: k_raw {tuple(k_raw.shape)} is not an even square grid whose "
                         f"2x2 cells match q_raw {tuple(q_raw.shape)}")
    if E % num_heads:
        raise ValueError(f"patch_pool: width {E} is not divisible by num_heads={num_heads}")
    if E // num_heads > 256:
        raise ValueError(f"patch_pool: head dim {E // num_heads} > 256 is not supported")
    if not (q_raw.dtype == k_raw.dtype == v_raw.dtype):
        raise ValueError(f"patch_pool: q/k/v dtypes differ: {q_raw.dtype}, {k_raw.dtype}, {v_raw.dtype}")
    if (coef is None) != (pad_u is None):
        raise ValueError("patch_pool: coef and pad_u must be given together (pad embeddings)")
    if coef is not None and (coef.shape != (N, P, 2) or pad_u.shape != (3, 2, E)):
        raise ValueError(f"patch_pool: coef {tuple(coef.shape)} / pad_u {tuple(pad_u.shape)} do "
                         f"not match ({N}, {P}, 2) / (3, 2, {E})")
    if bias.shape != (3, E):
        raise ValueError(f"patch_pool: bias {tuple(bias.shape)}, expected (3, {E})")
    return N, Gc, E, P, g


def _launch_args(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads):
    N, Gc, E, P, g = _check(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads)
    D = E // num_heads
    M = N * Gc
    has_pad = coef is not None
    coef = coef.contiguous().float() if has_pad else bias  # a dummy pointer when unused
    pad_u = pad_u.contiguous().float() if has_pad else bias
    tensors = (q_raw.contiguous(), k_raw.contiguous(), v_raw.contiguous(), coef, pad_u,
               bias.contiguous())
    sizes = dict(M=M, Gc=Gc, GW=g // 2, G=g, P=P, E=E, D=D, M_BUCKET=_m_bucket(M),
                 scale=1.0 / math.sqrt(D),
                 HAS_PAD=has_pad, BLOCK_D=triton.next_power_of_2(D))

    # the tile: dictionary look-ups only (never tuned here: CUDA-graph capture)
    cfg = POLICY.config(_ctx(sizes), not on_interpreter(q_raw.device))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), num_heads)
    return tensors, dict(sizes, **cfg), grid


@torch.library.custom_op("molmoe::patch_pool_attend", mutates_args=())
def patch_pool_attend(q_raw: torch.Tensor, k_raw: torch.Tensor, v_raw: torch.Tensor,
                      coef: torch.Tensor | None, pad_u: torch.Tensor | None, bias: torch.Tensor,
                      num_heads: int) -> torch.Tensor:
    """(N, Gc, E) pooled heads `o` (before Wo) from projected, bias-free q/k/v; see the header."""
    tensors, sizes, grid = _launch_args(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads)
    o = torch.empty(q_raw.shape, dtype=q_raw.dtype, device=q_raw.device)
    if o.numel():  # no crops: nothing to launch
        _pool_fwd_kernel[grid](*tensors, o, **sizes)
    return o


@patch_pool_attend.register_fake
def _(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads):
    _check(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads)
    return q_raw.new_empty(q_raw.shape)


@torch.library.custom_op("molmoe::patch_pool_attend_bwd", mutates_args=())
def patch_pool_attend_bwd(do: torch.Tensor, q_raw: torch.Tensor, k_raw: torch.Tensor,
                          v_raw: torch.Tensor, coef: torch.Tensor | None,
                          pad_u: torch.Tensor | None, bias: torch.Tensor,
                          num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `patch_pool_attend` w.r.t. q_raw, k_raw, v_raw (in their dtype)."""
    tensors, sizes, grid = _launch_args(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads)
    dq = torch.empty(q_raw.shape, dtype=q_raw.dtype, device=q_raw.device)
    dk = torch.empty(k_raw.shape, dtype=k_raw.dtype, device=k_raw.device)
    dv = torch.empty(v_raw.shape, dtype=v_raw.dtype, device=v_raw.device)
    if dq.numel():
        _pool_bwd_kernel[grid](do.contiguous(), *tensors, dq, dk, dv, **sizes)
    return dq, dk, dv


@patch_pool_attend_bwd.register_fake
def _(do, q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads):
    return q_raw.new_empty(q_raw.shape), k_raw.new_empty(k_raw.shape), v_raw.new_empty(v_raw.shape)


def _setup_context(ctx, inputs, output):
    q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads = inputs
    ctx.save_for_backward(q_raw, k_raw, v_raw, coef, pad_u, bias)
    ctx.num_heads = num_heads


def _backward(ctx, do):
    q_raw, k_raw, v_raw, coef, pad_u, bias = ctx.saved_tensors
    dq, dk, dv = patch_pool_attend_bwd(do, q_raw, k_raw, v_raw, coef, pad_u, bias, ctx.num_heads)
    E = q_raw.shape[-1]
    # q = q_raw + bias[0] (+ pad terms), v likewise: their bias grads are row sums, in fp32. The
    # k bias shifts all 4 scores of a (cell, head) by the same q . bk, which the softmax ignores:
    # its gradient is exactly zero (summing dk would only add rounding noise).
    dbq, dbv = (t.reshape(-1, E).float().sum(0) for t in (dq, dv))
    dbias = torch.stack([dbq, torch.zeros_like(dbq), dbv]).to(bias.dtype)
    dpad_u = None
    if coef is not None and ctx.needs_input_grad[4]:
        N, P, _ = coef.shape
        g = math.isqrt(P)
        coef_q = coef.float().reshape(N, g // 2, 2, g // 2, 2, 2).mean(dim=(2, 4)).reshape(-1, 2)
        coef_kv = coef.float().reshape(-1, 2)
        dpad_u = torch.stack([coef_q.t() @ dq.reshape(-1, E).float(),
                              coef_kv.t() @ dk.reshape(-1, E).float(),
                              coef_kv.t() @ dv.reshape(-1, E).float()]).to(pad_u.dtype)
    return dq, dk, dv, None, dpad_u, dbias, None


patch_pool_attend.register_autograd(_backward, setup_context=_setup_context)


def patch_pool(feats, image_masks, pad_embed, wq, bq, wk, bk, wv, bv, wo, bo, num_heads,
               cast_back):
    """Same contract as `molmoe.ops.patch_pool_ref`: (N, P, C) -> (N, P/4, E).

    `cast_back` (MolmoE's cast of f + pad to the feature dtype) needs no action here: the GEMMs
    read f in its own dtype and the pad terms enter after them, in fp32 (see the header)."""
    if feats.dim() != 3:
        raise ValueError(f"patch_pool: feats must be (N, P, C), got {tuple(feats.shape)}")
    N, P, C = feats.shape
    g = math.isqrt(P)
    if g * g != P or g % 2:
        raise ValueError(f"patch_pool: {P} patches per crop is not an even square grid")
    if pad_embed.shape != (2, C):
        raise ValueError(f"patch_pool: pad_embed {tuple(pad_embed.shape)}, expected (2, {C})")
    if image_masks is not None and image_masks.shape != (N, P):
        raise ValueError(f"patch_pool: image_masks {tuple(image_masks.shape)}, expected ({N}, {P})")
    E = wq.shape[0]
    # (N, g/2, 2, g/2, 2, C) mean over the 2x2 members: a strided reduction, no gather copy
    q_in = feats.reshape(N, g // 2, 2, g // 2, 2, C).mean(dim=(2, 4)).reshape(N, P // 4, C)
    q_raw, k_raw, v_raw = F.linear(q_in, wq), F.linear(feats, wk), F.linear(feats, wv)
    zeros = q_raw.new_zeros(E)
    bias = torch.stack([b if b is not None else zeros for b in (bq, bk, bv)])
    coef = pad_u = None
    if image_masks is not None:
        coef = torch.stack(pad_masks(image_masks, torch.float32), dim=-1)  # (N, P, 2)
        # The projected pad embeddings in fp32 (tiny: (3, 2, E)), autocast off: exact by
        # linearity in fp32, and pad_embed may be fp32 beside low-precision features/weights
        # (MolmoE's cast_back case), which F.linear would refuse.
        with torch.autocast(feats.device.type, enabled=False):
            pad_u = torch.stack([pad_embed.float() @ w.float().t() for w in (wq, wk, wv)])
    o = patch_pool_attend(q_raw, k_raw, v_raw, coef, pad_u, bias, num_heads)
    return F.linear(o, wo, bo)
