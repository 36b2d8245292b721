"""The @triton.jit kernels of `molmoe.kernels.attention` (read that file's header first).

Legend: B batch, Hq query heads, Hkv kv heads, G = Hq / Hkv, Sq queries, Sk keys, Dh head dim,
BM / BN query / key tile rows. off = Sk - Sq: query i sits at key position off + i.

Per-token metadata, precomputed on the device by the launcher (no host sync):
    blk    (B, Sk) int32  image block id, -1 for text
    bfirst (B, Sk) int32  first / last key position of the token's block (itself for text),
    blast  (B, Sk) int32  within its packed sequence
    seqs, seqe (Sk,) int32  start / end of the token's packed sequence (cu_seqlens, B == 1)
    kfirst, klast (B,) int32  first attendable key / one past the last (key padding)
    kpm    (B, Sk) uint8  key padding mask, 1 = attend

All scores are kept in log2 units (s * scale * log2 e) so the softmax uses exp2. The scale is
not applied to the score tile on its own: the row max is taken on the raw scores and scaled
(scale > 0, checked by the launcher), and each probability is exp2(fma(s, scale * log2 e, -m)),
one multiply-add per score (forward, dq and dk/dv alike). lse is stored in log2 units; a row
with no key to attend stores lse = +inf, which makes every recomputed probability exactly 0 in
the backward pass (zero gradients, no NaN).

Padding rows of a query tile (past Sq) take the positions after the last query (off + row):
never stored, they see at least the keys the last row sees, so without sequence bounds or key
padding no row of a tile is ever fully masked and the forward needs no guard against a row
max of -inf (`_fwd_tile` compiles that guard only with HAS_SEQ or HAS_KPM).
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: IEEE fp32 products (the reference is fp32 SDPA), not TF32.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _allowed(rows_pos, q_blk, q_seq, cols, col_ok, b, Sk, blk_ptr, seqs_ptr, kpm_ptr,
             CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr,
             HAS_KPM: tl.constexpr):
    """(BM, BN) bool: (causal OR same image) AND same sequence AND key not padding AND col_ok."""
    ok = col_ok[None, :]  # (1, BN) until a row-dependent mask joins (every row is real)
    if CAUSAL:
        allow = cols[None, :] <= rows_pos[:, None]
        if HAS_BLOCKS:
            k_blk = tl.load(blk_ptr + b * Sk + cols, mask=col_ok, other=-1)
            allow = allow | ((q_blk[:, None] == k_blk[None, :]) & (q_blk[:, None] >= 0))
        ok = ok & allow
    if HAS_SEQ:
        k_seq = tl.load(seqs_ptr + cols, mask=col_ok, other=-1)
        ok = ok & (q_seq[:, None] == k_seq[None, :])
    if HAS_KPM:
        pad = tl.load(kpm_ptr + b * Sk + cols, mask=col_ok, other=0)
        ok = ok & (pad != 0)[None, :]
    return ok


@triton.jit
def _q_tile_setup(b, m0, Sq, Sk, blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_KPM: tl.constexpr):
    """Key range of one query tile: [lo, mid) fully allowed (no mask), [mid, hi) masked.

    Everything outside [lo, hi) is empty for every row of the tile and is never visited: keys
    past the causal limit unless an image block reaches them (blast), keys of other packed
    sequences, leading / trailing key padding.
    """
    off = Sk - Sq
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    rows_pos = off + rows  # padding rows (past Sq, never stored) sit after the last query
    p_first = off + m0
    p_last = off + tl.minimum(m0 + BLOCK_M, Sq) - 1
    lo = p_first * 0
    hi = lo + Sk
    full_end = hi
    q_seq = rows_pos
    q_blk = rows_pos
    if HAS_SEQ:
        lo = tl.load(seqs_ptr + p_first)
        hi = tl.load(seqe_ptr + p_last)
        # A tile straddling two sequences has no fully allowed key tile.
        full_end = tl.where(tl.load(seqs_ptr + p_last) == lo, hi, lo)
        q_seq = tl.load(seqs_ptr + rows_pos, mask=row_ok, other=-2)
    if CAUSAL:
        reach = p_last + 1
        if HAS_BLOCKS:
            q_blk = tl.load(blk_ptr + b * Sk + rows_pos, mask=row_ok, other=-1)
            last = tl.load(blast_ptr + b * Sk + rows_pos, mask=row_ok, other=0)
            reach = tl.maximum(reach, tl.max(last, axis=0) + 1)
        hi = tl.minimum(hi, reach)
        full_end = tl.minimum(full_end, p_first + 1)  # keys <= the first row's position
    if HAS_KPM:
        lo = tl.maximum(lo, tl.load(kfirst_ptr + b))
        hi = tl.minimum(hi, tl.load(klast_ptr + b))
    full_end = tl.minimum(full_end, hi)
    mid = lo + tl.maximum(full_end - lo, 0) // BLOCK_N * BLOCK_N
    return rows, row_ok, rows_pos, q_blk, q_seq, lo, mid, hi, p_last


@triton.jit
def _block_range(q_blk, row_ok):
    """[min, max] of the tile's image block ids (empty range [2^30, -1] for an all-text tile)."""
    img = row_ok & (q_blk >= 0)
    return (tl.min(tl.where(img, q_blk, 1 << 30), axis=0),
            tl.max(tl.where(img, q_blk, -1), axis=0))


@triton.jit
def _reaches(start, p_last, cols, col_ok, b, Sk, blk_ptr, bmin, bmax):
    """Whether a key tile holds anything for this query tile: it starts within the causal reach
    of the last row, or one of its keys carries an image block id in the tile's range."""
    k_blk = tl.load(blk_ptr + b * Sk + cols, mask=col_ok, other=-1)
    hit = tl.max(((k_blk >= bmin) & (k_blk <= bmax)).to(tl.int32), axis=0)
    return (start <= p_last) | (hit > 0)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _kv_tile_scores(q, k_base, v_base, sk_s, sv_s, start, hi, dims, rows_pos, q_blk, q_seq, b,
                    Sk, blk_ptr, seqs_ptr, kpm_ptr,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_KPM: tl.constexpr,
                    IEEE: tl.constexpr, TMA: tl.constexpr = False):
    """K and V of the key tile at `start` and the masked raw scores q k^T (BM, BN), unscaled
    (the caller scales them inside its exp2's multiply-add), -inf where not allowed; shared by
    the forward and the dq pass, which must visit
    and mask key tiles identically. TMA: k_base / v_base are tensor descriptors of this head's
    (Sk, Dh) keys / values (a bulk copy per tile, rows past Sk read as zeros; keys in [hi, Sk)
    are real and masked by the scores like any other)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    if TMA:
        k = k_base.load([start, 0])
        v = v_base.load([start, 0])
    elif MASKED:
        k = tl.load(k_base + cols[:, None] * sk_s + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_s + dims[None, :], mask=col_ok[:, None], other=0.0)
    else:  # a whole tile inside [lo, mid): no bounds to check
        k = tl.load(k_base + cols[:, None] * sk_s + dims[None, :])
        v = tl.load(v_base + cols[:, None] * sv_s + dims[None, :])
    s = _dot(q, tl.trans(k), IEEE)
    if MASKED:
        ok = _allowed(rows_pos, q_blk, q_seq, cols, col_ok, b, Sk, blk_ptr, seqs_ptr, kpm_ptr,
                      CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM)
        s = tl.where(ok, s, float("-inf"))
    elif HAS_KPM:  # the only mask a fully allowed tile can still carry
        pad = tl.load(kpm_ptr + b * Sk + cols)
        s = tl.where((pad != 0)[None, :], s, float("-inf"))
    return k, v, s


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, start, hi, dims, rows_pos, q_blk,
              q_seq, b, Sk, qk_scale, blk_ptr, seqs_ptr, kpm_ptr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_KPM: tl.constexpr,
              IEEE: tl.constexpr, TMA: tl.constexpr):
    k, v, s = _kv_tile_scores(q, k_base, v_base, sk_s, sv_s, start, hi, dims, rows_pos, q_blk,
                              q_seq, b, Sk, blk_ptr, seqs_ptr, kpm_ptr, BLOCK_N, MASKED,
                              CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM, IEEE, TMA)
    # max(s) * c == max(s * c) for c > 0 (rounding is monotonic): the row max in log2 units
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    if HAS_SEQ or HAS_KPM:
        # Another sequence's keys or key padding can mask a row's every key so far: m stays
        # -inf; subtract 0 instead to avoid inf - inf. Without them no row is ever empty
        # (header), and this select is not compiled.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(tl.fma(s, qk_scale, -m_new[:, None]))  # scale and max subtraction: one FMA
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr, kpm_ptr, count_ptr,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    Hq, Sq, Sk, scale, BH,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_KPM: tl.constexpr, IEEE: tl.constexpr, COUNT_TILES: tl.constexpr,
    TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
):
    """TMA: q, k, v and o are read and written through tensor descriptors (Hopper's bulk
    copies: cp.async.bulk.tensor), one (rows, Dh) descriptor per head; the launcher sets it
    where the bases and row strides are 16-byte aligned, else the pointer loads run.

    PERSISTENT (plain causal: no packed sequences, image blocks or key padding): a fixed grid
    strides over all (query tile, batch x head) tiles, longest first: tile g is query tile
    n_m - 1 - g // BH of head g % BH, so the tiles with the most keys (the last query tiles of
    every head) start first and the short ones fill the end, instead of the launch order
    leaving the longest tiles for last. Otherwise one program per tile, grid (n_m, BH)."""
    n_m = tl.cdiv(Sq, BLOCK_M)
    if PERSISTENT:
        for g in range(tl.program_id(0), n_m * BH, tl.num_programs(0)):
            _attn_fwd_tile(
                n_m - 1 - g // BH, g % BH, n_m, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr, kpm_ptr, count_ptr,
                sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
                Hq, Sq, Sk, scale, G, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_BLOCKS, HAS_SEQ,
                HAS_KPM, IEEE, COUNT_TILES, TMA)
    else:
        _attn_fwd_tile(
            tl.program_id(0), tl.program_id(1), n_m, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
            blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr, kpm_ptr, count_ptr,
            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
            Hq, Sq, Sk, scale, G, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, HAS_BLOCKS, HAS_SEQ,
            HAS_KPM, IEEE, COUNT_TILES, TMA)


@triton.jit
def _attn_fwd_tile(
    m_tile, bh, n_m, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr, kpm_ptr, count_ptr,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
    Hq, Sq, Sk, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_KPM: tl.constexpr, IEEE: tl.constexpr, COUNT_TILES: tl.constexpr, TMA: tl.constexpr,
):
    """Query tile m_tile of batch x head bh (`_attn_fwd_kernel`)."""
    b = bh // Hq
    h = bh % Hq
    hkv = h // G  # GQA: kv head hkv serves q heads [hkv*G, (hkv+1)*G)
    m0 = m_tile * BLOCK_M
    rows, row_ok, rows_pos, q_blk, q_seq, lo, mid, hi, p_last = _q_tile_setup(
        b, m0, Sq, Sk, blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr,
        BLOCK_M, BLOCK_N, CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM)
    dims = tl.arange(0, HEAD_DIM)
    # int64: b * stride passes 2^31 elements in big batches (32 x 16 heads x 32k x 128)
    b64, h64, hkv64 = b.to(tl.int64), h.to(tl.int64), hkv.to(tl.int64)
    if TMA:
        q_desc = tl.make_tensor_descriptor(q_ptr + (b64 * sq_b + h64 * sq_h), shape=[Sq, HEAD_DIM],
                                           strides=[sq_s, 1], block_shape=[BLOCK_M, HEAD_DIM])
        q = q_desc.load([m0, 0])  # (BM, Dh); rows past Sq read as zeros
        k_base = tl.make_tensor_descriptor(k_ptr + (b64 * sk_b + hkv64 * sk_h),
                                           shape=[Sk, HEAD_DIM], strides=[sk_s, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_base = tl.make_tensor_descriptor(v_ptr + (b64 * sv_b + hkv64 * sv_h),
                                           shape=[Sk, HEAD_DIM], strides=[sv_s, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    else:
        q = tl.load(q_ptr + (b64 * sq_b + h64 * sq_h) + rows[:, None] * sq_s + dims[None, :],
                    mask=row_ok[:, None], other=0.0)  # (BM, Dh)
        k_base = k_ptr + (b64 * sk_b + hkv64 * sk_h)
        v_base = v_ptr + (b64 * sv_b + hkv64 * sv_h)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    visited = 0
    # Stage 1: key tiles every row may fully attend (causal past, one sequence): no mask.
    for start in range(lo, mid, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, start, hi, dims,
                                  rows_pos, q_blk, q_seq, b, Sk, qk_scale, blk_ptr, seqs_ptr,
                                  kpm_ptr, BLOCK_N, False, CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM,
                                  IEEE, TMA)
        visited += 1
    # Stage 2: the diagonal, sequence edges and the keys only image blocks reach: masked.
    # Past the causal limit of the last row, a key tile without any of this tile's image
    # block ids is empty and is skipped.
    if CAUSAL and HAS_BLOCKS:
        bmin, bmax = _block_range(q_blk, row_ok)
        for start in range(mid, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            if _reaches(start, p_last, cols, cols < hi, b, Sk, blk_ptr, bmin, bmax):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, start,
                                          hi, dims, rows_pos, q_blk, q_seq, b, Sk, qk_scale,
                                          blk_ptr, seqs_ptr, kpm_ptr, BLOCK_N, True, CAUSAL,
                                          HAS_BLOCKS, HAS_SEQ, HAS_KPM, IEEE, TMA)
                visited += 1
    else:
        for start in range(mid, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, start, hi,
                                      dims, rows_pos, q_blk, q_seq, b, Sk, qk_scale, blk_ptr,
                                      seqs_ptr, kpm_ptr, BLOCK_N, True, CAUSAL, HAS_BLOCKS,
                                      HAS_SEQ, HAS_KPM, IEEE, TMA)
            visited += 1

    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows without a key: acc = 0 -> zeros
    if TMA:  # rows past Sq are not written (the bulk store clips at the descriptor's shape)
        o_desc = tl.make_tensor_descriptor(o_ptr + (b64 * so_b + h64 * so_h), shape=[Sq, HEAD_DIM],
                                           strides=[so_s, 1], block_shape=[BLOCK_M, HEAD_DIM])
        o_desc.store([m0, 0], o.to(o_ptr.dtype.element_ty))
    else:
        tl.store(o_ptr + (b64 * so_b + h64 * so_h) + rows[:, None] * so_s + dims[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * Sq + rows, lse, mask=row_ok)
    if COUNT_TILES:
        tl.store(count_ptr + bh * n_m + m_tile, visited)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s,
                           Hq, Sq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """FlashAttention-2's preprocessing: delta_i = sum_d o_id do_id (= sum_j p_ij dp_ij), in
    fp32, for BLOCK_M rows of one (batch, q head); delta is (B, Hq, Sq) contiguous. Reads o and
    do once in their own dtype (no fp32 copies of them)."""
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    dims = tl.arange(0, HEAD_DIM)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)  # int64 bases, as the other kernels
    o = tl.load(o_ptr + (b64 * so_b + h64 * so_h) + rows[:, None] * so_s + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + (b64 * sdo_b + h64 * sdo_h) + rows[:, None] * sdo_s + dims[None, :],
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * Sq + rows, delta, mask=row_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, start, hi, dims, rows_pos,
             q_blk, q_seq, b, Sk, qk_scale, blk_ptr, seqs_ptr, kpm_ptr,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_KPM: tl.constexpr,
             IEEE: tl.constexpr):
    k, v, s = _kv_tile_scores(q, k_base, v_base, sk_s, sv_s, start, hi, dims, rows_pos, q_blk,
                              q_seq, b, Sk, blk_ptr, seqs_ptr, kpm_ptr, BLOCK_N, MASKED,
                              CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM, IEEE)
    # (BM, BN); 0 where masked or for rows with lse = +inf; scale and lse: one FMA
    p = tl.exp2(tl.fma(s, qk_scale, -lse[:, None]))
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
    blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr, kpm_ptr,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
    sdq_b, sdq_h, sdq_s, Hq, Sq, Sk, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_KPM: tl.constexpr, IEEE: tl.constexpr,
):
    """dq = scale * sum_j ds_ij k_j over the same key tiles the forward visited."""
    m_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hkv = h // G
    m0 = m_tile * BLOCK_M
    rows, row_ok, rows_pos, q_blk, q_seq, lo, mid, hi, p_last = _q_tile_setup(
        b, m0, Sq, Sk, blk_ptr, blast_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr,
        BLOCK_M, BLOCK_N, CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM)
    dims = tl.arange(0, HEAD_DIM)
    b64, h64, hkv64 = b.to(tl.int64), h.to(tl.int64), hkv.to(tl.int64)  # as the forward
    q = tl.load(q_ptr + (b64 * sq_b + h64 * sq_h) + rows[:, None] * sq_s + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + (b64 * sdo_b + h64 * sdo_h) + rows[:, None] * sdo_s + dims[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Sq + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * Sq + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + (b64 * sk_b + hkv64 * sk_h)
    v_base = v_ptr + (b64 * sv_b + hkv64 * sv_h)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, mid, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, start, hi, dims,
                      rows_pos, q_blk, q_seq, b, Sk, qk_scale, blk_ptr, seqs_ptr, kpm_ptr,
                      BLOCK_N, False, CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM, IEEE)
    if CAUSAL and HAS_BLOCKS:
        bmin, bmax = _block_range(q_blk, row_ok)
        for start in range(mid, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            if _reaches(start, p_last, cols, cols < hi, b, Sk, blk_ptr, bmin, bmax):
                dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, start, hi,
                              dims, rows_pos, q_blk, q_seq, b, Sk, qk_scale, blk_ptr, seqs_ptr,
                              kpm_ptr, BLOCK_N, True, CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM,
                              IEEE)
    else:
        for start in range(mid, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, start, hi, dims,
                          rows_pos, q_blk, q_seq, b, Sk, qk_scale, blk_ptr, seqs_ptr, kpm_ptr,
                          BLOCK_N, True, CAUSAL, HAS_BLOCKS, HAS_SEQ, HAS_KPM, IEEE)
    dq = dq * scale
    tl.store(dq_ptr + (b64 * sdq_b + h64 * sdq_h) + rows[:, None] * sdq_s + dims[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_s, sdo_s, m0, q_hi, off,
               dims, cols, col_ok, k_blk, k_seq, b, Sk, qk_scale, blk_ptr, seqs_ptr,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr, IEEE: tl.constexpr):
    """One query tile's contribution to the key tile's dk, dv (scores transposed: (BN, BM)).

    Rows past q_hi are not loaded: lse = +inf makes their probabilities 0. Key columns are
    independent here, so padding keys are zeroed once at the end instead of masked per tile.
    """
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_hi
    q = tl.load(q_base + rows[:, None] * sq_s + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * sdo_s + dims[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    s_t = _dot(k, tl.trans(q), IEEE)  # (BN, BM), raw: scaled in the exp2's FMA
    if MASKED:
        pos = off + rows
        ok = row_ok[None, :] & col_ok[:, None]
        if CAUSAL:
            allow = cols[:, None] <= pos[None, :]
            if HAS_BLOCKS:
                q_blk = tl.load(blk_ptr + b * Sk + pos, mask=row_ok, other=-1)
                allow = allow | ((k_blk[:, None] == q_blk[None, :]) & (k_blk[:, None] >= 0))
            ok = ok & allow
        if HAS_SEQ:
            q_seq = tl.load(seqs_ptr + pos, mask=row_ok, other=-2)
            ok = ok & (k_seq[:, None] == q_seq[None, :])
        s_t = tl.where(ok, s_t, float("-inf"))
    p_t = tl.exp2(tl.fma(s_t, qk_scale, -lse[None, :]))  # (BN, BM)
    dv = dv + _dot(p_t.to(do.dtype), do, IEEE)
    dp_t = _dot(v, tl.trans(do), IEEE)  # (BN, BM)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dk + _dot(ds_t.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr,
    blk_ptr, bfirst_ptr, seqs_ptr, seqe_ptr, kfirst_ptr, klast_ptr, kpm_ptr, count_ptr,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
    sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s,
    Hkv, Sq, Sk, scale,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_KPM: tl.constexpr, IEEE: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """dk, dv of one key tile of one kv head, summed over its G query heads in registers (no
    atomics): the query tiles that can reach the key tile are [q_lo, q_hi); from q_full on every
    row attends every key of the tile, so those tiles run without a mask."""
    n_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hkv = bh % Hkv
    off = Sk - Sq
    n0 = n_tile * BLOCK_N
    n_last = tl.minimum(n0 + BLOCK_N, Sk) - 1
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Sk
    dims = tl.arange(0, HEAD_DIM)
    b64, hkv64 = b.to(tl.int64), hkv.to(tl.int64)  # int64 bases, as the forward
    k = tl.load(k_ptr + (b64 * sk_b + hkv64 * sk_h) + cols[:, None] * sk_s + dims[None, :],
                mask=col_ok[:, None], other=0.0)  # (BN, Dh)
    v = tl.load(v_ptr + (b64 * sv_b + hkv64 * sv_h) + cols[:, None] * sv_s + dims[None, :],
                mask=col_ok[:, None], other=0.0)

    q_lo = n0 * 0
    q_hi = q_lo + Sq
    q_full = q_lo  # first query index that attends every key of this tile
    k_blk = cols
    k_seq = cols
    if HAS_SEQ:  # B == 1, Sq == Sk, off == 0
        s_lo = tl.load(seqs_ptr + n0)
        q_lo = s_lo
        q_hi = tl.load(seqe_ptr + n_last)
        q_full = tl.where(tl.load(seqs_ptr + n_last) == s_lo, s_lo, q_hi)
        k_seq = tl.load(seqs_ptr + cols, mask=col_ok, other=-1)
    if CAUSAL:
        first_pos = n0
        if HAS_BLOCKS:  # earlier queries of the same image reach back to this tile
            k_blk = tl.load(blk_ptr + b * Sk + cols, mask=col_ok, other=-1)
            first = tl.load(bfirst_ptr + b * Sk + cols, mask=col_ok, other=Sk)
            first_pos = tl.minimum(first_pos, tl.min(first, axis=0))
        q_lo = tl.maximum(q_lo, first_pos - off)
        q_full = tl.maximum(q_full, n_last - off)
    if HAS_KPM:  # a key tile wholly in leading / trailing padding gets no gradient
        empty = (tl.load(klast_ptr + b) <= n0) | (tl.load(kfirst_ptr + b) > n_last)
        q_hi = tl.where(empty, q_lo, q_hi)
    q_lo = tl.maximum(q_lo, 0)
    q_full = tl.minimum(tl.maximum(q_full, q_lo), q_hi)
    q_mid = q_lo + tl.cdiv(q_full - q_lo, BLOCK_M) * BLOCK_M  # masked tiles cover [q_lo, q_full)

    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    visited = q_lo * 0
    if CAUSAL and HAS_BLOCKS:
        kb_min, kb_max = _block_range(k_blk, col_ok)
    # The G query heads are folded into the query-tile loops, (head, tile) pairs in one flat
    # loop per stage, rather than an outer loop over heads around them: a nested loop kept
    # the inner loops' invariants live across the outer one, and dk/dv spilled on sm_90.
    n_masked = tl.maximum(q_mid - q_lo, 0) // BLOCK_M  # q_mid - q_lo: a multiple of BLOCK_M
    n_full = tl.cdiv(tl.maximum(q_hi - q_mid, 0), BLOCK_M)
    # Stage 1: query tiles [q_lo, q_mid) straddle the causal edge / image blocks: masked.
    for t in range(0, G * n_masked):
        g = t // n_masked
        m0 = q_lo + (t - g * n_masked) * BLOCK_M
        h = hkv64 * G + g
        q_base = q_ptr + (b64 * sq_b + h * sq_h)
        do_base = do_ptr + (b64 * sdo_b + h * sdo_h)
        lse_base = lse_ptr + (b64 * Hkv * G + h) * Sq
        delta_base = delta_ptr + (b64 * Hkv * G + h) * Sq
        if CAUSAL and HAS_BLOCKS:
            # Query tiles wholly before the key tile reach it only through an image block.
            rows = m0 + tl.arange(0, BLOCK_M)
            rq_ok = rows < q_hi
            rq_blk = tl.load(blk_ptr + b * Sk + off + rows, mask=rq_ok, other=-1)
            hit = tl.max(((rq_blk >= kb_min) & (rq_blk <= kb_max)).to(tl.int32), axis=0)
            if (off + m0 + BLOCK_M - 1 >= n0) | (hit > 0):
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_s,
                                    sdo_s, m0, q_hi, off, dims, cols, col_ok, k_blk, k_seq, b,
                                    Sk, qk_scale, blk_ptr, seqs_ptr, BLOCK_M, True, CAUSAL,
                                    HAS_BLOCKS, HAS_SEQ, IEEE)
                visited += 1
        else:
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_s, sdo_s,
                                m0, q_hi, off, dims, cols, col_ok, k_blk, k_seq, b, Sk, qk_scale,
                                blk_ptr, seqs_ptr, BLOCK_M, True, CAUSAL, HAS_BLOCKS, HAS_SEQ,
                                IEEE)
            visited += 1
    # Stage 2: query tiles [q_mid, q_hi) attend every key of the tile: no mask.
    for t in range(0, G * n_full):
        g = t // n_full
        m0 = q_mid + (t - g * n_full) * BLOCK_M
        h = hkv64 * G + g
        q_base = q_ptr + (b64 * sq_b + h * sq_h)
        do_base = do_ptr + (b64 * sdo_b + h * sdo_h)
        lse_base = lse_ptr + (b64 * Hkv * G + h) * Sq
        delta_base = delta_ptr + (b64 * Hkv * G + h) * Sq
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_s, sdo_s,
                            m0, q_hi, off, dims, cols, col_ok, k_blk, k_seq, b, Sk, qk_scale,
                            blk_ptr, seqs_ptr, BLOCK_M, False, CAUSAL, HAS_BLOCKS, HAS_SEQ, IEEE)
        visited += 1
    dk = dk * scale
    if HAS_KPM:  # padding keys are never attended: exactly zero gradient
        pad = tl.load(kpm_ptr + b * Sk + cols, mask=col_ok, other=0)
        dk = tl.where((pad != 0)[:, None], dk, 0.0)
        dv = tl.where((pad != 0)[:, None], dv, 0.0)
    tl.store(dk_ptr + (b64 * sdk_b + hkv64 * sdk_h) + cols[:, None] * sdk_s + dims[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + (b64 * sdv_b + hkv64 * sdv_h) + cols[:, None] * sdv_s + dims[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])
    if COUNT_TILES:  # (query head, query tile) pairs computed, summed over the group
        tl.store(count_ptr + bh * tl.num_programs(0) + n_tile, visited)
