"""Flash attention for prefill and training (forward + backward) with Molmo's masks.

What: softmax(q k^T * scale + mask) v without ever materialising the score matrix:

    q  (B, Hq, Sq, Dh)   queries; k, v (B, Hkv, Sk, Dh), Hq % Hkv == 0 (GQA: kv head j serves
                         q heads [j*G, (j+1)*G), G = Hq / Hkv), Sq <= Sk
    -> o (B, Hq, Sq, Dh) in q's dtype

Masks, combinable (the contract: molmoe/ops/__init__.py; `attention_ref` is its reference):
    allowed(i, j) = (causal(i, j) OR same_image(i, j)) AND same_seq(i, j) AND key_padding_mask[j]
  * causal, aligned bottom-right: query i sits at key position Sk - Sq + i (chunked prefill
    against a KV cache);
  * image_block_ids (B, Sk) int, -1 text, >= 0 image: same_image(i, j) = block[i] == block[j]
    >= 0, so the tokens of one image attend to each other in both directions. This is Molmo 2's
    mask: transformers `masking_utils.blockwise_overlay`, OR-ed onto the causal mask before
    padding is AND-ed (transformers' `molmo2` passes block_sequence_ids = 0 for every image /
    frame token and -1 for text during prefill, i.e. one block for all images; ids per image
    are the finer case). Molmo 0924 is plain causal (no ids);
  * cu_seqlens (N+1,) int: packed variable-length sequences (B == 1, Sq == Sk), no attention
    across sequences;
  * key_padding_mask (B, Sk) bool, True = attend. A row with no key gets zeros and zero grads.

How (Dao, "FlashAttention-2", 2023; Triton tutorial 06-fused-attention; flash-attn's
flash_attn_triton.py): one program per (query tile, batch, q head) runs online softmax over key
tiles, keeping the running max m, sum l and the output accumulator in fp32 registers (exp2 with
log2 e folded into the scale). Tiles a mask makes empty are skipped, not computed and masked:
  * per query tile, the key range [lo, hi) comes from the causal limit of its last row, the
    farthest key an image block lets any of its rows reach (`blast`, a per-token table), its
    packed sequence's bounds and the leading / trailing key padding; key tiles past the causal
    limit are visited only if they hold one of the tile's image block ids;
  * [lo, mid) are key tiles every row fully attends: no mask math (stage 1); [mid, hi) are the
    diagonal and the edges: masked (stage 2), as in the tutorial's two stages.
  The per-token tables (block first / last key, sequence start / end, padding bounds) are a few
  torch ops on the device: no host synchronisation, so the launch can be graph-captured.
  `attention_tile_counts` returns how many tiles each program computed (a constexpr-guarded
  debug counter), which the tests compare with a brute-force count of non-empty tiles.
Backward, FlashAttention-2 style: delta = rowsum(o * do) in fp32 by a small kernel of its own
(`attention_delta`, reference `attention_delta_ref`: o and do read once in their dtype, no fp32
copies), then two kernels, neither with atomics: dq per query tile over the forward's key
range; dk, dv per key tile of a kv head, summing its G query heads in registers, over the
query tiles that reach it (causal onward, back to the first token of any image block in the key
tile, within its sequence).

Hopper: the forward reads q, k, v and writes o through tensor descriptors
(`tl.make_tensor_descriptor`, one (rows, Dh) descriptor per head: TMA bulk copies) when every
base and batch/head/row stride is 16-byte aligned (`_tma_ok`; other views take pointer loads,
same math), on 128 x 128 tiles by default (8 warps, 3 stages: wgmma n = 128). The backward
kernels still use pointer loads. Plain causal attention (no packed sequences, image blocks or
key padding) launches persistent and longest first: a fixed grid (SMs x the blocks per SM that
shared memory allows) strides over all (query tile, head) tiles, the last query tiles of every
head (the most keys) first, so the short tiles fill the tail instead of the long ones
(`persistent_fwd_programs`; its tile drops a K/V stage where q and o's staging would not fit
beside them, `persistent_fwd_config`). MOLMOE_ATTN_PERSISTENT=0 launches one program per tile;
the two give the same bits. Not measured on a GPU.

Tiles: the one tile policy of kernels/_common.py (`POLICIES`: candidates from `kernel_configs`,
pruned by `fits` for the dtype against sm_90's shared memory and spill rules, keyed on dtype,
Dh, causal, masks); `autotune` times them up front on a GPU (never on the launch path),
MOLMOE_ATTENTION_CONFIG / MOLMOE_ATTENTION_BWD_CONFIG (both backward kernels) /
MOLMOE_ATTENTION_DQ_CONFIG (dq alone) pin names ("BLOCK_M=128,BLOCK_N=64,num_warps=8,
num_stages=3"); the interpreter uses one small fixed config. The dq kernel has its own tile
(`dq_config`: 128 x 64 on 8 warps by default, so its dots run on wgmma at Dh 128).

Limits: cu_seqlens[-1] must equal Sk (not checked: reading it would sync the host).
Dh a power of two 16..256 (Molmo: 64 ViT, 128 decoder). fp32/fp16/bf16 in, fp32
accumulation; fp32 inputs use IEEE dots (not TF32), so the fp32 path is slow on a GPU (its
tiles are small to stay spill-free: 32 x 32 at Dh 64, 16 x 16 at Dh 128). Inputs
without a unit stride on Dh are copied (other strides are passed through). Holes in the key padding (not leading / trailing) are masked, not skipped.
With image blocks, a key tile past the causal limit is visited if a block id in the query tile's
[min, max] id range occurs in it (a range test: a conservative skip with many interleaved
blocks). The backward recomputes the metadata tables (cheap) rather than saving them.
"""
from __future__ import annotations

import math
import os

import torch
import triton

# this op's reference: the contract's own function (molmoe.ops), re-exported
from molmoe.ops import attention_ref  # noqa: F401
from molmoe.kernels._common import (SMEM_LIMIT, TilePolicy, check_qkv, element_size,
                                    ensure_tma_allocator, on_interpreter, parse_tile_config,
                                    tma_ok)
from molmoe.kernels.attention_kernels import (_attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel,
                                              _attn_bwd_dq_kernel, _attn_fwd_kernel)


_CONFIG_ENV = "MOLMOE_ATTENTION_CONFIG"
_BWD_CONFIG_ENV = "MOLMOE_ATTENTION_BWD_CONFIG"

# ----------------------------------------------------------------------------- launch policy


def kernel_configs(on_gpu: bool, backward: bool = False,
                   dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Candidate tile configs. The interpreter gets one small one so tests stay fast; its
    BLOCK_M != BLOCK_N on purpose, so no code path may assume square tiles. fp32 (IEEE dots,
    run as FMAs with the operands in registers) gets 32 x 32 and 16 x 16 tiles on 8 warps only
    (`fits` keeps 16 x 16 alone at Dh 128)."""
    if not on_gpu:
        return [dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1) if backward else
                dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)]
    if dtype == torch.float32:
        # 2 stages: with 3, 32 x 32 (fwd) and 16 x 16 (dq) at Dh 64 kept 8 B of stack
        return [dict(BLOCK_M=t, BLOCK_N=t, num_warps=8, num_stages=2) for t in (32, 16)]
    if backward:
        # 2 stages: with 1 the loads are not pipelined (no cp.async on sm_90), and dq at
        # 32x64 even kept 16 B of stack there.
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=2)
                for m in (32, 64) for n in (64, 128) for w in (4, 8)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
            for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


def prune_configs(configs: list[dict], head_dim: int, elem_bytes: int,
                  backward: bool = False) -> list[dict]:
    """The configs that `fits` (the first if none does)."""
    kept = [c for c in configs if fits(c, head_dim, elem_bytes, backward)]
    return kept or configs[:1]


def fits(c: dict, head_dim: int, elem_bytes: int, backward: bool = False) -> bool:
    """Whether a tile fits sm_90: its pipelined K/V stages + q tile within SMEM_LIMIT at the
    dtype's element size (fp32 twice bf16), and no register spills (255 per thread). The
    register rules are calibrated on ahead-of-time sm_90 compiles (tests/sm90.py; bf16, Dh 64
    and 128, GQA 1 and 7, every mask on, causal only, none):
      * forward: the fp32 accumulator (BM x Dh), scores (BM x BN) and the K/V tile (BN x Dh),
        per thread, within 128 words: every config kept compiled without spills, every one
        dropped spilled (e.g. 128x128 with 8 warps 16 B, any 4-warp 128-row tile at Dh 128);
      * backward (one config for both kernels): the dk/dv kernel holds dk, dv (fp32) and k, v
        for a BN-key tile and streams BM-row query tiles; with 4 warps it spilled at every tile
        at Dh 128 and at 32x128 at Dh 64; with 8 warps, 64-row query tiles spilled at Dh 128
        and 64x128 (8 B, GQA 1, masks) at Dh 64. So: 8 warps, the query tile BM x Dh and the
        (BN, BM) score tiles BN x BM each within 32 x 128 elements. (1 stage is not offered.)"""
    bm, bn, warps = c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]
    smem = (2 * bn * max(c["num_stages"], 1) + bm) * head_dim * elem_bytes
    if elem_bytes == 4:
        # fp32: IEEE dots run as FMAs, each thread holding its rows of q and columns of k over
        # the whole head dim, so the score tile per thread is what spills. Compiled for sm_90
        # (every mask on and none), 32 x 32 on 8 warps is spill-free at Dh 64 in all three
        # kernels; 64 x 64 spilled 664..2056 B there. At Dh 128, 32 x 32 on 8 warps spilled
        # 160..688 B (fwd, dq, dk/dv), and so did 16 x 32, 32 x 16 and 16 x 16 on 2, 4 or 16
        # warps; 16 x 16 on 8 warps is the one tile found spill-free in all three (200..217
        # registers, 2 or 3 stages). fp32 is a correctness path, not a fast one.
        return smem <= SMEM_LIMIT and warps == 8 and \
            bm * bn <= (32 * 32 if head_dim <= 64 else 16 * 16)
    if backward:
        regs_ok = warps == 8 and bm * head_dim <= 32 * 128 and bm * bn <= 32 * 128
    else:
        # The forward reads K/V through tensor descriptors (TMA): the K/V tile lives in shared
        # memory only, no pointer tile in registers, so the accumulator and the scores alone
        # count. Compiled for sm_90 with TMA, 128 x 128 on 8 warps took 195..223 registers at
        # Dh 128 (no spill) where the pointer loads spilled 16 B (masks). One warpgroup (4
        # warps) gets 96 values a thread: 64 x 128 there, at 128, spilled 680 B (masks), and
        # at most 64 x 64 scores: 64 x 128 at Dh 64 spilled 456..472 B (masks).
        regs_ok = ((bm * head_dim + bm * bn) <= (128 if warps >= 8 else 96) * 32 * warps
                   and (warps >= 8 or bm * bn <= 64 * 64))
    return smem <= SMEM_LIMIT and regs_ok


def _gpu_default(backward: bool, head_dim: int, causal: bool = True,
                 masked: bool = True) -> dict:
    # Checked spill-free on sm_90 (tests/test_attention.py): 128 x 128 forward tiles on 8
    # warps (QK^T and, at Dh 128, PV on wgmma with n = 128; K/V by TMA, 3 stages: 230,400 B of
    # shared memory at Dh 128, 195..223 registers with every mask or none); the backward's dk/dv kernel holds dk, dv, k, v for its key tile and streams 32-row query
    # tiles at Dh 128.
    if backward:
        return (dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2) if head_dim <= 64 else
                dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2))
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def _policy(backward: bool) -> TilePolicy:
    # ctx: dtype, head_dim, causal, masked (what the best tile depends on)
    return TilePolicy(
        "attention", _BWD_CONFIG_ENV if backward else _CONFIG_ENV, _KEYS,
        example="BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=3",
        candidates=lambda ctx: kernel_configs(True, backward, ctx["dtype"]),
        fits=lambda c, ctx: fits(c, ctx["head_dim"], element_size(ctx["dtype"]), backward),
        default=lambda ctx: _gpu_default(backward, ctx["head_dim"], ctx["causal"],
                                         ctx["masked"]),
        interpreter=lambda ctx: kernel_configs(False, backward)[0])


_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
def dq_configs(on_gpu: bool, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Candidate tiles of the dq kernel, which has its own config (issue 15): 64 query rows
    per warpgroup so its dots run on wgmma (the shared backward config's 32-row tiles at Dh 128
    ran mma.sync)."""
    if not on_gpu or dtype == torch.float32:
        return kernel_configs(on_gpu, True, dtype)
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
            for m, w in ((64, 4), (128, 8)) for n in (32, 64, 128) for s in (2, 3)]


def fits_dq(c: dict, head_dim: int, elem_bytes: int) -> bool:
    """dq holds q, do and the dq accumulator (BM x Dh each) and one step's scores (BM x BN):
    within 160 values a thread (compiled for sm_90 at Dh 128, masks on: 128 x 64 on 8 warps
    238 registers, 64 x 64 on 4 warps 253, no spill; 64 x 128 on 4 warps, 192, spilled 1128 B;
    at Dh 64 it spilled 552 B, so one warpgroup takes at most 64 x 64 scores), 64 rows per
    warpgroup (wgmma), K/V stages + q/do tiles within shared memory."""
    if elem_bytes == 4:
        return fits(c, head_dim, elem_bytes, backward=True)
    bm, bn, warps = c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]
    smem = (2 * bn * c["num_stages"] + 2 * bm) * head_dim * elem_bytes
    return (smem <= SMEM_LIMIT and bm >= 16 * warps
            and (2 * bm * head_dim + bm * bn) <= 160 * 32 * warps
            and (warps >= 8 or bm * bn <= 64 * 64))


def _dq_pin(ctx: dict) -> dict:
    # MOLMOE_ATTENTION_BWD_CONFIG pins both backward kernels; MOLMOE_ATTENTION_DQ_CONFIG
    # then overrides names for the dq kernel alone.
    out = {}
    for env in (_BWD_CONFIG_ENV, _DQ_CONFIG_ENV):
        spec = os.environ.get(env, "").replace(" ", "")
        if spec:
            out.update(parse_tile_config(env, spec, "BLOCK_M=128,BLOCK_N=64,num_warps=8,"
                                         "num_stages=2", keys=_KEYS))
    return out


_DQ_CONFIG_ENV = "MOLMOE_ATTENTION_DQ_CONFIG"
POLICIES = {False: _policy(False), True: _policy(True),  # forward, backward (dk/dv; dq pinned)
            "dq": TilePolicy(
                "attention dq", _DQ_CONFIG_ENV, _KEYS,
                example="BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=2",
                candidates=lambda ctx: dq_configs(True, ctx["dtype"]),
                fits=lambda c, ctx: fits_dq(c, ctx["head_dim"], element_size(ctx["dtype"])),
                default=lambda ctx: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                interpreter=lambda ctx: kernel_configs(False, True)[0], pin=_dq_pin)}


def _tune_key(backward, dtype, head_dim, causal, masked):
    return (backward, dtype, head_dim, causal, masked)


def _ctx(key: tuple) -> dict:
    _, dtype, head_dim, causal, masked = key
    return dict(dtype=dtype, head_dim=head_dim, causal=causal, masked=masked)


def default_config(key: tuple, on_gpu: bool) -> dict:
    """Pinned names over tuned (`autotune`) over the default pruned for the dtype (never timed
    here); key = `_tune_key(...)`."""
    return POLICIES[key[0]].config(_ctx(key), on_gpu)


def autotune(q, k, v, backward: bool = False, **kw) -> dict | None:
    """Time every config that fits on these tensors (GPU only), skipping any that fails;
    remember and return the fastest (backward: {"dkdv": ..., "dq": ...})."""
    causal = kw.get("causal", True)
    masked = any(kw.get(n) is not None for n in ("image_block_ids", "key_padding_mask",
                                                   "cu_seqlens"))
    key = _tune_key(backward, q.dtype, q.shape[-1], causal, masked)
    if backward:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(q)

        def run():
            torch.autograd.grad(attention(q, k, v, **kw), (q, k, v), do)
    else:
        def run():
            attention(q, k, v, **kw)
    best = POLICIES[backward].autotune(_ctx(key), run)
    if backward:  # then the dq kernel's own tile, with the dk/dv choice in place
        return dict(dkdv=best, dq=POLICIES["dq"].autotune(_ctx(key), run))
    return best


def dq_config(key: tuple, on_gpu: bool) -> dict:
    """The dq kernel's tile (its own policy; key = `_tune_key(True, ...)`)."""
    return POLICIES["dq"].config(_ctx(key), on_gpu)


# ----------------------------------------------------------------------------- metadata


def _metadata(B, Sq, Sk, device, causal, image_block_ids, key_padding_mask, cu_seqlens):
    """Per-token tables the kernels use for loop bounds and masks (see attention_kernels.py).

    Device-side torch ops only (sort, scatter, argmax): nothing here reads a value on the host.
    """
    dummy = torch.empty(1, dtype=torch.int32, device=device)
    pos = torch.arange(Sk, device=device)
    meta = dict(blk=dummy, bfirst=dummy, blast=dummy, seqs=dummy, seqe=dummy, kfirst=dummy,
                klast=dummy, kpm=dummy)
    seq_of = torch.zeros(Sk, dtype=torch.long, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        seq_of = torch.searchsorted(cu[1:], pos, right=True).clamp(max=cu.numel() - 2)
        meta["seqs"] = cu[seq_of].to(torch.int32).contiguous()
        meta["seqe"] = cu[seq_of + 1].to(torch.int32).contiguous()
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device, dtype=torch.uint8).contiguous()
        any_key = kpm.bool().any(dim=1)
        first = torch.argmax(kpm, dim=1)  # first 1 (argmax returns the first maximum)
        last = Sk - torch.argmax(kpm.flip(1), dim=1)  # one past the last 1
        meta["kpm"] = kpm
        meta["kfirst"] = torch.where(any_key, first, Sk).to(torch.int32)
        meta["klast"] = torch.where(any_key, last, 0).to(torch.int32)
    if causal and image_block_ids is not None:
        ids = image_block_ids.to(device=device, dtype=torch.long)  # (B, Sk)
        # Group tokens by (sequence, block id); stable sort keeps positions ascending inside a
        # group, so each group's first / last position is a scatter-min / -max away.
        group_key = seq_of[None, :] * (1 << 33) + ids
        sorted_key, order = torch.sort(group_key, dim=1, stable=True)
        new_group = torch.ones_like(sorted_key, dtype=torch.bool)
        new_group[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
        gid = torch.cumsum(new_group.long(), dim=1) - 1  # (B, Sk) group of each sorted token
        first = torch.full((B, Sk), Sk, dtype=torch.long, device=device)
        last = torch.full((B, Sk), -1, dtype=torch.long, device=device)
        first.scatter_reduce_(1, gid, order, "amin")
        last.scatter_reduce_(1, gid, order, "amax")
        bfirst = torch.empty_like(first).scatter_(1, order, first.gather(1, gid))
        blast = torch.empty_like(last).scatter_(1, order, last.gather(1, gid))
        text = ids < 0  # text tokens reach only themselves
        meta["blk"] = torch.where(text, -1, ids).to(torch.int32).contiguous()
        meta["bfirst"] = torch.where(text, pos, bfirst).to(torch.int32).contiguous()
        meta["blast"] = torch.where(text, pos, blast).to(torch.int32).contiguous()
    return meta


# ----------------------------------------------------------------------------- launchers


def _check(q, k, v, causal, image_block_ids, key_padding_mask, cu_seqlens):
    B, Hq, Sq, Dh, Hkv, Sk = check_qkv("attention", q, k, v)
    if Sq > Sk:
        raise ValueError(f"attention: more queries ({Sq}) than keys ({Sk}); need Sq <= Sk")
    if image_block_ids is not None and (image_block_ids.shape != (B, Sk) or
                                        image_block_ids.is_floating_point()):
        raise ValueError(f"attention: image_block_ids must be ({B}, {Sk}) int (one id per key "
                         f"position), got {tuple(image_block_ids.shape)} {image_block_ids.dtype}")
    if key_padding_mask is not None and key_padding_mask.shape != (B, Sk):
        raise ValueError(f"attention: key_padding_mask must be ({B}, {Sk}), got "
                         f"{tuple(key_padding_mask.shape)}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"attention: cu_seqlens must be (N+1,) int32, got "
                             f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        if B != 1 or Sq != Sk:
            raise ValueError(f"attention: cu_seqlens packs sequences along one row: needs B == 1 "
                             f"and Sq == Sk, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors (TMA) need 16-byte aligned bases and 16-byte multiples as the batch,
    head and row strides (the head dim has a unit stride); other views take the pointer loads."""
    return tma_ok(*tensors, strides=3)


def _launch_fwd(q, k, v, image_block_ids, key_padding_mask, cu_seqlens, causal, scale,
                count_tiles=False):
    B, Hq, Sq, Dh = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    on_gpu = not on_interpreter(q.device)
    masked = any(t is not None for t in (image_block_ids, key_padding_mask, cu_seqlens))
    cfg = default_config(_tune_key(False, q.dtype, Dh, causal, masked), on_gpu)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.float32)
    n_m = triton.cdiv(Sq, cfg["BLOCK_M"])
    counts = torch.zeros(B * Hq * n_m, dtype=torch.int32, device=q.device)
    if Sq == 0:
        return o, lse, counts
    meta = _metadata(B, Sq, Sk, q.device, causal, image_block_ids, key_padding_mask, cu_seqlens)
    tma = _tma_ok(q, k, v, o)
    if tma and on_gpu:
        ensure_tma_allocator()
    programs = 0
    if causal and not masked:
        pcfg = persistent_fwd_config(cfg, Dh, q.dtype)
        programs = persistent_fwd_programs(n_m * B * Hq, pcfg, Dh, q.dtype, q.device,
                                           pcfg is not None)
        cfg = pcfg if programs else cfg
    _attn_fwd_kernel[(programs,) if programs else (n_m, B * Hq)](
        q, k, v, o, lse, meta["blk"], meta["blast"], meta["seqs"], meta["seqe"],
        meta["kfirst"], meta["klast"], meta["kpm"], counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        Hq, Sq, Sk, scale, B * Hq,
        G=Hq // Hkv, HEAD_DIM=Dh, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CAUSAL=causal,
        HAS_BLOCKS=causal and image_block_ids is not None, HAS_SEQ=cu_seqlens is not None,
        HAS_KPM=key_padding_mask is not None, IEEE=q.dtype == torch.float32,
        COUNT_TILES=count_tiles, TMA=tma, PERSISTENT=programs > 0, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return o, lse, counts


_PERSISTENT_ENV = "MOLMOE_ATTN_PERSISTENT"
_INTERPRETER_PROGRAMS = 3  # few programs, several tiles each: the interpreter runs the loop


def persistent_fwd_config(cfg: dict, head_dim: int, dtype) -> dict | None:
    """The forward tile of the persistent launch: `cfg` with as many K/V stages as fit. Its
    loop keeps the q tile and the o store's staging (BM x Dh each) in shared memory beside the
    K/V stages across tiles, where one program per tile reuses them: compiled for sm_90, the
    128 x 128 bf16 default at Dh 128 in 3 stages took 263,168 B (over 232,448), in 2 it fits.
    None when even 2 stages do not fit."""
    c = dict(cfg)
    while True:
        smem = ((2 * c["BLOCK_N"] * c["num_stages"] + 2 * c["BLOCK_M"]) * head_dim
                * element_size(dtype) + 1024)
        if smem <= SMEM_LIMIT:
            return c
        if c["num_stages"] <= 2:
            return None
        c["num_stages"] -= 1


def persistent_fwd_programs(num_tiles: int, cfg: dict, head_dim: int, dtype, device,
                            plain_causal: bool) -> int:
    """Programs of the persistent, longest-first forward launch (0: one program per tile, grid
    (n_m, B x Hq)). Only for plain causal attention, where a query tile's work grows with its
    index, so "last tiles first" is "longest first"; packed sequences, image blocks and key
    padding keep the per-tile grid. GPU: the SM count times the blocks per SM that shared
    memory allows (at most 2). MOLMOE_ATTN_PERSISTENT=0 forces the per-tile grid; the two give
    the same bits (tests/test_attention.py)."""
    if not plain_causal or os.environ.get(_PERSISTENT_ENV, "1") == "0" or num_tiles == 0:
        return 0
    if on_interpreter(device):
        return min(_INTERPRETER_PROGRAMS, num_tiles)
    smem = ((2 * cfg["BLOCK_N"] * max(cfg["num_stages"], 1) + 2 * cfg["BLOCK_M"]) * head_dim
            * element_size(dtype))
    per_sm = max(1, min(2, SMEM_LIMIT // max(smem, 1)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(sms * per_sm, num_tiles)


def attention_delta_ref(o, do):
    """delta (B, Hq, Sq) fp32 = rowsum(o * do), FlashAttention-2's backward preprocessing
    (delta_i = sum_d o_id do_id = sum_j p_ij dp_ij): the reference of `attention_delta`."""
    return (o.float() * do.float()).sum(-1)


def delta_block_m(head_dim: int) -> int:
    """Rows per program of the delta kernel: 2048 elements of o and of do per 4-warp program
    (16 values a thread each, for any head dim). A fixed tile, not a tuned one: the kernel reads
    each element once, and its only choice is how much of a row block one program holds."""
    return max(1, 2048 // head_dim)


def attention_delta(o, do):
    """`attention_delta_ref` as one Triton kernel: o and do (B, Hq, Sq, Dh) read once in their
    dtype (any strides with a unit head-dim stride), fp32 accumulation, delta contiguous."""
    B, Hq, Sq, Dh = o.shape
    o, do = _unit_stride(o), _unit_stride(do)
    delta = torch.empty(B, Hq, Sq, device=o.device, dtype=torch.float32)
    if delta.numel() == 0:
        return delta
    block_m = delta_block_m(Dh)
    _attn_bwd_delta_kernel[(triton.cdiv(Sq, block_m), B * Hq)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
        do.stride(2), Hq, Sq, HEAD_DIM=Dh, BLOCK_M=block_m, num_warps=4)
    return delta


def _launch_bwd(do, q, k, v, o, lse, image_block_ids, key_padding_mask, cu_seqlens, causal,
                scale, counts=None):
    B, Hq, Sq, Dh = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v, do = (_unit_stride(t) for t in (q, k, v, do))
    on_gpu = not on_interpreter(q.device)
    masked = any(t is not None for t in (image_block_ids, key_padding_mask, cu_seqlens))
    cfg = default_config(_tune_key(True, q.dtype, Dh, causal, masked), on_gpu)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if Sq == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = attention_delta(o, do)  # (B, Hq, Sq) fp32
    meta = _metadata(B, Sq, Sk, q.device, causal, image_block_ids, key_padding_mask, cu_seqlens)
    flags = dict(G=Hq // Hkv, HEAD_DIM=Dh, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 CAUSAL=causal, HAS_BLOCKS=causal and image_block_ids is not None,
                 HAS_SEQ=cu_seqlens is not None, HAS_KPM=key_padding_mask is not None,
                 IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"])
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    dq_cfg = dq_config(_tune_key(True, q.dtype, Dh, causal, masked), on_gpu)
    dq_flags = dict(flags, BLOCK_M=dq_cfg["BLOCK_M"], BLOCK_N=dq_cfg["BLOCK_N"],
                    num_warps=dq_cfg["num_warps"], num_stages=dq_cfg["num_stages"])
    _attn_bwd_dq_kernel[(triton.cdiv(Sq, dq_cfg["BLOCK_M"]), B * Hq)](
        q, k, v, do, dq, lse, delta, meta["blk"], meta["blast"], meta["seqs"], meta["seqe"],
        meta["kfirst"], meta["klast"], meta["kpm"], *strides,
        dq.stride(0), dq.stride(1), dq.stride(2), Hq, Sq, Sk, scale, **dq_flags)
    _attn_bwd_dkdv_kernel[(triton.cdiv(Sk, cfg["BLOCK_N"]), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, meta["blk"], meta["bfirst"], meta["seqs"], meta["seqe"],
        meta["kfirst"], meta["klast"], meta["kpm"], counts if counts is not None else delta,
        *strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        Hkv, Sq, Sk, scale, COUNT_TILES=counts is not None, **flags)
    return dq, dk, dv


# ----------------------------------------------------------------------------- torch.library


@torch.library.custom_op("molmoe::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  image_block_ids: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                  cu_seqlens: torch.Tensor | None, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse, _ = _launch_fwd(q, k, v, image_block_ids, key_padding_mask, cu_seqlens, causal,
                            scale)
    return o, lse


@_attention_op.register_fake
def _(q, k, v, image_block_ids, key_padding_mask, cu_seqlens, causal, scale):
    B, Hq, Sq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.custom_op("molmoe::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      o: torch.Tensor, lse: torch.Tensor, image_block_ids: torch.Tensor | None,
                      key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                      causal: bool, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_bwd(do, q, k, v, o, lse, image_block_ids, key_padding_mask, cu_seqlens,
                       causal, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, image_block_ids, key_padding_mask, cu_seqlens, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, image_block_ids, key_padding_mask, cu_seqlens, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, image_block_ids, key_padding_mask, cu_seqlens)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, image_block_ids, key_padding_mask, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, image_block_ids, key_padding_mask,
                                   cu_seqlens, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _scale(q, scale) -> float:
    """1 / sqrt(Dh) unless given; positive and finite (the kernels take the row max of the raw
    scores and scale it, which is the max of the scaled scores only for a positive scale)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not (0.0 < scale < math.inf):
        raise ValueError(f"attention: scale must be positive and finite, got {scale}")
    return scale


def attention(q, k, v, *, causal=True, image_block_ids=None, key_padding_mask=None,
              cu_seqlens=None, scale=None):
    """q (B, Hq, Sq, Dh), k/v (B, Hkv, Sk, Dh) -> (B, Hq, Sq, Dh); contract in the header."""
    _check(q, k, v, causal, image_block_ids, key_padding_mask, cu_seqlens)
    scale = _scale(q, scale)
    o, _lse = _attention_op(q, k, v, image_block_ids, key_padding_mask, cu_seqlens,
                            bool(causal), float(scale))
    return o


def attention_tile_counts(q, k, v, *, causal=True, image_block_ids=None, key_padding_mask=None,
                          cu_seqlens=None, scale=None, backward=False):
    """A debug view of the tile skipping, for tests and benchmarks. Forward: (o, visited key
    tiles per (batch, q head, query tile), (BLOCK_M, BLOCK_N)). backward=True: (dk, (query
    head, query tile) pairs the dk/dv kernel computed per (batch, kv head, key tile), tiles)."""
    _check(q, k, v, causal, image_block_ids, key_padding_mask, cu_seqlens)
    scale = _scale(q, scale)
    masks = (image_block_ids, key_padding_mask, cu_seqlens)
    o, lse, counts = _launch_fwd(q, k, v, *masks, bool(causal), scale, count_tiles=True)
    on_gpu = not on_interpreter(q.device)
    key = _tune_key(backward, q.dtype, q.shape[-1], bool(causal),
                    any(t is not None for t in masks))
    cfg = default_config(key, on_gpu)
    B, Hq, Sq, _ = q.shape
    if not backward:
        return o, counts.view(B, Hq, -1), (cfg["BLOCK_M"], cfg["BLOCK_N"])
    Hkv, Sk = k.shape[1], k.shape[2]
    counts = torch.zeros(B * Hkv * triton.cdiv(Sk, cfg["BLOCK_N"]), dtype=torch.int32,
                         device=q.device)
    _, dk, _ = _launch_bwd(torch.randn_like(o), q, k, v, o, lse, *masks, bool(causal), scale,
                           counts=counts)
    return dk, counts.view(B, Hkv, -1), (cfg["BLOCK_M"], cfg["BLOCK_N"])
