"""Decode attention against a KV cache, split along the cache (flash-decoding). Forward only.

What: a few new query tokens per sequence (Sq = 1..~8, causal among themselves, bottom-right
aligned) attend to a KV cache that already holds them:

    q        (B, Hq, Sq, Dh)   the new tokens' queries (post-RoPE)
    k_cache  (B, Hkv, Sk, Dh)  keys (post-RoPE); v_cache the same shape. Hq % Hkv == 0 (GQA: kv head
                               j serves q heads [j*G, (j+1)*G), G = Hq / Hkv)
    cache_seqlens (B,) int32   slots written per sequence (default: Sk for all); query i of
                               sequence b sits at key position cache_seqlens[b] - Sq + i
    key_padding_mask (B, Sk)   bool, True = attend (the engine left-pads prompts)
    ->  o    (B, Hq, Sq, Dh)   in q's dtype; a row with no key to attend gets zeros

Legend: B batch, Hq query heads, Hkv kv heads, G = Hq/Hkv query heads per kv head, Sq new tokens,
Sk cache slots, Dh head dim, P number of splits, M = G*Sq query rows of one program.

How: decoding reads the whole cache for a handful of queries, so it is bound by the bytes of K and
V. Two things keep the GPU fed and those bytes read once:
  * GQA-aware rows: one program takes ALL G query heads of its kv head and all Sq tokens as the
    M = G*Sq rows of one tile, so each K/V tile is loaded once per kv head, not once per q head.
  * Split-K over the cache (flash-decoding; Dao, Haziza, Massa, Sizov 2023): the grid is
    (P, B*Hkv); program (s, b*h) runs online softmax over its chunk of the cache and writes a
    partial (o, lse) in fp32; a second small kernel merges the P partials with their
    log-sum-exps. With B*Hkv small (one long sequence) P splits still fill every SM. P comes from
    `num_splits_heuristic` (static shapes and the SM count only) or MOLMOE_DECODE_ATTENTION_SPLITS;
    with P == 1 the first kernel writes the output directly.
Tile configs (BLOCK_N, warps, stages) come from `kernel_configs`, pruned by `prune_configs`, keyed
on (dtype, Dh, M); MOLMOE_DECODE_ATTENTION_CONFIG pins one, `autotune` times them once up front
(never on the launch path), the interpreter uses one small fixed config.

No host synchronisation on the launch path (grid and P come from shapes, lengths are read on the
device), so the op can be captured in a CUDA graph. Splits past a sequence's length exit at once
and leave lse = -inf, which the combine weights as zero (no NaN from all-padding splits).

Limits: forward only (inference; no autograd is registered). Dh in {64, 128} (any power of two
16..256 works). fp32/fp16/bf16 in, fp32 accumulation; fp32 inputs use IEEE dots, not TF32.
k_cache/v_cache/q need a unit stride on Dh (views of a larger cache are fine).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# this op's reference: the contract's own function (molmoe.ops), re-exported
from molmoe.ops import decode_attention_ref  # noqa: F401
from molmoe.kernels._common import (SMEM_LIMIT, TilePolicy, check_qkv, element_size,
                                    on_interpreter)


_SPLITS_ENV = "MOLMOE_DECODE_ATTENTION_SPLITS"
_CONFIG_ENV = "MOLMOE_DECODE_ATTENTION_CONFIG"  # e.g. "BLOCK_N=64,num_warps=4,num_stages=2"
_MAX_SPLITS = 128
_MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write) dominates


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, kpm_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    sq_b, sq_h, sq_s,  # q strides (Dh stride is 1)
    sk_b, sk_h, sk_n,  # k strides
    sv_b, sv_h, sv_n,  # v strides
    skpm_b, skpm_n,  # key padding mask strides
    so_b, so_h, so_s,  # output strides
    Hkv, Sk, scale, split_len,
    G: tl.constexpr, SQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_SEQLENS: tl.constexpr,
    HAS_KPM: tl.constexpr, IEEE: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride passes 2^31 elements in a big cache (32 x 16 heads x 32k x 128)
    b = (bh // Hkv).to(tl.int64)
    hkv = (bh % Hkv).to(tl.int64)

    # Rows r = g*SQ + i: query head hkv*G + g, new token i. BLOCK_M >= 16 for tl.dot.
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * SQ
    head = hkv * G + rows // SQ
    tok = rows % SQ
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + tok[:, None] * sq_s + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, Dh)

    if HAS_SEQLENS:
        length = tl.load(seqlens_ptr + b).to(tl.int32)
        length = tl.minimum(length, Sk)
    else:
        length = Sk
    q_pos = length - SQ + tok  # (BLOCK_M,) key position of each row's token (causal limit)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    k_base = k_ptr + b * sk_b + hkv * sk_h
    v_base = v_ptr + b * sv_b + hkv * sv_h
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(k_base + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_n + dims[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # (BLOCK_M, BLOCK_N) in log2 units
        ok = col_ok[None, :] & (cols[None, :] <= q_pos[:, None])
        if HAS_KPM:
            pad = tl.load(kpm_ptr + b * skpm_b + cols * skpm_n, mask=col_ok, other=0)
            ok = ok & (pad != 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with every key masked so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows without a key: acc = 0 -> zeros
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b * so_b + head[:, None] * so_h + tok[:, None] * so_s + dims[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Partials laid out (B, Hq, SQ, P, Dh) and (B, Hq, SQ, P), contiguous.
        row_id = (b * Hkv * G + head) * SQ + tok  # index of (b, head, tok) in (B, Hq, SQ)
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row_id * NUM_SPLITS + split, lse, mask=row_ok)
        tl.store(part_o_ptr + (row_id * NUM_SPLITS + split)[:, None] * HEAD_DIM + dims[None, :],
                 o, mask=row_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, Hq, so_b, so_h, so_s,
    SQ: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, head, tok) flattened over (B, Hq, SQ)
    tok = row % SQ
    head = (row // SQ) % Hq
    b = row // (SQ * Hq)
    splits = tl.arange(0, BLOCK_P)
    split_ok = splits < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for empty splits (lse = -inf)
    dims = tl.arange(0, HEAD_DIM)
    o = tl.load(part_o_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
                mask=split_ok[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * so_b + head * so_h + tok * so_s + dims, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------- launch policy


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kernel_configs(on_gpu: bool, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Candidate tile configs. The interpreter gets one small one so tests stay fast. fp32
    caches (IEEE dots run as FMAs, operand tiles in registers) get narrow key tiles on 8-16
    warps: the 16-bit list's tiles spilled there (below, `_FP32_SPILL_FREE`)."""
    if not on_gpu:
        return [dict(BLOCK_N=32, num_warps=1, num_stages=1)]
    if dtype == torch.float32:
        return [dict(BLOCK_N=n, num_warps=w, num_stages=s)
                for n, w, s in ((16, 8, 2), (16, 8, 3), (16, 16, 2), (32, 8, 2), (32, 16, 2),
                                (64, 8, 2), (64, 16, 2))]
    return [dict(BLOCK_N=n, num_warps=w, num_stages=s)
            for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


# fp32 (BLOCK_N, num_warps) that compiled without spills on sm_90 at Dh 128, per query-row tile
# (tests/test_kernels_sm90.py compiles every kept one). Compiled and dropped: every 4-warp tile
# at 16 rows but 64-key ones (312-320 B of stack for 32 keys); at 64 rows 32 keys on 8 warps
# (440 B) and 64 keys on 8 (6,552 B, the old default); at 128 rows every tile tried (224 to
# 7,232 B), so fp32 with more than 64 query rows (G x Sq > 64) has no fitting tile.
_FP32_SPILL_FREE = {16: {(16, 8), (16, 16), (32, 8), (32, 16), (64, 8), (64, 16)},
                    32: {(16, 8), (16, 16), (32, 8), (32, 16)},
                    64: {(16, 8), (16, 16), (64, 16)}}


def fits(c: dict, head_dim: int, block_m: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """K and V stages plus the q tile within sm_90's shared memory at the dtype's element size
    (fp32 caches take twice bf16's bytes); fp32 tiles also among those measured spill-free
    (`_FP32_SPILL_FREE`, Dh <= 128)."""
    elem = element_size(dtype)
    if dtype == torch.float32 and (c["BLOCK_N"], c["num_warps"]) not in _FP32_SPILL_FREE.get(
            block_m, ()):
        return False
    return (2 * c["BLOCK_N"] * head_dim * elem * c["num_stages"]
            + block_m * head_dim * elem) <= SMEM_LIMIT


def prune_configs(configs: list[dict], head_dim: int, block_m: int,
                  dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """The configs that `fit` (the first if none does)."""
    kept = [c for c in configs if fits(c, head_dim, block_m, dtype)]
    return kept or configs[:1]


# ctx: dtype, head_dim, block_m (G*Sq rows rounded up). Decode is bandwidth-bound, so the
# untuned default pipelines 64-key tiles three deep.
POLICY = TilePolicy(
    "decode_attention", _CONFIG_ENV, ("BLOCK_N", "num_warps", "num_stages"),
    example="BLOCK_N=64,num_warps=4,num_stages=2",
    candidates=lambda ctx: kernel_configs(True, ctx["dtype"]),
    fits=lambda c, ctx: fits(c, ctx["head_dim"], ctx["block_m"], ctx["dtype"]),
    default=lambda ctx: dict(BLOCK_N=64, num_warps=4, num_stages=3),
    interpreter=lambda ctx: kernel_configs(False)[0])
_TUNED = POLICY.tuned


def default_config(head_dim: int, block_m: int, on_gpu: bool,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """The tile config for (dtype, Dh, M): pinned names over tuned over the default (`POLICY`).

    The launch path never benchmarks (CUDA-graph capture, first-token latency): call `autotune`
    once at start-up (bench/bench_decode_attention.py --sweep does) to time the pruned configs.
    """
    return POLICY.config(dict(dtype=dtype, head_dim=head_dim, block_m=block_m), on_gpu)


def autotune(q, k_cache, v_cache, **kw) -> dict | None:
    """Time every config that fits for q's dtype on these tensors (GPU only), skipping any that
    fails (out of resources); remember and return the fastest."""
    B, Hq, Sq, Dh = q.shape
    block_m = max(16, triton.next_power_of_2(Hq // k_cache.shape[1] * Sq))
    return POLICY.autotune(dict(dtype=q.dtype, head_dim=Dh, block_m=block_m),
                           lambda: decode_attention(q, k_cache, v_cache, **kw))


def num_splits_heuristic(batch_kv_heads: int, seq_len: int, sm_count: int, block_n: int) -> int:
    """How many chunks to split each (batch, kv head) cache into; static inputs only.

    Enough programs for about two waves over the SMs, but no split shorter than
    _MIN_KEYS_PER_SPLIT keys (each split pays a q load and a partial write), capped at 128.
    MOLMOE_DECODE_ATTENTION_SPLITS pins it.
    """
    pinned = os.environ.get(_SPLITS_ENV)
    if pinned:
        try:
            return max(1, int(pinned))
        except ValueError:
            raise ValueError(f"{_SPLITS_ENV}={pinned!r}: expected a positive integer") from None
    if batch_kv_heads >= sm_count:
        return 1
    want = triton.cdiv(2 * sm_count, batch_kv_heads)
    most = max(1, seq_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(want, most, _MAX_SPLITS, triton.cdiv(seq_len, block_n)))


# ----------------------------------------------------------------------------- launcher


def _check(q, k_cache, v_cache, cache_seqlens, key_padding_mask):
    B, _, _, _, _, Sk = check_qkv("decode_attention", q, k_cache, v_cache, "k_cache", "v_cache")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention: {name} needs unit stride on the head dim, "
                             f"got strides {t.stride()}")
    if cache_seqlens is not None and (cache_seqlens.shape != (B,) or cache_seqlens.dtype not in
                                      (torch.int32, torch.int64)):
        raise ValueError(f"decode_attention: cache_seqlens must be ({B},) int32, got "
                         f"{tuple(cache_seqlens.shape)} {cache_seqlens.dtype}")
    if key_padding_mask is not None and key_padding_mask.shape != (B, Sk):
        raise ValueError(f"decode_attention: key_padding_mask must be ({B}, {Sk}), got "
                         f"{tuple(key_padding_mask.shape)}")


def _launch(q, k_cache, v_cache, cache_seqlens, key_padding_mask, scale, num_splits):
    B, Hq, Sq, Dh = q.shape
    Hkv, Sk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    block_m = max(16, triton.next_power_of_2(G * Sq))
    on_gpu = not on_interpreter(q.device)
    cfg = default_config(Dh, block_m, on_gpu, q.dtype)
    block_n = cfg["BLOCK_N"]
    if num_splits <= 0:
        sms = _sm_count(q.device.index or 0) if on_gpu else 4
        num_splits = num_splits_heuristic(B * Hkv, Sk, sms, block_n)
    # Each split covers a whole number of tiles; recount so no split starts past Sk.
    split_len = triton.cdiv(triton.cdiv(max(Sk, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(Sk, split_len))

    out = torch.empty_like(q)
    if Sk == 0:
        return out.zero_()
    if num_splits > 1:
        part_o = torch.empty(B, Hq, Sq, num_splits, Dh, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(B, Hq, Sq, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_o = part_lse = out  # unused
    seqlens = cache_seqlens if cache_seqlens is not None else out
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool \
            else key_padding_mask
        kpm_strides = kpm.stride()
    else:
        kpm, kpm_strides = out, (0, 0)
    _decode_split_kernel[(num_splits, B * Hkv)](
        q, k_cache, v_cache, seqlens, kpm, out, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        kpm_strides[0], kpm_strides[1],
        out.stride(0), out.stride(1), out.stride(2),
        Hkv, Sk, scale, split_len,
        G=G, SQ=Sq, HEAD_DIM=Dh, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_SEQLENS=cache_seqlens is not None, HAS_KPM=key_padding_mask is not None,
        IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        _decode_combine_kernel[(B * Hq * Sq,)](
            part_o, part_lse, out, Hq, out.stride(0), out.stride(1), out.stride(2),
            SQ=Sq, HEAD_DIM=Dh, NUM_SPLITS=num_splits,
            BLOCK_P=triton.next_power_of_2(num_splits), num_warps=4 if on_gpu else 1,
        )
    return out


# ----------------------------------------------------------------------------- torch.library


@torch.library.custom_op("molmoe::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                         scale: float, num_splits: int) -> torch.Tensor:
    return _launch(q, k_cache, v_cache, cache_seqlens, key_padding_mask, scale, num_splits)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, key_padding_mask, scale, num_splits):
    return torch.empty_like(q)


def decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, key_padding_mask=None,
                     scale=None, num_splits: int | None = None):
    """q (B, Hq, Sq, Dh), k_cache/v_cache (B, Hkv, Sk, Dh) -> (B, Hq, Sq, Dh); see the header.

    num_splits: None picks `num_splits_heuristic`; an int pins it (tests, benchmarks).
    Forward only.
    """
    _check(q, k_cache, v_cache, cache_seqlens, key_padding_mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _decode_attention_op(q, k_cache, v_cache, cache_seqlens, key_padding_mask,
                                float(scale), int(num_splits or 0))
