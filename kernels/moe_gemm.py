"""Grouped expert GEMMs of the MoE op, forward and backward (see kernels/moe.py for the picture).

Every row-tiled kernel gets its rows from `_tile_rows`, in one of two modes:
  * grouped (prefill/training): program m takes row tile m of the expert-sorted, padded layout
    (kernels/moe_routing.py `permute`); the tile's expert is tile_expert[m] (-1: exit at once).
  * decode (few tokens, no permutation): program m takes assignment a = m; only the FIRST
    assignment of each selected expert works, and its rows are all the tokens that picked that
    expert (found by comparing the T*K expert ids in-kernel). So each selected expert's weights
    are read once however many of the T tokens chose it, and no sort is needed.
Row vectors: `tok` (row of x / dy), `assign` (a = t*K + k: row of z / dxs), `row` (row of the
h / gate / up buffers: the sorted row when grouped, the assignment when decoding).

Legend: T tokens, D model dim, F expert hidden, E experts, K experts per token, N = T*K,
R padded sorted rows. Weights are the loader's: w_gate, w_up (E, F, D), w_down (E, D, F),
contiguous; the forward's gate_up kernel reads them interleaved, w_gu (E, 2F, D) with row 2f =
w_gate[:, f] and row 2f+1 = w_up[:, f] (kernels/moe.py `interleave_gate_up`, built once per
weight version), so one (2 BLOCK_N, BLOCK_K) tile feeds one wide dot. Accumulation is fp32;
fp32 inputs use IEEE dots (no TF32).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _narrow(x, ptr, SATURATE: tl.constexpr = True):
    """fp32 `x` in the element type of `ptr`, for a store. Forward values (SATURATE): fp16
    saturates at +-65504 instead of rounding to inf: an inf in h, z or a saved pre-activation
    becomes NaN in the next GEMM (inf * 0) and in the silu backward, where a saturated value
    stays finite. Gradients (SATURATE=False) round to inf as PyTorch's do: fp16 training's
    loss scaler (torch.amp.GradScaler) finds overflow by the infs and skips the step; a
    saturated gradient would hide it. bf16 and fp32 have fp32's range: unchanged."""
    if SATURATE and ptr.dtype.element_ty == tl.float16:
        x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # GROUP_M row tiles share each column tile in launch order: the expert weight tile and the
    # gathered activation rows both stay in L2 (the same expert's row tiles are adjacent).
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _tile_rows(pid_m, tile_expert_ptr, sorted_assign_ptr, idx_ptr, T, N, K: tl.constexpr,
               K_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
               DECODE: tl.constexpr):
    if DECODE:
        all_a = tl.arange(0, N_PAD)
        all_e = tl.load(idx_ptr + all_a, mask=all_a < N, other=-1)
        e = tl.load(idx_ptr + pid_m)
        first = tl.min(tl.where(all_e == e, all_a, N_PAD), axis=0)
        e = tl.where(first == pid_m, e, -1)  # a later assignment of the same expert: no work
        tok = tl.arange(0, BLOCK_M)  # rows are tokens (T <= BLOCK_M on this path)
        slots = tl.arange(0, K_PAD)
        sel = tl.load(idx_ptr + tok[:, None] * K + slots[None, :],
                      mask=(tok < T)[:, None] & (slots < K)[None, :], other=-1)
        match = sel == e  # a token picks an expert at most once
        ok = tl.sum(match.to(tl.int32), axis=1) > 0
        assign = tok * K + tl.sum(tl.where(match, slots[None, :], 0), axis=1)
        row = assign
    else:
        e = tl.load(tile_expert_ptr + pid_m)
        row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        assign = tl.load(sorted_assign_ptr + row)
        ok = assign >= 0  # padding rows of the expert's last tile
        assign = tl.where(ok, assign, 0)
        tok = assign // K
    return e, tok.to(tl.int64), assign.to(tl.int64), row.to(tl.int64), ok


# ----------------------------------------------------------------------------- forward


@triton.jit
def _gate_up_kernel(x_ptr, wgu_ptr, h_ptr, g_ptr, u_ptr, tile_expert_ptr,
                    sorted_assign_ptr, idx_ptr, T, N, D, F, num_m, s_xt,
                    K: tl.constexpr, K_PAD: tl.constexpr, N_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, DECODE: tl.constexpr, SAVE_PRE: tl.constexpr,
                    IEEE: tl.constexpr, TMA: tl.constexpr = False):
    """h[row] = silu(x[tok] @ w_gate[e]^T) * (x[tok] @ w_up[e]^T): (BLOCK_M, BLOCK_N) over F.
    One dot per step: x (BLOCK_M, BLOCK_K) times the interleaved w_gu rows [2 n0, 2 n0 + 2
    BLOCK_N) (gate and up of the tile's BLOCK_N columns, alternating) into one (BLOCK_M,
    2 BLOCK_N) accumulator, split into gate and up in the epilogue (wgmma n = 2 BLOCK_N).
    TMA: the weight tiles come through a tensor descriptor of expert e's (2F, D) slice (bulk
    copies, zeros past its edge); the gathered x rows stay pointer loads."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    e, tok, assign, row, ok = _tile_rows(pid_m, tile_expert_ptr, sorted_assign_ptr, idx_ptr, T,
                                         N, K, K_PAD, N_PAD, BLOCK_M, DECODE)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    if e < 0:
        if SAVE_PRE:  # saved outputs hold zeros, not garbage, past the work (reproducible)
            zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            tl.store(g_ptr + row[:, None] * F + cols[None, :], zero.to(g_ptr.dtype.element_ty),
                     mask=col_ok[None, :])
            tl.store(u_ptr + row[:, None] * F + cols[None, :], zero.to(u_ptr.dtype.element_ty),
                     mask=col_ok[None, :])
        return
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * s_xt + ks[None, :]
    wrows = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # w_gu rows: 2f gate, 2f+1 up
    e_off = e.to(tl.int64) * 2 * F * D
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], tl.float32)
    if TMA:
        wgu_desc = tl.make_tensor_descriptor(wgu_ptr + e_off, shape=[2 * F, D], strides=[D, 1],
                                             block_shape=[2 * BLOCK_N, BLOCK_K])
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + ks) < D
            a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a, tl.trans(wgu_desc.load([pid_n * 2 * BLOCK_N, k0])), acc, IEEE)
    else:
        w_off = e_off + wrows[None, :] * D + ks[:, None]  # (BLOCK_K, 2 BLOCK_N)
        w_ok = (wrows < 2 * F)[None, :]
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + ks) < D
            a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a, tl.load(wgu_ptr + w_off + k0, mask=k_ok[:, None] & w_ok, other=0.0),
                       acc, IEEE)
    # columns 2j, 2j+1 of the accumulator: gate and up of column cols[j]
    acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    out = row[:, None] * F + cols[None, :]
    out_ok = ok[:, None] & col_ok[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up in fp32, rounded once
    tl.store(h_ptr + out, _narrow(h, h_ptr), mask=out_ok)
    if SAVE_PRE:  # training: the backward needs the pre-activations (padding rows: zeros)
        tl.store(g_ptr + out, _narrow(acc_g, g_ptr), mask=col_ok[None, :])
        tl.store(u_ptr + out, _narrow(acc_u, u_ptr), mask=col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, wd_ptr, w_ptr, z_ptr, tile_expert_ptr, sorted_assign_ptr, idx_ptr, T, N,
                 D, F, num_m, K: tl.constexpr, K_PAD: tl.constexpr, N_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, DECODE: tl.constexpr, IEEE: tl.constexpr,
                 TMA: tl.constexpr = False):
    """z[assign] = w[assign] * (h[row] @ w_down[e]^T): (BLOCK_M, BLOCK_N) over D, the routing
    weight applied in fp32 before the one rounding, stored per assignment. TMA: the weight
    tiles and (grouped path) the sorted h rows come through tensor descriptors; padding rows
    of h are read as they are (their outputs are never stored: rows are independent)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    e, tok, assign, row, ok = _tile_rows(pid_m, tile_expert_ptr, sorted_assign_ptr, idx_ptr, T,
                                         N, K, K_PAD, N_PAD, BLOCK_M, DECODE)
    if e < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + row[:, None] * F + ks[None, :]
    b_ptrs = wd_ptr + e.to(tl.int64) * D * F + cols[None, :] * F + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if TMA:
        wd_desc = tl.make_tensor_descriptor(wd_ptr + e.to(tl.int64) * D * F, shape=[D, F],
                                            strides=[F, 1], block_shape=[BLOCK_N, BLOCK_K])
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[num_m * BLOCK_M, F], strides=[F, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        n0 = pid_n * BLOCK_N
        for k0 in range(0, F, BLOCK_K):
            if DECODE:  # rows are tokens / assignments, not a contiguous tile
                k_ok = (k0 + ks) < F
                a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            else:
                a = h_desc.load([pid_m * BLOCK_M, k0])
            acc = _dot(a, tl.trans(wd_desc.load([n0, k0])), acc, IEEE)
    else:
        for k0 in range(0, F, BLOCK_K):
            k_ok = (k0 + ks) < F
            a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
    acc = acc * tl.load(w_ptr + assign, mask=ok, other=0.0)[:, None]
    tl.store(z_ptr + assign[:, None] * D + cols[None, :], _narrow(acc, z_ptr),
             mask=ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(z_ptr, y_ptr, T, D, s_yt, K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr, SATURATE: tl.constexpr = True):
    """y[t] = sum_k z[t*K + k] in fp32, slots in order: a gather, no atomics. SATURATE: as
    `_narrow` (the forward's y; False for the backward's dx)."""
    toks = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (toks < T)[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for k in range(K):
        zk = tl.load(z_ptr + (toks * K + k)[:, None] * D + cols[None, :], mask=ok, other=0.0)
        acc += zk.to(tl.float32)
    tl.store(y_ptr + toks[:, None] * s_yt + cols[None, :], _narrow(acc, y_ptr, SATURATE),
             mask=ok)


# ----------------------------------------------------------------------------- persistent


@triton.jit
def _real_tiles(expert_start_ptr, counts_ptr, E, BLOCK_M: tl.constexpr):
    """Row tiles that hold work: the sorted layout ends where the last expert's padded rows end
    (tiles past it have tile_expert = -1; kernels/moe_routing.py `_offsets_kernel`)."""
    last_rows = tl.cdiv(tl.load(counts_ptr + E - 1), BLOCK_M) * BLOCK_M
    return (tl.load(expert_start_ptr + E - 1) + last_rows) // BLOCK_M


@triton.jit
def _gate_up_work(e, tok, row, ok, pid_n, x_ptr, wgu_ptr, h_ptr, g_ptr, u_ptr, D, F, s_xt,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SAVE_PRE: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile of expert e >= 0 (see `_gate_up_kernel`)."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * s_xt + ks[None, :]
    wrows = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # w_gu rows: 2f gate, 2f+1 up
    e_off = e.to(tl.int64) * 2 * F * D
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], tl.float32)
    if TMA:
        wgu_desc = tl.make_tensor_descriptor(wgu_ptr + e_off, shape=[2 * F, D], strides=[D, 1],
                                             block_shape=[2 * BLOCK_N, BLOCK_K])
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + ks) < D
            a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a, tl.trans(wgu_desc.load([pid_n * 2 * BLOCK_N, k0])), acc, IEEE)
    else:
        w_off = e_off + wrows[None, :] * D + ks[:, None]  # (BLOCK_K, 2 BLOCK_N)
        w_ok = (wrows < 2 * F)[None, :]
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + ks) < D
            a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a, tl.load(wgu_ptr + w_off + k0, mask=k_ok[:, None] & w_ok, other=0.0),
                       acc, IEEE)
    # columns 2j, 2j+1 of the accumulator: gate and up of column cols[j]
    acc_g, acc_u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    out = row[:, None] * F + cols[None, :]
    out_ok = ok[:, None] & col_ok[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up in fp32, rounded once
    tl.store(h_ptr + out, _narrow(h, h_ptr), mask=out_ok)
    if SAVE_PRE:  # training: the backward needs the pre-activations (padding rows: zeros)
        tl.store(g_ptr + out, _narrow(acc_g, g_ptr), mask=col_ok[None, :])
        tl.store(u_ptr + out, _narrow(acc_u, u_ptr), mask=col_ok[None, :])


@triton.jit
def _zero_pre(row, pid_n, g_ptr, u_ptr, F, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The saved gate / up rows of a tile past the work hold zeros, not garbage (reproducible
    saved outputs; nothing reads them)."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    tl.store(g_ptr + row[:, None] * F + cols[None, :], zero.to(g_ptr.dtype.element_ty),
             mask=col_ok[None, :])
    tl.store(u_ptr + row[:, None] * F + cols[None, :], zero.to(u_ptr.dtype.element_ty),
             mask=col_ok[None, :])


@triton.jit
def _gate_up_persistent_kernel(x_ptr, wgu_ptr, h_ptr, g_ptr, u_ptr, tile_expert_ptr,
                               sorted_assign_ptr, expert_start_ptr, counts_ptr, T, N, D, F, E,
                               num_m, s_xt, K: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr, SAVE_PRE: tl.constexpr, IEEE: tl.constexpr,
                               TMA: tl.constexpr):
    """`_gate_up_kernel` (grouped path) on a fixed grid: each program strides over the real
    (row tile, column tile) pairs only -- `_real_tiles` x column tiles, read on the device, so no
    program runs for a padding tile of the static bound -- then zero-fills the saved gate / up
    of the padding tiles (SAVE_PRE). Same tile math as `_gate_up_kernel` (whose body stays
    inline: as a shared helper it spilled 16 B in fp32 on sm_90), bit for bit."""
    num_n = tl.cdiv(F, BLOCK_N)
    num_real = _real_tiles(expert_start_ptr, counts_ptr, E, BLOCK_M)
    for tile in range(tl.program_id(0), num_real * num_n, tl.num_programs(0)):
        pid_m, pid_n = _swizzle(tile, num_real, num_n, GROUP_M)
        e, tok, assign, row, ok = _tile_rows(pid_m, tile_expert_ptr, sorted_assign_ptr,
                                             sorted_assign_ptr, T, N, K, 1, 1, BLOCK_M, False)
        _gate_up_work(e, tok, row, ok, pid_n, x_ptr, wgu_ptr, h_ptr, g_ptr, u_ptr, D, F, s_xt,
                      BLOCK_M, BLOCK_N, BLOCK_K, SAVE_PRE, IEEE, TMA)
    if SAVE_PRE:
        for tile in range(num_real * num_n + tl.program_id(0), num_m * num_n, tl.num_programs(0)):
            row = ((tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            _zero_pre(row, tile % num_n, g_ptr, u_ptr, F, BLOCK_M, BLOCK_N)


@triton.jit
def _down_work(e, assign, row, ok, pid_m, pid_n, h_ptr, wd_ptr, w_ptr, z_ptr, D, F, num_m,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DECODE: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile of expert e >= 0 (see `_down_kernel`)."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + row[:, None] * F + ks[None, :]
    b_ptrs = wd_ptr + e.to(tl.int64) * D * F + cols[None, :] * F + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if TMA:
        wd_desc = tl.make_tensor_descriptor(wd_ptr + e.to(tl.int64) * D * F, shape=[D, F],
                                            strides=[F, 1], block_shape=[BLOCK_N, BLOCK_K])
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[num_m * BLOCK_M, F], strides=[F, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        n0 = pid_n * BLOCK_N
        for k0 in range(0, F, BLOCK_K):
            if DECODE:  # rows are tokens / assignments, not a contiguous tile
                k_ok = (k0 + ks) < F
                a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            else:
                a = h_desc.load([pid_m * BLOCK_M, k0])
            acc = _dot(a, tl.trans(wd_desc.load([n0, k0])), acc, IEEE)
    else:
        for k0 in range(0, F, BLOCK_K):
            k_ok = (k0 + ks) < F
            a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
    acc = acc * tl.load(w_ptr + assign, mask=ok, other=0.0)[:, None]
    tl.store(z_ptr + assign[:, None] * D + cols[None, :], _narrow(acc, z_ptr),
             mask=ok[:, None] & col_ok[None, :])


@triton.jit
def _down_persistent_kernel(h_ptr, wd_ptr, w_ptr, z_ptr, tile_expert_ptr, sorted_assign_ptr,
                            expert_start_ptr, counts_ptr, T, N, D, F, E, num_m,
                            K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, IEEE: tl.constexpr,
                            TMA: tl.constexpr):
    """`_down_kernel` (grouped path) on a fixed grid striding over the real tiles only, as
    `_gate_up_persistent_kernel`."""
    num_n = tl.cdiv(D, BLOCK_N)
    num_real = _real_tiles(expert_start_ptr, counts_ptr, E, BLOCK_M)
    for tile in range(tl.program_id(0), num_real * num_n, tl.num_programs(0)):
        pid_m, pid_n = _swizzle(tile, num_real, num_n, GROUP_M)
        e, tok, assign, row, ok = _tile_rows(pid_m, tile_expert_ptr, sorted_assign_ptr,
                                             sorted_assign_ptr, T, N, K, 1, 1, BLOCK_M, False)
        _down_work(e, assign, row, ok, pid_m, pid_n, h_ptr, wd_ptr, w_ptr, z_ptr, D, F, num_m,
                   BLOCK_M, BLOCK_N, BLOCK_K, False, IEEE, TMA)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _dw_reduce_kernel(part_ptr, dw_ptr, N, NUM_PARTS: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_P: tl.constexpr):
    """d topk_w[a] = sum of the per-column-tile partials of `_down_bwd_kernel`, in tile order."""
    a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    parts = tl.arange(0, BLOCK_P)
    ok = (a < N)[:, None] & (parts < NUM_PARTS)[None, :]
    p = tl.load(part_ptr + a.to(tl.int64)[:, None] * NUM_PARTS + parts[None, :], mask=ok,
                other=0.0)
    tl.store(dw_ptr + a, tl.sum(p, axis=1), mask=a < N)


@triton.jit
def _down_bwd_kernel(dy_ptr, w_ptr, wd_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, dw_part_ptr,
                     tile_expert_ptr, sorted_assign_ptr, D, F, num_m, s_dyt, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, NEED_DH: tl.constexpr, IEEE: tl.constexpr):
    """g = dy[tok] @ w_down[e] over F. Then the routing weight's gradient, d w = dy . z / w =
    g . h, as this column tile's partial sum (reduced by `_dw_reduce_kernel`: no atomics), and
    dh = w * g through the silu-gate backward: d gate, d up per row."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    e, tok, assign, row, ok = _tile_rows(pid_m, tile_expert_ptr, sorted_assign_ptr,
                                         sorted_assign_ptr, 0, 0, K, 1, 1, BLOCK_M, False)
    if e < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + tok[:, None] * s_dyt + ks[None, :]
    b_ptrs = wd_ptr + e.to(tl.int64) * D * F + ks[:, None] * F + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs + k0 * F, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
    off = row[:, None] * F + cols[None, :]
    out_ok = ok[:, None] & col_ok[None, :]
    gate = tl.load(g_ptr + off, mask=out_ok, other=0.0).to(tl.float32)
    up = tl.load(u_ptr + off, mask=out_ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    # h recomputed from the saved gate/up (masked entries are 0, so they add nothing)
    tl.store(dw_part_ptr + assign * tl.cdiv(F, BLOCK_N) + pid_n,
             tl.sum(acc * gate * sig * up, axis=1), mask=ok)
    if NEED_DH:
        dh = acc * tl.load(w_ptr + assign, mask=ok, other=0.0)[:, None]
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dg_ptr + off, _narrow(dgate, dg_ptr, False), mask=out_ok)
        tl.store(du_ptr + off, _narrow(dh * gate * sig, du_ptr, False), mask=out_ok)


@triton.jit
def _gate_up_bwd_dx_kernel(dg_ptr, du_ptr, wg_ptr, wu_ptr, dxs_ptr, tile_expert_ptr,
                           sorted_assign_ptr, D, F, num_m, K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, IEEE: tl.constexpr,
                           INTERLEAVED: tl.constexpr = False):
    """dxs[assign] = d gate[row] @ w_gate[e] + d up[row] @ w_up[e] over D (summed per token
    by `_combine_kernel` afterwards). w_gate / w_up rows are D apart, or 2D for the two halves
    of an interleaved gate|up weight (INTERLEAVED); experts F rows apart."""
    s_wf = 2 * D if INTERLEAVED else D
    pid_m, pid_n = _swizzle(tl.program_id(0), num_m, tl.cdiv(D, BLOCK_N), GROUP_M)
    e, tok, assign, row, ok = _tile_rows(pid_m, tile_expert_ptr, sorted_assign_ptr,
                                         sorted_assign_ptr, 0, 0, K, 1, 1, BLOCK_M, False)
    if e < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    ks = tl.arange(0, BLOCK_K)
    a_off = row[:, None] * F + ks[None, :]
    b_off = e.to(tl.int64) * F * s_wf + ks[:, None] * s_wf + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = (k0 + ks) < F
        a_ok = ok[:, None] & k_ok[None, :]
        b_ok = k_ok[:, None] & col_ok[None, :]
        acc = _dot(tl.load(dg_ptr + a_off + k0, mask=a_ok, other=0.0),
                   tl.load(wg_ptr + b_off + k0 * s_wf, mask=b_ok, other=0.0), acc, IEEE)
        acc = _dot(tl.load(du_ptr + a_off + k0, mask=a_ok, other=0.0),
                   tl.load(wu_ptr + b_off + k0 * s_wf, mask=b_ok, other=0.0), acc, IEEE)
    tl.store(dxs_ptr + assign[:, None] * D + cols[None, :], _narrow(acc, dxs_ptr, False),
             mask=ok[:, None] & col_ok[None, :])


@triton.jit
def _dw_segment(seg_ptr):
    """(expert, first sorted row, rows, workspace slot) of this program's row segment
    (kernels/moe.py `dw_segments`; rows < 0: no segment, its program stores nothing; slot < 0:
    written to dW directly)."""
    seg = seg_ptr + tl.program_id(1) * 4
    return tl.load(seg), tl.load(seg + 1), tl.load(seg + 2), tl.load(seg + 3)


@triton.jit
def _dw_store(acc, dw_ptr, ws_ptr, slot, off, out_ok):
    """A segment's (BLOCK_M, BLOCK_N) dW tile: the whole expert's sum into dW (its dtype), or one
    of several segments' fp32 partials into workspace slot `slot` (`_dw_split_reduce_kernel`
    sums them in order). Two masked stores."""
    slots = off * 0 + slot  # as a block: a scalar in a block's mask fails in the interpreter
    tl.store(dw_ptr + off, acc.to(dw_ptr.dtype.element_ty), mask=out_ok & (slots < 0))
    tl.store(ws_ptr + off, acc, mask=out_ok & (slots >= 0))


@triton.jit
def _dw_gate_up_kernel(dg_ptr, du_ptr, x_ptr, sorted_assign_ptr, seg_ptr, dwg_ptr, dwu_ptr,
                       wsg_ptr, wsu_ptr, D, F, s_xt, K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """dW_gate[e] = d gate[rows]^T @ x[tok], dW_up[e] likewise, over one row segment of expert e
    (axis 1; the whole expert unless it has more rows than a segment holds): (BLOCK_M over F,
    BLOCK_N over D) per program, a loop over the segment's rows (an empty expert's one segment
    stores zeros)."""
    e, start, count, slot = _dw_segment(seg_ptr)
    live = count  # < 0: no segment (masked below, not an early return: that gave the fp32
    count = tl.maximum(count, 0)  # kernels a stack frame on sm_90)
    num_n = tl.cdiv(D, BLOCK_N)
    fcols = (tl.program_id(0) // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = fcols < F
    d_ok = dcols < D
    rs = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, count, BLOCK_K):
        r_ok = (r0 + rs) < count
        row = (start + r0 + rs).to(tl.int64)
        tok = (tl.load(sorted_assign_ptr + row, mask=r_ok, other=0) // K).to(tl.int64)
        at_ok = f_ok[:, None] & r_ok[None, :]
        dg_t = tl.load(dg_ptr + row[None, :] * F + fcols[:, None], mask=at_ok, other=0.0)
        du_t = tl.load(du_ptr + row[None, :] * F + fcols[:, None], mask=at_ok, other=0.0)
        xb = tl.load(x_ptr + tok[:, None] * s_xt + dcols[None, :],
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc_g = _dot(dg_t, xb, acc_g, IEEE)
        acc_u = _dot(du_t, xb, acc_u, IEEE)
    base = tl.where(slot < 0, e, slot).to(tl.int64) * F * D
    off = base + fcols[:, None] * D + dcols[None, :]
    out_ok = f_ok[:, None] & d_ok[None, :]
    out_ok = out_ok & ((off * 0 + live) >= 0)
    _dw_store(acc_g, dwg_ptr, wsg_ptr, slot, off, out_ok)
    _dw_store(acc_u, dwu_ptr, wsu_ptr, slot, off, out_ok)


@triton.jit
def _dw_down_kernel(dy_ptr, w_ptr, g_ptr, u_ptr, sorted_assign_ptr, seg_ptr, dwd_ptr, ws_ptr,
                    D, F, s_dyt, K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """dW_down[e] = (w * dy[tok])[rows]^T @ h[rows] over one row segment of expert e (as
    `_dw_gate_up_kernel`): (BLOCK_M over D, BLOCK_N over F); h is recomputed from the saved
    gate/up (one fewer (R, F) buffer kept for the backward)."""
    e, start, count, slot = _dw_segment(seg_ptr)
    live = count  # < 0: no segment (masked below, not an early return: that gave the fp32
    count = tl.maximum(count, 0)  # kernels a stack frame on sm_90)
    num_n = tl.cdiv(F, BLOCK_N)
    dcols = (tl.program_id(0) // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    fcols = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = dcols < D
    f_ok = fcols < F
    rs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, count, BLOCK_K):
        r_ok = (r0 + rs) < count
        row = (start + r0 + rs).to(tl.int64)
        assign = tl.load(sorted_assign_ptr + row, mask=r_ok, other=0).to(tl.int64)
        wgt = tl.load(w_ptr + assign, mask=r_ok, other=0.0)
        dy_t = tl.load(dy_ptr + (assign // K)[None, :] * s_dyt + dcols[:, None],
                       mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        dy_t = (dy_t.to(tl.float32) * wgt[None, :]).to(dy_ptr.dtype.element_ty)
        hb_ok = r_ok[:, None] & f_ok[None, :]
        gate = tl.load(g_ptr + row[:, None] * F + fcols[None, :], mask=hb_ok, other=0.0)
        up = tl.load(u_ptr + row[:, None] * F + fcols[None, :], mask=hb_ok, other=0.0)
        gate = gate.to(tl.float32)
        h = (gate * tl.sigmoid(gate) * up.to(tl.float32)).to(dy_ptr.dtype.element_ty)
        acc = _dot(dy_t, h, acc, IEEE)
    base = tl.where(slot < 0, e, slot).to(tl.int64) * D * F
    off = base + dcols[:, None] * F + fcols[None, :]
    _dw_store(acc, dwd_ptr, ws_ptr, slot, off,
              d_ok[:, None] & f_ok[None, :] & ((off * 0 + live) >= 0))


@triton.jit
def _dw_split_reduce_kernel(ws_ptr, out_ptr, nseg_ptr, first_slot_ptr, size,
                            BLOCK: tl.constexpr):
    """out[e] (dW) = the sum, in segment order, of expert e's fp32 partials in workspace slots
    first_slot[e] ... first_slot[e] + nseg[e] - 1, for the experts split into several row
    segments (axis 1 = expert; the others were written whole by their one program)."""
    e = tl.program_id(1)
    n = tl.load(nseg_ptr + e)
    if n <= 1:
        return
    first = tl.load(first_slot_ptr + e)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    acc = tl.zeros([BLOCK], tl.float32)
    for j in range(0, n):
        acc += tl.load(ws_ptr + (first + j).to(tl.int64) * size + offs, mask=ok, other=0.0)
    tl.store(out_ptr + e.to(tl.int64) * size + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
