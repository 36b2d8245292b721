"""Flash attention (prefill / training) against the reference and against PyTorch SDPA with a
boolean mask built here by loops, forward and dq / dk / dv, over shapes and masks chosen on
purpose; the tile skipping checked against a brute-force emptiness count; the op's torch.library
registration; and the tiny models with the kernel serving both the ViT and the decoder.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from molmoe.ops import REFERENCE_OPS
from molmoe.kernels.attention import (_tune_key, attention, attention_ref,
                                      attention_tile_counts, default_config, dq_config,
                                      kernel_configs, prune_configs)
from tests.tiny import random_inputs, random_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FWD = kernel_configs(on_gpu=torch.cuda.is_available())[0]
BWD = kernel_configs(on_gpu=torch.cuda.is_available(), backward=True)[0]
TILE_M, TILE_N = FWD["BLOCK_M"], FWD["BLOCK_N"]


def make(B, Hq, Hkv, Sq, Sk, Dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, Dh, generator=g) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    do = torch.randn(B, Hq, Sq, Dh, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v, do)]


def loop_mask(B, Sq, Sk, causal, blocks=None, kpm=None, cu=None):
    """(B, Sq, Sk) bool, written out element by element from the contract's words, sharing no
    code with the kernel or the reference."""
    seq_of = [0] * Sk
    if cu is not None:
        cu = [int(c) for c in cu]
        for s in range(len(cu) - 1):
            for t in range(cu[s], cu[s + 1]):
                seq_of[t] = s
    rows = []
    for b in range(B):
        blk = [-1] * Sk if blocks is None else [int(x) for x in blocks[b]]
        pad = [True] * Sk if kpm is None else [bool(x) for x in kpm[b]]
        mat = []
        for i in range(Sq):
            p = Sk - Sq + i  # query i's key position
            mat.append([((not causal) or j <= p or (blk[p] >= 0 and blk[p] == blk[j]))
                        and seq_of[p] == seq_of[j] and pad[j] for j in range(Sk)])
        rows.append(mat)
    return torch.tensor(rows, dtype=torch.bool)


def sdpa_oracle(q, k, v, do, mask):
    """fp32 SDPA with the explicit mask; rows with no key give zeros (and zero gradients)."""
    q, k, v = (t.detach().float().cpu().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    empty = ~mask.any(-1, keepdim=True)[:, None]  # (B, 1, Sq, 1)
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                       attn_mask=mask[:, None] | empty)
    o = o * ~empty
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do.float().cpu()))


def run_kernel(q, k, v, do, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = attention(q, k, v, **kw)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))


def run_ref(q, k, v, do, upcast, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = attention_ref(q, k, v, upcast=upcast, **kw)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), do))


def check(q, k, v, do, mask, **kw):
    """Output and dq, dk, dv: (1) error vs the fp32 reference at most 2x PyTorch's own error in
    the input dtype (+ a floor); (2) close to SDPA with the loop-built mask; (3) no NaN."""
    got = run_kernel(q, k, v, do, **kw)
    ref32 = run_ref(q, k, v, do, True, **kw)
    low = run_ref(q, k, v, do, False, **kw) if q.dtype != torch.float32 else ref32
    oracle = sdpa_oracle(q, k, v, do, mask)
    for name, x, r, lo, orc in zip(("o", "dq", "dk", "dv"), got, ref32, low, oracle):
        assert not x.isnan().any(), name
        scale = max(1.0, r.abs().max().item())
        floor = (2e-5 if q.dtype == torch.float32 else 2e-3) * scale
        err = (x.float() - r.float()).abs().max().item()
        torch_err = (lo.float() - r.float()).abs().max().item()
        assert err <= 2 * torch_err + floor, (name, err, torch_err)
        torch.testing.assert_close(x.float().cpu(), orc, atol=floor + 2 * torch_err, rtol=1e-3,
                                   msg=lambda m: f"{name} vs SDPA oracle: {m}")
    return got


DTYPES = [torch.float32, torch.float16]

# (B, Hq, Hkv, Sq, Sk, Dh, causal, reason)
PLAIN = [
    (1, 2, 2, 1, 1, 64, True, "one token"),
    (2, 2, 1, 2, 2, 64, True, "two tokens, GQA 2"),
    (1, 7, 1, 17, 17, 64, True, "17 tokens (not a tile multiple), GQA 7"),
    (1, 8, 1, 40, 40, 128, True, "40 tokens over several tiles, GQA 8, Dh 128"),
    (1, 4, 2, 17, 53, 64, True, "chunked prefill: 17 queries against 53 keys (Sq < Sk)"),
    (1, 2, 2, 1, 40, 64, True, "one query against a cache of 40"),
    (2, 2, 2, 37, 37, 64, False, "non-causal (ViT), 37 tokens"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,Dh,causal,reason", PLAIN, ids=[c[-1] for c in PLAIN])
def test_plain_shapes(B, Hq, Hkv, Sq, Sk, Dh, causal, reason, dtype):
    q, k, v, do = make(B, Hq, Hkv, Sq, Sk, Dh, dtype)
    check(q, k, v, do, loop_mask(B, Sq, Sk, causal), causal=causal)


def _blocks(S, spans):
    ids = torch.full((S,), -1, dtype=torch.int32)
    for start, end, bid in spans:
        ids[start:end] = bid
    return ids


# Rows of image block ids for S = 70 tokens, (start, end, id) spans; interpreter tiles 32 x 16.
BLOCK_CASES = {
    "image at the start": [(0, 12, 0)],
    "image in the middle": [(30, 45, 0)],
    "two images back to back": [(20, 30, 1), (30, 45, 2)],
    "image straddling a tile edge": [(13, 19, 5), (60, 67, 6)],
    "one id for all images (transformers molmo2)": [(3, 20, 0), (40, 52, 0)],
}


# The mask logic does not depend on the dtype: fp16 runs on two of the layouts only (time).
BLOCK_PARAMS = [(n, torch.float32) for n in BLOCK_CASES] + [
    ("two images back to back", torch.float16), ("image straddling a tile edge", torch.float16)]


@pytest.mark.parametrize("name,dtype", BLOCK_PARAMS)
def test_image_blocks(name, dtype):
    S = 70
    ids = torch.stack([_blocks(S, BLOCK_CASES[name]), _blocks(S, [(50, 69, 3)])]).to(DEV)
    q, k, v, do = make(2, 2, 1, S, S, 64, dtype, seed=1)
    check(q, k, v, do, loop_mask(2, S, S, True, blocks=ids.cpu()), causal=True,
          image_block_ids=ids)


@pytest.mark.parametrize("dtype", DTYPES)
def test_image_blocks_chunked_prefill_and_padding(dtype):
    # Sq < Sk with an image spanning the cache / new-chunk boundary; left padding in batch 1.
    Sq, Sk = 30, 61
    ids = torch.stack([_blocks(Sk, [(20, 40, 0), (50, 58, 1)]), _blocks(Sk, [(25, 35, 4)])])
    kpm = torch.ones(2, Sk, dtype=torch.bool)
    kpm[1, :19] = False
    q, k, v, do = make(2, 2, 1, Sq, Sk, 64, dtype, seed=2)
    check(q, k, v, do, loop_mask(2, Sq, Sk, True, blocks=ids, kpm=kpm), causal=True,
          image_block_ids=ids.to(DEV), key_padding_mask=kpm.to(DEV))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_padding_rows_are_zero_with_zero_grads(dtype):
    # Batch 0: 20 left-padding queries see no key; batch 1: no key at all.
    S = 45
    kpm = torch.ones(2, S, dtype=torch.bool)
    kpm[0, :20] = False
    kpm[1] = False
    q, k, v, do = make(2, 2, 2, S, S, 64, dtype, seed=3)
    o, dq, dk, dv = check(q, k, v, do, loop_mask(2, S, S, True, kpm=kpm), causal=True,
                          key_padding_mask=kpm.to(DEV))
    assert o[0, :, :20].abs().max() == 0 and o[1].abs().max() == 0
    assert dq[0, :, :20].abs().max() == 0 and dq[1].abs().max() == 0
    assert dk[0, :, :20].abs().max() == 0 and dv[1].abs().max() == 0
    # Non-causal with right padding (a padded ViT-style batch): padded keys get no gradient.
    kpm = torch.ones(2, S, dtype=torch.bool)
    kpm[1, 30:] = False
    check(q, k, v, do, loop_mask(2, S, S, False, kpm=kpm), causal=False,
          key_padding_mask=kpm.to(DEV))


PACKED = torch.tensor([0, 1, 6, 306], dtype=torch.int32)  # sequences of 1, 5 and 300 tokens


@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (True, torch.float16),
                                          (False, torch.float32)])
def test_packed_sequences(causal, dtype):
    S = int(PACKED[-1])
    ids = _blocks(S, [(2, 5, 0), (40, 70, 0), (100, 140, 1)])[None] if causal else None
    q, k, v, do = make(1, 1, 1, S, S, 16, dtype, seed=4)
    mask = loop_mask(1, S, S, causal, blocks=ids, cu=PACKED)
    check(q, k, v, do, mask, causal=causal, cu_seqlens=PACKED.to(DEV),
          image_block_ids=None if ids is None else ids.to(DEV))


def test_vit_fp32_noncausal_and_explicit_scale():
    # The ViT path: fp32 q/k/v (IEEE dots), no mask; an explicit scale as the caller passes it.
    q, k, v, do = make(3, 2, 2, 50, 50, 64, torch.float32, seed=5)
    for scale in (None, 0.07):
        got = run_kernel(q, k, v, do, causal=False, scale=scale)
        want = run_ref(q, k, v, do, True, causal=False, scale=scale)
        for x, r in zip(got, want):
            torch.testing.assert_close(x, r, atol=2e-5, rtol=1e-4)


def test_strided_inputs():
    # The decoder hands q/k/v as transposes of (B, S, H, Dh) views: non-contiguous.
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 33, 4 + 2 + 2, 64, generator=g).to(DEV)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([4, 2, 2], dim=2))
    do = torch.randn(2, 4, 33, 64, generator=g).to(DEV)
    check(q, k, v, do, loop_mask(2, 33, 33, True), causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tma_and_pointer_paths_agree(dtype, monkeypatch):
    # The forward reads q/k/v (and writes o) through tensor descriptors when every base and
    # stride is 16-byte aligned (Triton's interpreter runs them too), else with pointer loads.
    from molmoe.kernels import attention as A

    q, k, v, do = make(1, 4, 2, 37, 37, 64, dtype, seed=8)

    def shifted(t):  # the same values one element into a buffer: a misaligned base
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
        return buf.view(t.shape).copy_(t)

    qs, ks, vs = map(shifted, (q, k, v))
    assert A._tma_ok(q, k, v) and not A._tma_ok(qs, ks, vs)
    chosen, real = [], A._tma_ok
    monkeypatch.setattr(A, "_tma_ok", lambda *ts: chosen.append(real(*ts)) or chosen[-1])
    mask = loop_mask(1, 37, 37, True)
    by_tma = check(q, k, v, do, mask, causal=True)
    by_pointer = check(qs, ks, vs, do, mask, causal=True)
    assert chosen == [True, False]
    for a, b in zip(by_tma, by_pointer):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- tile skipping


def brute_force_tiles(mask, tile_m, tile_n):
    """Key tiles holding at least one allowed (query, key) pair, per query tile. The key tile
    grid starts at the tile's first allowed key (the kernel starts its loop there)."""
    B, Sq, _ = mask.shape
    out = torch.zeros(B, math.ceil(Sq / tile_m), dtype=torch.int32)
    for b in range(B):
        for t in range(out.shape[1]):
            sub = mask[b, t * tile_m:(t + 1) * tile_m]  # (rows, Sk)
            keys = sub.any(0).nonzero().flatten().tolist()
            if keys:
                out[b, t] = len({(j - keys[0]) // tile_n for j in keys})
    return out


SKIP_CASES = {
    "causal": dict(S=100),
    "chunked prefill": dict(S=100, Sq=40),
    "image blocks": dict(S=100, spans=[(5, 40, 0), (60, 70, 1)]),
    "one id for all images": dict(S=100, spans=[(3, 20, 0), (50, 80, 0)]),
    "packed": dict(S=100, cu=[0, 1, 6, 50, 100], spans=[(10, 30, 0), (60, 90, 1)]),
    "left padding": dict(S=100, pad=64),
}


def _skip_case(name, G=1):
    c = SKIP_CASES[name]
    S, Sq = c["S"], c.get("Sq", c["S"])
    ids = _blocks(S, c["spans"])[None] if "spans" in c else None
    cu = torch.tensor(c["cu"], dtype=torch.int32) if "cu" in c else None
    kpm = None
    if "pad" in c:
        kpm = torch.ones(1, S, dtype=torch.bool)
        kpm[0, :c["pad"]] = False
    q, k, v, _ = make(1, G, 1, Sq, S, 16, torch.float32)
    kw = dict(image_block_ids=ids, cu_seqlens=cu, key_padding_mask=kpm)
    mask = loop_mask(1, Sq, S, True, blocks=ids, kpm=kpm, cu=cu)
    return q, k, v, kw, mask


def _on_device(kw):
    return {n: t if t is None else t.to(DEV) for n, t in kw.items()}


@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_tile_skipping_visits_exactly_the_nonempty_tiles(name):
    # Forward (and dq, same bounds): per query tile, the key tiles with an allowed pair.
    q, k, v, kw, mask = _skip_case(name)
    Sq, S = mask.shape[1:]
    o, counts, (tm, tn) = attention_tile_counts(q, k, v, causal=True, **_on_device(kw))
    want = brute_force_tiles(mask, tm, tn)
    assert torch.equal(counts[:, 0].cpu(), want), (counts[:, 0], want)
    assert counts.sum() < math.ceil(Sq / tm) * math.ceil(S / tn)  # the masks removed work
    torch.testing.assert_close(o, attention_ref(q, k, v, causal=True, **kw), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_backward_tile_skipping_visits_exactly_the_nonempty_tiles(name):
    # dk/dv: per key tile, the (query head, query tile) pairs with an allowed pair; GQA 2.
    q, k, v, kw, mask = _skip_case(name, G=2)
    Sq, S = mask.shape[1:]
    dk, counts, (tm, tn) = attention_tile_counts(q, k, v, causal=True, backward=True,
                                                 **_on_device(kw))
    want = 2 * brute_force_tiles(mask.transpose(1, 2), tn, tm)  # keys as rows
    assert torch.equal(counts[:, 0].cpu(), want), (counts[:, 0], want)
    assert counts.sum() < 2 * math.ceil(Sq / tm) * math.ceil(S / tn)


def test_tile_skip_range_test_is_conservative_not_wrong():
    # A query tile holding blocks 0 and 2 and a later key tile holding only block 1 (in between
    # by id): the range test visits it (counted) but the mask keeps the result exact.
    S = 4 * TILE_M
    ids = _blocks(S, [(0, 3, 0), (TILE_M - 2, TILE_M, 2), (3 * TILE_M, 3 * TILE_M + 5, 1),
                      (3 * TILE_M + 5, 3 * TILE_M + 9, 2)])[None]
    q, k, v, do = make(1, 2, 1, S, S, 16, torch.float32, seed=7)
    o, counts, (tm, tn) = attention_tile_counts(q, k, v, image_block_ids=ids.to(DEV))
    want = brute_force_tiles(loop_mask(1, S, S, True, blocks=ids), tm, tn)
    assert (counts[0, 0].cpu() >= want[0]).all()
    check(q, k, v, do, loop_mask(1, S, S, True, blocks=ids), causal=True,
          image_block_ids=ids.to(DEV))


# ----------------------------------------------------------------------------- API


def test_bad_inputs_name_the_problem():
    q, k, v, _ = make(1, 6, 4, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q, k, v)
    q, k, v, _ = make(1, 4, 2, 8, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim 48"):
        attention(q, k, v)
    q, k, v, _ = make(1, 4, 2, 9, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="Sq <= Sk"):
        attention(q, k, v)
    q, k, v, _ = make(2, 4, 2, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="image_block_ids must be"):
        attention(q, k, v, image_block_ids=torch.zeros(2, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="B == 1"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))


def test_opcheck():
    q, k, v, _ = make(1, 4, 2, 20, 20, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ids = _blocks(20, [(3, 9, 0)])[None].to(DEV)
    kpm = torch.ones(1, 20, dtype=torch.bool, device=DEV)
    kpm[0, :2] = False
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEV)
    # Every default check (schema, fake tensor, autograd registration, AOT dispatch) once, the
    # packed non-causal variant through the cheaper ones.
    op = torch.ops.molmoe.attention.default
    torch.library.opcheck(op, (q, k, v, ids, kpm, None, True, 0.25))
    torch.library.opcheck(op, (q, k, v, None, None, cu, False, 0.3),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def sm90_cases():
    """The three kernels for sm_90 at Molmo's shapes (bf16; Dh 128 decoder with GQA 7 and 1, Dh
    64 ViT), every mask on and none, at the shipped GPU default tiles (`default_config`; fp16
    and fp32 defaults too), the test tiles used since the kernels were written, and every
    candidate each kernel's tile policy keeps for bf16, fp16 and fp32 at Dh 64 and 128;
    compiled by tests/sm90.py."""
    from molmoe.kernels import attention_kernels as K
    from molmoe.kernels.attention import POLICIES, delta_block_m
    from tests.sm90 import Case

    types = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "kpm_ptr": "*u8", "scale": "fp32"}
    # (name, G, Dh, causal, masks): Molmo's decoder (GQA 7, causal, image blocks + packing +
    # padding, or causal only), an MHA decoder, the ViT (Dh 64, bidirectional, no mask).
    shapes = (("d128_g7_masks", 7, 128, True, True), ("d128_g7_causal", 7, 128, True, False),
              ("d128_g1_masks", 1, 128, True, True), ("d64_g1_vit", 1, 64, False, False),
              ("d64_g7_masks", 7, 64, True, True))
    # The forward as launched on aligned tensors: q/k/v/o through tensor descriptors (TMA).
    kernels = ((K._attn_fwd_kernel, "fwd", False, dict(COUNT_TILES=False, TMA=True)),
               (K._attn_bwd_dq_kernel, "dq", True, {}),
               (K._attn_bwd_dkdv_kernel, "dkdv", True, dict(COUNT_TILES=False)))
    cases = []
    for fn, short, backward, extra in kernels:
        # the other pointers: q/k/v/o/do/dq/dk/dv bf16 (the default), the rest (block ids,
        # sequence bounds, tile counts) int32
        ptr_types = {n: "*i32" for n in fn.arg_names if n.endswith("_ptr") and n not in types
                     and n[:-4] not in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}
        # The JIT marks integer arguments divisible by 16 at launch; the strides of (B, H, S,
        # Dh) tensors with a unit Dh stride are multiples of Dh >= 16, and that hint is what
        # lets the K/V loads become 16-byte cp.async (pipelined). Without it this would compile
        # a kernel no launch runs (unpipelined, different registers).
        strides = frozenset(a for a in fn.arg_names if a.startswith("s") and "_" in a
                            and a.split("_")[1] in ("b", "h", "s"))
        # the dq kernel launches with its own tile (`dq_config`), the others with theirs
        tile_of = dq_config if short == "dq" else default_config
        tiles = [("default", G, Dh, causal, masks,
                  tile_of(_tune_key(backward, torch.bfloat16, Dh, causal, masks), True))
                 for _, G, Dh, causal, masks in shapes]
        # the tiles this check started from (bwd: 32 x 64, 8 warps)
        tiles.append(("test", 7, 128, True, True,
                      dict(BLOCK_M=32 if backward else 128, BLOCK_N=64, num_warps=8,
                           num_stages=2)))
        # fp16 and fp32 defaults (fp32 tiles take twice the shared memory; IEEE dots as FMAs)
        for dtype, dname in ((torch.float16, "fp16"), (torch.float32, "fp32")):
            for tag, G, Dh, causal, masks in (("d128_g7_masks", 7, 128, True, True),
                                              ("d128_g7_causal", 7, 128, True, False),
                                              ("d64_g1_vit", 1, 64, False, False)):
                cfg = tile_of(_tune_key(backward, dtype, Dh, causal, masks), True)
                tiles.append((dname, G, Dh, causal, masks, cfg))
        shape_names = [s[0] for s in shapes] + ["d128_g7_masks"] + \
            ["d128_g7_masks", "d128_g7_causal", "d64_g1_vit"] * 2
        # Every candidate the kernel's policy keeps (`pruned`: autotune may pick any of them),
        # for each dtype at Molmo's two head dims, at the masked GQA-7 shape (the most
        # registers). bf16 and fp16 share one prune (2-byte elements); both are compiled.
        policy = POLICIES["dq" if short == "dq" else backward]
        for dtype, dname in ((torch.bfloat16, "cand"), (torch.float16, "cand_fp16"),
                             (torch.float32, "cand_fp32")):
            for Dh in (64, 128):
                for cfg in policy.pruned(dict(dtype=dtype, head_dim=Dh, causal=True,
                                              masked=True)):
                    tiles.append((dname, 7, Dh, True, True, cfg))
                    shape_names.append(f"d{Dh}_g7_masks")
        for (tag, G, Dh, causal, masks, cfg), shape in zip(tiles, shape_names):
            fp32, fp16 = tag.endswith("fp32"), tag.endswith("fp16")
            consts = dict(G=G, HEAD_DIM=Dh, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          CAUSAL=causal, HAS_BLOCKS=masks, HAS_SEQ=masks, HAS_KPM=masks,
                          IEEE=fp32, **extra)
            name = f"{short}_{shape}_{tag}_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}" \
                   f"_w{cfg['num_warps']}_s{cfg['num_stages']}"
            elem = "*fp32" if fp32 else "*fp16" if fp16 else None
            io = {f"{n}_ptr": elem for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")
                  if elem and f"{n}_ptr" in fn.arg_names}
            cases.append(Case(name, fn, consts, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"], types={**types, **ptr_types, **io},
                              divisible=strides))
    # The persistent, longest-first forward (plain causal only, so no masks): at the causal
    # default of each dtype and every bf16 candidate the forward policy keeps without masks, at
    # both head dims.
    fwd = K._attn_fwd_kernel
    fwd_ptrs = {n: "*i32" for n in fwd.arg_names if n.endswith("_ptr") and n not in types
                and n[:-4] not in ("q", "k", "v", "o")}
    fwd_strides = frozenset(a for a in fwd.arg_names if a.startswith("s") and "_" in a
                            and a.split("_")[1] in ("b", "h", "s"))
    from molmoe.kernels.attention import persistent_fwd_config

    persistent = [(dname, Dh, dtype, default_config(_tune_key(False, dtype, Dh, True, False),
                                                    True))
                  for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                                       (torch.float32, "fp32")) for Dh in (64, 128)]
    persistent += [("cand", Dh, torch.bfloat16, cfg) for Dh in (64, 128)
                   for cfg in POLICIES[False].pruned(dict(dtype=torch.bfloat16, head_dim=Dh,
                                                          causal=True, masked=False))]
    # as launched: the persistent tile keeps q and o's staging beside the K/V stages
    persistent = [(tag, Dh, persistent_fwd_config(cfg, Dh, dtype))
                  for tag, Dh, dtype, cfg in persistent]
    seen = set()
    for tag, Dh, cfg in persistent:
        if cfg is None:  # does not fit: that shape launches one program per tile
            continue
        key = (tag, Dh, *sorted(cfg.items()))
        if key in seen:  # two candidates that differ only in stages the persistent tile drops
            continue
        seen.add(key)
        elem = {"fp16": "*fp16", "fp32": "*fp32"}.get(tag)
        io = {f"{n}_ptr": elem for n in ("q", "k", "v", "o")} if elem else {}
        consts = dict(G=7, HEAD_DIM=Dh, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      CAUSAL=True, HAS_BLOCKS=False, HAS_SEQ=False, HAS_KPM=False,
                      IEEE=tag == "fp32", COUNT_TILES=False, TMA=True, PERSISTENT=True)
        cases.append(Case(f"fwd_persistent_d{Dh}_{tag}_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}"
                          f"_w{cfg['num_warps']}_s{cfg['num_stages']}", fwd, consts,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          types={**types, **fwd_ptrs, **io}, divisible=fwd_strides))
    # The backward's delta = rowsum(o * do) kernel, at its fixed tile, each dtype and head dim.
    for dname, elem in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32")):
        for Dh in (64, 128):
            cases.append(Case(f"delta_d{Dh}_{dname}", K._attn_bwd_delta_kernel,
                              dict(HEAD_DIM=Dh, BLOCK_M=delta_block_m(Dh)), num_warps=4,
                              types=dict(o_ptr=elem, do_ptr=elem, delta_ptr="*fp32"),
                              divisible=frozenset({"so_b", "so_h", "so_s", "sdo_b", "sdo_h",
                                                   "sdo_s"})))
    return cases


@pytest.fixture(scope="module")
def sm90():
    from tests.sm90 import report

    return report("tests.test_attention")


def test_kernels_compile_for_h100_without_a_gpu(sm90):
    from tests.sm90 import SMEM_LIMIT

    # The interpreter does not type-check like the compiler (loop-carried types, scalar ifs):
    # compile the three kernels for sm_90 down to a cubin, in a subprocess because
    # TRITON_INTERPRET=1 replaces @triton.jit functions in this one (tests/sm90.py).
    r = sm90
    assert len(r) == len(sm90_cases())
    for name, res in r.items():
        assert "error" not in res, f"{name} does not compile for sm_90: {res['error']}"
        assert res["cubin_bytes"] > 0 and res["shared"] <= SMEM_LIMIT, (name, res)


def test_prune_drops_tiles_that_spilled_on_h100():
    from molmoe.kernels.attention import dq_configs, fits_dq

    # The register rules of prune_configs against tiles measured to spill on sm_90 (bf16, every
    # mask on): they must be dropped, and the GPU defaults (compiled above) must survive.
    fwd128 = prune_configs(kernel_configs(True), 128, 2)
    # 128 x 128 on 8 warps spilled 16 B with pointer loads; with K/V by TMA it took 223
    # registers and is kept (compiled with every other kept candidate above)
    assert dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3) in fwd128
    assert not [c for c in fwd128 if c["num_warps"] == 4 and c["BLOCK_M"] == 128]  # 88..1608 B
    # one warpgroup with 64 x 128 scores spilled at Dh 64 too (fwd 456..472 B, dq 552 B)
    fwd64 = prune_configs(kernel_configs(True), 64, 2)
    assert not [c for c in fwd64 if c["num_warps"] == 4 and c["BLOCK_N"] == 128]
    assert dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2) in fwd64
    dq64 = [c for c in dq_configs(True) if fits_dq(c, 64, 2)]
    assert dq64 and not [c for c in dq64 if c["num_warps"] == 4 and c["BLOCK_N"] == 128]
    # fp32 (IEEE dots as FMAs): at Dh 128 only 16 x 16 on 8 warps compiled spill-free, in all
    # three kernels (32 x 32 on 8 warps spilled 160..688 B); Dh 64 keeps 32 x 32
    for backward in (False, True):
        f128 = prune_configs(kernel_configs(True, backward, torch.float32), 128, 4, backward)
        assert {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in f128} == {(16, 16, 8)}
        f64 = prune_configs(kernel_configs(True, backward, torch.float32), 64, 4, backward)
        assert (32, 32, 8) in {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in f64}
    bwd128 = prune_configs(kernel_configs(True, True), 128, 2, backward=True)
    assert bwd128 and all(c["num_warps"] == 8 and c["BLOCK_M"] == 32 for c in bwd128)
    bwd64 = prune_configs(kernel_configs(True, True), 64, 2, backward=True)
    assert dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=2) not in bwd64  # 320 B
    assert dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2) not in bwd64  # 8 B
    for Dh in (64, 128):
        for backward in (False, True):
            kept = prune_configs(kernel_configs(True, backward), Dh, 2, backward)
            for masked in (False, True):
                key = _tune_key(backward, torch.bfloat16, Dh, True, masked)
                assert default_config(key, True) in kept


def test_defaults_fit_their_dtype_and_pins_are_checked(monkeypatch):
    # The defaults were pruned at one element size: an fp32 128 x 64 forward in 3 stages needs
    # (2*64*3 + 128) * 128 * 4 = 262,144 B at Dh 128, past sm_90's 232,448.
    from molmoe.kernels.attention import POLICIES, fits
    from molmoe.kernels._common import element_size

    monkeypatch.delenv("MOLMOE_ATTENTION_CONFIG", raising=False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for Dh in (64, 128):  # Molmo's (at 256 no backward candidate passes the spill rule)
            for backward in (False, True):
                for causal, masked in ((True, True), (True, False), (False, False)):
                    cfg = default_config(_tune_key(backward, dtype, Dh, causal, masked), True)
                    assert fits(cfg, Dh, element_size(dtype), backward), (dtype, Dh, cfg)
    assert POLICIES[False].pruned(dict(dtype=torch.float32, head_dim=128, causal=True,
                                       masked=False))
    monkeypatch.setenv("MOLMOE_ATTENTION_CONFIG", "BLOCK_M=64,BLOK_N=64")
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['BLOK_N'\]; valid names: "
                                         r"\['BLOCK_M', 'BLOCK_N', 'num_stages', 'num_warps'\]"):
        default_config(_tune_key(False, torch.float16, 64, True, False), True)


def test_forward_is_hopper_shaped_on_h100(sm90):
    # Issue 15: the forward loads by TMA (cp.async.bulk.tensor) and its wgmma are 128 wide
    # (n = 128: QK^T on 128-key tiles), for the default and every kept candidate (bf16/fp16;
    # fp32 runs IEEE dots as FMAs, no wgmma).
    for case in sm90_cases():
        if not case.name.startswith("fwd_") or "_test_" in case.name:
            continue
        r = sm90[case.name]
        assert r["tma"], f"{case.name}: no cp.async.bulk.tensor"
        # n >= 128 where the tile allows it: 64 rows per warpgroup (with 8 warps and 64 rows
        # the two warpgroups split n: 64x128 on 8 warps runs n = 64) and 128 keys or Dh 128
        c = case.consts
        if "_fp32_" not in case.name and c["BLOCK_M"] >= 16 * case.num_warps and \
                max(c["BLOCK_N"], c["HEAD_DIM"]) >= 128:
            assert r["wgmma_n"] >= 128, (case.name, r)
    defaults = [c for c in sm90_cases() if c.name.startswith("fwd_") and "_default_" in c.name]
    assert defaults and all(c.consts["BLOCK_M"] == c.consts["BLOCK_N"] == 128 for c in defaults)


def test_dq_runs_on_wgmma_at_head_dim_128(sm90):
    # Issue 15: dq has its own config, 64 rows per warpgroup, so its dots are wgmma, not the
    # mma.sync the shared 32-row backward tile compiled to.
    for case in sm90_cases():
        if case.name.startswith("dq_d128") and ("_default_" in case.name or "_fp16_" in case.name):
            assert sm90[case.name]["wgmma"] and not sm90[case.name]["mma"], \
                (case.name, sm90[case.name])


def test_softmax_scale_is_one_fma_and_unguarded_without_masks(sm90):
    # Issue 15: the scale is not a pass over the score tile of its own: every kernel computes
    # exp2(fma(s, scale * log2 e, -max)) (fwd) / exp2(fma(s, c, -lse)) (dq, dk/dv), one math.fma
    # per stage in the IR. The forward's guard against a row max of -inf (`m == -inf`, a float
    # equality compare and select per row and tile) is compiled only where a row can have no key
    # (packed sequences, key padding); plain causal, image blocks and the ViT have none.
    for case in sm90_cases():
        if case.name.startswith("delta_"):
            continue
        r, c = sm90[case.name], case.consts
        assert r["fma"] >= 1, (case.name, r)
        if case.name.startswith("fwd_"):
            if c["HAS_SEQ"] or c["HAS_KPM"]:
                assert r["cmpf_oeq"] >= 1, (case.name, r)  # the guard is there where needed
            else:
                assert r["cmpf_oeq"] == 0, (case.name, r)
    unmasked = [c for c in sm90_cases() if c.name.startswith("fwd_") and not c.consts["HAS_KPM"]]
    assert {c.consts["CAUSAL"] for c in unmasked} == {True, False}


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_kernel_matches_its_reference(dtype):
    # delta = rowsum(o * do) in fp32 (the backward's preprocessing) by its own kernel: one row,
    # rows not a multiple of its tile (16 at Dh 128, 32 at Dh 64), transposed (strided) views
    from molmoe.kernels.attention import attention_delta, attention_delta_ref, delta_block_m

    g = torch.Generator().manual_seed(11)
    for B, H, S, Dh in ((1, 1, 1, 16), (2, 3, 37, 64), (1, 2, 45, 128), (1, 2, 3, 256)):
        o, do = (torch.randn(B, S, H, Dh, generator=g).to(DEV, dtype).transpose(1, 2)
                 for _ in range(2))
        if S > 1:  # what each shape is for
            assert S % delta_block_m(Dh) and not o.is_contiguous()
        got = attention_delta(o, do)
        want = attention_delta_ref(o, do)
        assert got.dtype == torch.float32 and got.shape == (B, H, S) and got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-5 * Dh ** 0.5, rtol=1e-5)
    assert attention_delta(o[:, :, :0], do[:, :, :0]).shape == (B, H, 0)


def test_backward_takes_delta_from_the_kernel(monkeypatch):
    # The backward calls attention_delta once (no fp32 copies of o and do in torch); a wrong
    # delta must show in dq / dk (so the gradients test the kernel's delta, not a recompute).
    from molmoe.kernels import attention as A

    q, k, v, do = make(1, 2, 1, 20, 20, 16, torch.float32, seed=3)
    calls, real = [], A.attention_delta
    monkeypatch.setattr(A, "attention_delta", lambda o, d: calls.append(1) or real(o, d))
    got = run_kernel(q, k, v, do, causal=True)
    assert calls == [1]
    monkeypatch.setattr(A, "attention_delta", lambda o, d: real(o, d) + 1.0)
    wrong = run_kernel(q, k, v, do, causal=True)
    assert torch.equal(got[0], wrong[0]) and torch.equal(got[3], wrong[3])  # o, dv: no delta
    assert not torch.allclose(got[1], wrong[1]) and not torch.allclose(got[2], wrong[2])


def test_scale_must_be_positive():
    # The kernels scale the raw row max (max(s) * c == max(s * c) only for c > 0).
    q, k, v, _ = make(1, 2, 2, 8, 8, 16, torch.float32)
    for bad in (0.0, -0.125, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            attention(q, k, v, scale=bad)


def test_dq_has_its_own_pinnable_tile(monkeypatch):
    from molmoe.kernels.attention import dq_config

    key = _tune_key(True, torch.bfloat16, 128, True, True)
    monkeypatch.delenv("MOLMOE_ATTENTION_BWD_CONFIG", raising=False)
    monkeypatch.delenv("MOLMOE_ATTENTION_DQ_CONFIG", raising=False)
    assert dq_config(key, True) == dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    assert default_config(key, True)["BLOCK_M"] == 32  # dk/dv keeps its 32-row query tiles
    monkeypatch.setenv("MOLMOE_ATTENTION_BWD_CONFIG", "BLOCK_M=64,BLOCK_N=64")  # both kernels
    monkeypatch.setenv("MOLMOE_ATTENTION_DQ_CONFIG", "num_warps=4")  # then dq alone
    assert dq_config(key, True) == dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    assert default_config(key, True)["num_warps"] == 8
    monkeypatch.setenv("MOLMOE_ATTENTION_DQ_CONFIG", "BLOCK=64")
    with pytest.raises(ValueError, match=r"MOLMOE_ATTENTION_DQ_CONFIG='BLOCK=64': unknown"):
        dq_config(key, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dq_on_its_own_tile_in_the_interpreter(dtype, monkeypatch):
    """dq pinned to a tile unlike dk/dv's (32 x 16 against 16 x 32; the interpreter otherwise
    gives both the same): gradients still equal the reference, with causal masking, image
    blocks and key padding over several tiles of each kind, and dq itself changes only by
    rounding."""
    Sq, Sk = 45, 61
    ids = torch.stack([_blocks(Sk, [(20, 40, 0), (50, 58, 1)]), _blocks(Sk, [(25, 35, 4)])])
    kpm = torch.ones(2, Sk, dtype=torch.bool)
    kpm[1, :9] = False
    q, k, v, do = make(2, 4, 2, Sq, Sk, 64, dtype, seed=9)
    kw = dict(causal=True, image_block_ids=ids.to(DEV), key_padding_mask=kpm.to(DEV))
    monkeypatch.delenv("MOLMOE_ATTENTION_DQ_CONFIG", raising=False)
    same = run_kernel(q, k, v, do, **kw)
    monkeypatch.setenv("MOLMOE_ATTENTION_DQ_CONFIG", "BLOCK_M=32,BLOCK_N=16")
    own = check(q, k, v, do, loop_mask(2, Sq, Sk, True, blocks=ids, kpm=kpm), **kw)
    for a, b in zip(same[2:], own[2:]):  # dk, dv: their kernel did not change
        assert torch.equal(a, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (own[1].float() - same[1].float()).abs().max() <= tol * same[1].abs().max()


def test_kernels_do_not_spill_on_h100(sm90):
    from tests.sm90 import SMEM_LIMIT, check

    # Every case: the defaults of each dtype and every candidate each policy keeps for bf16,
    # fp16 and fp32 at Dh 64 and 128 (fp32 at Dh 128 included: 16 x 16 tiles there): compiled,
    # no spill, shared memory within the limit, K/V (q/do) loads pipelined (cp.async).
    names = [c.name for c in sm90_cases()]
    for dtype in ("cand_", "cand_fp16_", "cand_fp32_"):
        for Dh in (64, 128):
            for short in ("fwd", "dq", "dkdv"):
                assert any(n.startswith(f"{short}_d{Dh}_g7_masks_{dtype}") for n in names), \
                    (short, Dh, dtype)  # no kernel is left without a checked candidate
    assert any("_fp32_16x16_" in n and n.startswith("dkdv_d128") for n in names)
    for case in sm90_cases():
        r = sm90.get(case.name)
        if case.name.startswith("delta_"):  # no GEMM, no loop to pipeline
            check(r, case.name)
            continue
        fp32 = "_fp32_" in case.name  # IEEE dots: FMAs, no tensor cores
        check(r, case.name, tensor_core=None if fp32 else "mma_any", cp_async=True)
        assert r["shared"] <= SMEM_LIMIT
    assert len([c for c in sm90_cases() if c.name.startswith("delta_")]) == 6


# ----------------------------------------------------------------------------- model


# The tiny ViT runs 577 tokens per crop: 128-wide tiles keep the interpreter to a few seconds
# (tile edges are covered above with the small default tiles).
BIG_TILES = "BLOCK_M=128,BLOCK_N=128,num_warps=1,num_stages=1"


@pytest.fixture
def big_tiles(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("MOLMOE_ATTENTION_CONFIG", BIG_TILES)
        monkeypatch.setenv("MOLMOE_ATTENTION_BWD_CONFIG", BIG_TILES)


@pytest.mark.parametrize("name", ["tiny-molmoe", "tiny-7b-d"])
def test_model_with_images_matches_reference(name, big_tiles):
    # The kernel serves the ViT (non-causal, fp32) and the decoder (causal, GQA for 7b-d).
    model = random_model(name)
    ids, images, masks, idx = random_inputs(model.config, batch=1, crops=1, text=10)
    with torch.no_grad():
        want = model(ids, images, masks, idx)
    calls = []

    def counted(q, k, v, **kw):
        calls.append(kw["causal"])
        return attention(q, k, v, **kw)

    model.set_ops(dataclasses.replace(REFERENCE_OPS, attention=counted))
    with torch.no_grad():
        got = model(ids, images, masks, idx)
    cfg = model.config
    assert calls.count(False) == cfg.vision.num_layers and calls.count(True) == cfg.text.n_layers
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_model_chunked_prefill_through_kv_cache():
    # Prefill in two chunks; the second (> DECODE_MAX_NEW_TOKENS new tokens against the cache)
    # runs the kernel with Sq < Sk; left padding in batch 1 exercises the key padding mask.
    model = random_model("tiny-7b-d")
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, model.config.text.vocab_size, (2, 40), generator=g)
    ids[1, :6] = -1
    pos = (torch.cumsum((ids != -1).long(), -1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids)
    shapes = []

    def counted(q, k, v, **kw):
        shapes.append((q.shape[2], k.shape[2], kw.get("key_padding_mask") is not None))
        return attention(q, k, v, **kw)

    model.set_ops(dataclasses.replace(REFERENCE_OPS, attention=counted))
    with torch.no_grad():
        cache = model.new_kv_cache(2, 40)
        first = model(ids[:, :15], kv_cache=cache, position_ids=pos[:, :15])
        second = model(ids[:, 15:], kv_cache=cache, position_ids=pos[:, 15:])
    assert (25, 40, True) in shapes  # the second chunk really ran with Sq < Sk and padding
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=2e-5, rtol=1e-4)


def test_model_training_gradients_match_reference(big_tiles):
    # One backward through the tiny dense model, ViT included: parameter grads equal the
    # reference's.
    model = random_model("tiny-7b-d")
    ids, images, masks, idx = random_inputs(model.config, batch=1, crops=1, text=6)

    def grads():
        model.zero_grad()
        model(ids, images, masks, idx).float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads()
    model.set_ops(dataclasses.replace(REFERENCE_OPS, attention=attention))
    got = grads()
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=2e-5, rtol=1e-3, msg=n)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,Dh,causal", [(16, 16, 128, True), (28, 4, 128, True),
                                              (64, 8, 128, True), (16, 16, 64, False)])
def test_bf16_against_reference_gpu(Hq, Hkv, Dh, causal):
    S = 1000
    q, k, v, do = make(2, Hq, Hkv, S, S, Dh, torch.bfloat16, seed=9)
    ids = torch.stack([_blocks(S, [(1, 577, 0), (600, 744, 1)]), _blocks(S, [])]).to(DEV)
    kpm = torch.ones(2, S, dtype=torch.bool, device=DEV)
    kpm[1, :100] = False
    kw = dict(causal=causal, key_padding_mask=kpm)
    if causal:
        kw["image_block_ids"] = ids
    check(q, k, v, do, loop_mask(2, S, S, causal, blocks=ids.cpu() if causal else None,
                                 kpm=kpm.cpu()), **kw)


@pytest.mark.gpu
def test_bf16_packed_and_deterministic_gpu():
    cu = torch.tensor([0, 1, 700, 2000, 2048], dtype=torch.int32, device=DEV)
    q, k, v, do = make(1, 28, 4, 2048, 2048, 128, torch.bfloat16, seed=10)
    a = run_kernel(q, k, v, do, cu_seqlens=cu)
    b = run_kernel(q, k, v, do, cu_seqlens=cu)
    for x, y in zip(a, b):  # no atomics: bitwise reproducible
        assert torch.equal(x, y)
    want = run_ref(q, k, v, do, True, causal=True, cu_seqlens=cu)
    low = run_ref(q, k, v, do, False, causal=True, cu_seqlens=cu)
    for x, r, lo in zip(a, want, low):
        err = (x.float() - r.float()).abs().max().item()
        assert err <= 2 * (lo.float() - r.float()).abs().max().item() + 1e-2 * r.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_persistent_longest_first_forward_equals_the_per_tile_grid(dtype, monkeypatch):
    # Plain causal attention runs a fixed grid that strides over every (query tile, head) tile,
    # the last query tiles (the most keys) first; MOLMOE_ATTN_PERSISTENT=0 launches one program
    # per tile. Same bits for o, lse, the gradients and the per-tile key counts; masked
    # attention (here key padding) keeps the per-tile grid.
    from molmoe.kernels import attention as A

    q, k, v, _ = make(2, 4, 2, 70, 70, 16, dtype, seed=5)
    cfg = A.default_config(A._tune_key(False, dtype, 16, True, False), False)
    n_m = -(-70 // cfg["BLOCK_M"])
    assert n_m >= 3  # several query tiles per head, more tiles than programs
    assert A.persistent_fwd_programs(n_m * 8, cfg, 16, dtype, q.device, True) == 3
    assert A.persistent_fwd_programs(n_m * 8, cfg, 16, dtype, q.device, False) == 0

    def run():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, lse, counts = A._launch_fwd(qq, kk, vv, None, None, None, True, 0.25, True)
        out = attention(qq, kk, vv, causal=True)
        out.float().square().sum().backward()
        return o, lse, counts, out, qq.grad, kk.grad, vv.grad

    persistent = run()
    monkeypatch.setenv("MOLMOE_ATTN_PERSISTENT", "0")
    grid = run()
    for a, b in zip(persistent, grid):
        assert torch.equal(a, b)
    assert persistent[2].sum() > 0  # the counts were written through the loop's indices
    want = attention_ref(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(persistent[3].float(), want, atol=2e-3, rtol=2e-3)
