"""Router and permutation kernels of the MoE op (see kernels/moe.py for the whole picture).

Router (`route`, `route_backward`): fp32 softmax over all E experts of each token's logits, top-K
by K passes of argmax (ties to the lower expert index, as torch.topk does on the reference),
optional renormalisation of the K weights. It also writes the full probabilities P_TE and the
log-sum-exp lse_T: the load-balancing loss needs the mean probability per expert and the router
z-loss needs lse, and both are differentiated through these two outputs.

Permutation (`permute`): the N = T*K (token, slot) assignments, numbered a = t*K + k, are sorted
by expert, stable in a (so the order is deterministic), each expert's rows padded to a multiple of
BLOCK_M (the grouped GEMM's row tile, so that a tile never straddles two experts):
  1. `_histogram_kernel`: per chunk of BLOCK_A (<= 256) assignments, a (chunk, E) count table
     (no atomics).
  2. `_offsets_kernel` (one program): exclusive prefix sums over chunks, BLOCK_C chunks a step
     (each chunk's base per expert), per-expert counts, padded expert starts, and the expert of
     every row tile.
  3. `_scatter_kernel`: each assignment's rank inside its chunk (cumsum of a one-hot), hence its
     sorted row; writes both directions: sorted_assign[row] = a (the gather index, -1 on padding
     rows) and assign_row[a] = row (the scatter index; it inverts the gather index).
Buffers are sized by static upper bounds (N + E*(BLOCK_M - 1) rows, cdiv(that, BLOCK_M) tiles)
so nothing is read back to the host; tiles past the work get expert -1 and their GEMM programs
exit at once.

Legend: T tokens, E experts, K experts per token, N = T*K assignments, R = padded rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



def _block_a(block_e: int) -> int:
    # Assignments per histogram/scatter program: the (BLOCK_A, E) one-hot stays at <= 16K values
    # (256 x 64 for MolmoE), in registers.
    return max(16, min(256, 16384 // block_e))


# ----------------------------------------------------------------------------- router


@triton.jit
def _route_fwd_kernel(logits_ptr, w_ptr, idx_ptr, probs_ptr, lse_ptr, T, E, s_lt,
                      K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, RENORM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    logit = tl.load(logits_ptr + rows[:, None] * s_lt + cols[None, :], mask=ok,
                    other=float("-inf")).to(tl.float32)
    m = tl.max(logit, axis=1)
    m = tl.where(row_ok, m, 0.0)  # rows past T are all -inf: avoid -inf - -inf
    ex = tl.exp(logit - m[:, None])
    s = tl.sum(ex, axis=1)
    s = tl.where(row_ok, s, 1.0)
    p = ex / s[:, None]  # (BLOCK_T, BLOCK_E) fp32, as torch.softmax(..., dtype=float32)
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=ok)
    tl.store(lse_ptr + rows, m + tl.log(s), mask=row_ok)

    # Top-K by K argmax passes. Probabilities are >= 0, so -1 marks padding columns and -2 marks
    # experts already taken: neither is ever chosen while a real expert is left (K <= E).
    cand = tl.where(col_ok[None, :], p, -1.0)
    slots = tl.arange(0, K_PAD)
    w_tk = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    i_tk = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for k in tl.static_range(K):
        best = tl.max(cand, axis=1)
        j = tl.argmax(cand, axis=1, tie_break_left=True)  # lowest index among equal maxima
        w_tk = tl.where(slots[None, :] == k, best[:, None], w_tk)
        i_tk = tl.where(slots[None, :] == k, j[:, None].to(tl.int32), i_tk)
        cand = tl.where(cols[None, :] == j[:, None], -2.0, cand)
    if RENORM:
        w_tk = w_tk / tl.where(row_ok, tl.sum(w_tk, axis=1), 1.0)[:, None]
    out = rows[:, None] * K + slots[None, :]
    sok = row_ok[:, None] & (slots < K)[None, :]
    tl.store(w_ptr + out, w_tk, mask=sok)
    tl.store(idx_ptr + out, i_tk, mask=sok)


@triton.jit
def _route_bwd_kernel(probs_ptr, idx_ptr, dw_ptr, dprobs_ptr, dlse_ptr, dlogits_ptr, T, E,
                      K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                      RENORM: tl.constexpr, HAS_DPROBS: tl.constexpr, HAS_DLSE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols < E)[None, :]
    p = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=ok, other=0.0)
    # g = dL/dp: the probabilities' own gradient (load-balancing loss) plus the top-K weights'.
    if HAS_DPROBS:
        g = tl.load(dprobs_ptr + rows[:, None] * E + cols[None, :], mask=ok, other=0.0)
    else:
        g = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    if RENORM:
        # w_k = p_k / S, S = sum of the selected p: dp_k = (dw_k - sum_j dw_j w_j) / S.
        s_sel = tl.zeros([BLOCK_T], tl.float32)
        dwp = tl.zeros([BLOCK_T], tl.float32)
        for k in tl.static_range(K):
            j = tl.load(idx_ptr + rows * K + k, mask=row_ok, other=0)
            dw = tl.load(dw_ptr + rows * K + k, mask=row_ok, other=0.0)
            pk = tl.sum(tl.where(cols[None, :] == j[:, None], p, 0.0), axis=1)
            s_sel += pk
            dwp += dw * pk
        s_sel = tl.where(row_ok, s_sel, 1.0)
        shift = dwp / s_sel
    for k in tl.static_range(K):
        j = tl.load(idx_ptr + rows * K + k, mask=row_ok, other=0)
        dw = tl.load(dw_ptr + rows * K + k, mask=row_ok, other=0.0)
        if RENORM:
            dw = (dw - shift) / s_sel
        g += tl.where(cols[None, :] == j[:, None], dw[:, None], 0.0)
    # softmax backward: dl = p * (g - sum(g p)); lse backward: dl += dlse * p
    dl = p * (g - tl.sum(g * p, axis=1)[:, None])
    if HAS_DLSE:
        dl += tl.load(dlse_ptr + rows, mask=row_ok, other=0.0)[:, None] * p
    tl.store(dlogits_ptr + rows[:, None] * E + cols[None, :],
             dl.to(dlogits_ptr.dtype.element_ty), mask=ok)


def _route_block_t(E: int) -> int:
    # ~4K fp32 values per program: enough rows to amortise, few enough to stay in registers.
    return max(1, min(64, 4096 // triton.next_power_of_2(E)))


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool):
    """logits (T, E) -> topk_w (T, K) fp32, topk_idx (T, K) int32, probs (T, E) fp32, lse (T,)."""
    T, E = logits_TE.shape
    dev = logits_TE.device
    topk_w = torch.empty(T, top_k, device=dev, dtype=torch.float32)
    topk_idx = torch.empty(T, top_k, device=dev, dtype=torch.int32)
    probs = torch.empty(T, E, device=dev, dtype=torch.float32)
    lse = torch.empty(T, device=dev, dtype=torch.float32)
    if T == 0:
        return topk_w, topk_idx, probs, lse
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    bt = _route_block_t(E)
    _route_fwd_kernel[(triton.cdiv(T, bt),)](
        logits_TE, topk_w, topk_idx, probs, lse, T, E, logits_TE.stride(0),
        K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=bt,
        BLOCK_E=triton.next_power_of_2(E), RENORM=renormalize)
    return topk_w, topk_idx, probs, lse


def route_backward(probs, topk_idx, d_topk_w, d_probs, d_lse, renormalize, logits_dtype):
    """Gradient of the router's logits from those of topk_w, probs and lse (each may be None)."""
    T, E = probs.shape
    K = topk_idx.shape[1]
    dlogits = torch.empty(T, E, device=probs.device, dtype=logits_dtype)
    if T == 0:
        return dlogits
    d_topk_w = (d_topk_w.float().contiguous() if d_topk_w is not None
                else probs.new_zeros(T, K))
    d_probs = d_probs.float().contiguous() if d_probs is not None else None
    d_lse = d_lse.float().contiguous() if d_lse is not None else None
    bt = _route_block_t(E)
    _route_bwd_kernel[(triton.cdiv(T, bt),)](
        probs, topk_idx, d_topk_w, d_probs if d_probs is not None else probs,
        d_lse if d_lse is not None else probs, dlogits, T, E, K=K, BLOCK_T=bt,
        BLOCK_E=triton.next_power_of_2(E), RENORM=renormalize, HAS_DPROBS=d_probs is not None,
        HAS_DLSE=d_lse is not None)
    return dlogits


# ----------------------------------------------------------------------------- permutation


@triton.jit
def _histogram_kernel(idx_ptr, chunk_counts_ptr, N, E, BLOCK_A: tl.constexpr,
                      BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    a = chunk * BLOCK_A + tl.arange(0, BLOCK_A)
    e = tl.load(idx_ptr + a, mask=a < N, other=-1)
    cols = tl.arange(0, BLOCK_E)
    hit = (e[:, None] == cols[None, :]).to(tl.int32)  # (BLOCK_A, BLOCK_E) one-hot
    tl.store(chunk_counts_ptr + chunk * E + cols, tl.sum(hit, axis=0), mask=cols < E)


@triton.jit
def _offsets_kernel(chunk_counts_ptr, chunk_base_ptr, counts_ptr, expert_start_ptr,
                    tile_expert_ptr, num_chunks, E, num_tiles, BLOCK_M: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_TILES: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    run = tl.zeros([BLOCK_E], tl.int32)
    # Exclusive prefix sum over chunks, per expert, BLOCK_C chunks a step (a chunk at a time
    # would be 512 dependent round trips to memory at 16K tokens).
    for c0 in range(0, num_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = (cs < num_chunks)[:, None] & col_ok[None, :]
        cc = tl.load(chunk_counts_ptr + cs[:, None] * E + cols[None, :], mask=ok, other=0)
        before = tl.cumsum(cc, axis=0) - cc
        tl.store(chunk_base_ptr + cs[:, None] * E + cols[None, :], run[None, :] + before, mask=ok)
        run += tl.sum(cc, axis=0)
    tl.store(counts_ptr + cols, run, mask=col_ok)
    padded = (run + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # padding columns add 0
    tl.store(expert_start_ptr + cols, ends - padded, mask=col_ok)
    # Row r belongs to expert #{e : end_e <= r} (empty experts end where the previous one does);
    # a tile starting at or past the last end gets -1: its GEMM programs exit.
    for t0 in range(0, num_tiles, BLOCK_TILES):
        tiles = t0 + tl.arange(0, BLOCK_TILES)
        first_row = tiles * BLOCK_M
        owner = tl.sum(((ends[None, :] <= first_row[:, None]) & col_ok[None, :]).to(tl.int32),
                       axis=1)
        tl.store(tile_expert_ptr + tiles, tl.where(owner < E, owner, -1), mask=tiles < num_tiles)


@triton.jit
def _scatter_kernel(idx_ptr, chunk_base_ptr, expert_start_ptr, sorted_assign_ptr,
                    assign_row_ptr, N, E, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    a = chunk * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < N
    e = tl.load(idx_ptr + a, mask=a_ok, other=-1)
    cols = tl.arange(0, BLOCK_E)
    hit = (e[:, None] == cols[None, :]).to(tl.int32)
    before = tl.cumsum(hit, axis=0) - hit  # same-expert assignments earlier in this chunk
    rank = tl.sum(before * hit, axis=1)
    e_safe = tl.where(a_ok, e, 0)
    row = (tl.load(expert_start_ptr + e_safe, mask=a_ok, other=0)
           + tl.load(chunk_base_ptr + chunk * E + e_safe, mask=a_ok, other=0) + rank)
    tl.store(assign_row_ptr + a, row, mask=a_ok)
    tl.store(sorted_assign_ptr + row, a, mask=a_ok)


def padded_rows_bound(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the padded sorted rows, N + E*(BLOCK_M - 1), in whole tiles."""
    return triton.cdiv(num_assignments + num_experts * (block_m - 1), block_m) * block_m


def permute(topk_idx_TK: torch.Tensor, num_experts: int, block_m: int):
    """Sort the T*K assignments by expert, stable, rows padded per expert to `block_m`.

    Returns (int32 tensors, sizes from shapes only):
      counts (E,)          assignments per expert
      expert_start (E,)    first padded row of each expert
      sorted_assign (R,)   gather index: sorted row -> assignment a = t*K + k, -1 on padding
      assign_row (N,)      scatter index: assignment -> sorted row (inverts sorted_assign)
      tile_expert (R/BM,)  expert of each BLOCK_M row tile, -1 past the work
    with R = N + E*(block_m - 1) rounded up to whole tiles.
    """
    N = topk_idx_TK.numel()
    E = num_experts
    dev = topk_idx_TK.device
    R = padded_rows_bound(N, E, block_m)
    num_tiles = R // block_m
    counts = torch.empty(E, device=dev, dtype=torch.int32)
    expert_start = torch.empty(E, device=dev, dtype=torch.int32)
    sorted_assign = torch.full((R,), -1, device=dev, dtype=torch.int32)
    assign_row = torch.empty(N, device=dev, dtype=torch.int32)
    tile_expert = torch.empty(num_tiles, device=dev, dtype=torch.int32)
    idx = topk_idx_TK.reshape(-1)
    idx = idx if idx.dtype == torch.int32 else idx.to(torch.int32)
    block_e = triton.next_power_of_2(E)
    block_a = _block_a(block_e)
    num_chunks = triton.cdiv(N, block_a)
    chunk_counts = torch.empty(max(num_chunks, 1), E, device=dev, dtype=torch.int32)
    chunk_base = torch.empty_like(chunk_counts)
    if num_chunks:
        _histogram_kernel[(num_chunks,)](idx, chunk_counts, N, E, BLOCK_A=block_a,
                                         BLOCK_E=block_e)
    _offsets_kernel[(1,)](chunk_counts, chunk_base, counts, expert_start, tile_expert,
                          num_chunks, E, num_tiles, BLOCK_M=block_m, BLOCK_E=block_e,
                          BLOCK_C=max(1, 4096 // block_e),
                          BLOCK_TILES=max(16, min(256, 8192 // block_e)))
    if num_chunks:
        _scatter_kernel[(num_chunks,)](idx, chunk_base, expert_start, sorted_assign, assign_row,
                                       N, E, BLOCK_A=block_a, BLOCK_E=block_e)
    return counts, expert_start, sorted_assign, assign_row, tile_expert
