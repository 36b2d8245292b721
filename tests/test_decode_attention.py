"""Decode attention (flash-decoding) against the reference, against SDPA with an explicit mask,
inside the tiny models' KV-cache decode, and (GPU only) in bf16 and under CUDA-graph replay.

Forward only: the op serves inference, so there is no backward to test.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from molmoe.ops import REFERENCE_OPS
from molmoe.kernels.decode_attention import (decode_attention, decode_attention_ref,
                                             kernel_configs, num_splits_heuristic)
from tests.tiny import random_inputs, random_model

TILE = kernel_configs(on_gpu=torch.cuda.is_available())[0]["BLOCK_N"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(B, Hq, Hkv, Sq, Sk, Dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, Dh, generator=g) for h, s in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    return q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype)


def sdpa_with_mask(q, k, v, lengths, key_padding_mask):
    """An independent oracle: build the (B, Sq, Sk) boolean mask by loops, then PyTorch SDPA."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    mask = torch.zeros(B, 1, Sq, Sk, dtype=torch.bool)
    for b in range(B):
        for i in range(Sq):
            pos = int(lengths[b]) - Sq + i
            for j in range(Sk):
                mask[b, 0, i, j] = j <= pos and (key_padding_mask is None or
                                                 bool(key_padding_mask[b, j]))
    g = Hq // k.shape[1]
    k, v = (t.float().cpu().repeat_interleave(g, dim=1) for t in (k, v))
    o = F.scaled_dot_product_attention(q.float().cpu(), k, v, attn_mask=mask)
    return torch.nan_to_num(o) * mask.any(-1, keepdim=True)  # empty rows: zeros by contract


def check_close(q, k, v, out, **kw):
    """Kernel error vs the fp32 reference <= 2x PyTorch's own low-precision error + a floor."""
    ref32 = decode_attention_ref(q, k, v, upcast=True, **kw).float()
    err = (out.float() - ref32).abs().max().item()
    torch_err = (decode_attention_ref(q, k, v, **kw).float() - ref32).abs().max().item()
    floor = 1e-5 if q.dtype == torch.float32 else 2e-3
    assert err <= 2 * torch_err + floor, (err, torch_err)
    assert not out.isnan().any()


# (B, Hq, Hkv, Sq, Sk, Dh, lengths, reason)
CASES = [
    (1, 4, 4, 1, 1, 64, [1], "one key in the cache: the first decode step"),
    (2, 4, 4, 1, TILE - 1, 64, [TILE - 1, TILE - 2], "less than one key tile"),
    (2, 4, 4, 1, TILE + 1, 128, [TILE + 1, TILE], "one key past a tile; Dh 128"),
    (2, 7, 1, 3, 300, 64, [3, 300], "very unequal lengths in one batch; GQA 7; Sq 3"),
    (1, 8, 1, 3, 2 * TILE + 5, 128, [2 * TILE + 5], "GQA 8, Sq 3 rows fill a 32-row tile"),
    (3, 2, 2, 1, 40, 64, [40, 17, 2], "GQA 1, lengths below the cache size"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,Dh,lengths,reason", CASES, ids=[c[-1] for c in CASES])
def test_matches_reference_and_sdpa(B, Hq, Hkv, Sq, Sk, Dh, lengths, reason, dtype):
    q, k, v = make(B, Hq, Hkv, Sq, Sk, Dh, dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    out = decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=1)
    check_close(q, k, v, out, cache_seqlens=seqlens)
    oracle = sdpa_with_mask(q, k, v, lengths, None)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(out.float().cpu(), oracle, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_left_padding_and_split_count_independence(dtype):
    # Left-padded prompts (the engine's layout) with one cache length shared by the batch.
    B, Hq, Hkv, Sq, Sk, Dh = 3, 4, 2, 3, 5 * TILE + 3, 64
    q, k, v = make(B, Hq, Hkv, Sq, Sk, Dh, dtype, seed=1)
    kpm = torch.ones(B, Sk, dtype=torch.bool)
    kpm[1, :7] = False  # short left padding
    kpm[2, : 3 * TILE] = False  # long left padding: several whole tiles masked
    kpm = kpm.to(DEV)
    outs = [decode_attention(q, k, v, key_padding_mask=kpm, num_splits=n) for n in (1, 2, 6)]
    for out in outs:
        check_close(q, k, v, out, key_padding_mask=kpm)
    for out in outs[1:]:  # same answer whatever the split count
        torch.testing.assert_close(out, outs[0], atol=1e-6 if dtype == torch.float32 else 2e-3,
                                   rtol=0)
    oracle = sdpa_with_mask(q, k, v, [Sk] * B, kpm.cpu())
    torch.testing.assert_close(outs[2].float().cpu(), oracle, atol=1e-5 if dtype == torch.float32
                               else 5e-3, rtol=1e-3)


def test_all_padding_split_and_empty_rows_give_no_nan():
    # 4 splits of one tile each: split 1 is all padding, splits 2-3 lie past sequence 0's
    # length; sequence 1 has a single key, so its first two query rows see nothing (zeros).
    B, Hq, Hkv, Sq, Sk, Dh = 2, 4, 2, 3, 4 * TILE, 64
    q, k, v = make(B, Hq, Hkv, Sq, Sk, Dh, torch.float32, seed=2)
    kpm = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
    kpm[0, TILE: 2 * TILE] = False
    kpm[1, : 3 * TILE] = False
    seqlens = torch.tensor([2 * TILE + 4, 3 * TILE + 1], dtype=torch.int32, device=DEV)
    out = decode_attention(q, k, v, cache_seqlens=seqlens, key_padding_mask=kpm, num_splits=4)
    assert not out.isnan().any()
    assert out[1, :, :2].abs().max() == 0  # rows with no key to attend: zeros by contract
    check_close(q, k, v, out, cache_seqlens=seqlens, key_padding_mask=kpm)
    torch.testing.assert_close(out.cpu(), sdpa_with_mask(q, k, v, seqlens.cpu(), kpm.cpu()),
                               atol=1e-5, rtol=1e-4)


def test_strided_cache_view_and_default_scale():
    # The decoder passes views k_cache[:, :, :end] of a longer buffer and q transposed from
    # (B, S, H, Dh); both are non-contiguous. An explicit scale must match the reference's.
    buf_k, buf_v = (torch.randn(2, 2, 50, 64, device=DEV) for _ in range(2))
    q = torch.randn(2, 3, 4, 64, device=DEV).transpose(1, 2)  # (B, H=4, S=3, Dh)
    k, v = buf_k[:, :, :37], buf_v[:, :, :37]
    for scale in (None, 0.3):
        out = decode_attention(q, k, v, scale=scale, num_splits=2)
        check_close(q, k, v, out, scale=scale)


def test_split_heuristic(monkeypatch):
    # One long sequence on a 132-SM device is split (fills the GPU); a large batch is not.
    assert num_splits_heuristic(1 * 8, 16384, 132, 64) >= 16
    assert num_splits_heuristic(32 * 16, 4096, 132, 64) == 1
    assert num_splits_heuristic(8, 300, 132, 64) == 1  # too short to be worth splitting
    monkeypatch.setenv("MOLMOE_DECODE_ATTENTION_SPLITS", "5")
    assert num_splits_heuristic(1, 16384, 132, 64) == 5
    monkeypatch.setenv("MOLMOE_DECODE_ATTENTION_SPLITS", "many")
    with pytest.raises(ValueError, match="MOLMOE_DECODE_ATTENTION_SPLITS"):
        num_splits_heuristic(1, 16384, 132, 64)


def test_tiles_are_pruned_for_the_dtype_and_tuning_skips_failures(monkeypatch):
    # The autotune once assumed 2-byte elements and let an out-of-resources candidate abort it.
    import triton.testing

    from molmoe.kernels import decode_attention as DA
    from molmoe.kernels._common import SMEM_LIMIT

    monkeypatch.delenv("MOLMOE_DECODE_ATTENTION_CONFIG", raising=False)
    ctx = dict(head_dim=256, block_m=64)
    kept = {dt: DA.POLICY.pruned(dict(ctx, dtype=dt)) for dt in (torch.bfloat16, torch.float32)}
    assert len(kept[torch.float32]) < len(kept[torch.bfloat16])  # 4-byte tiles: fewer fit
    for c in kept[torch.float32]:  # K + V stages and the q tile at 4 bytes an element
        assert (2 * c["BLOCK_N"] * c["num_stages"] + 64) * 256 * 4 <= SMEM_LIMIT
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for dh in (64, 128, 256):
            for bm in (16, 64):
                assert DA.fits(DA.default_config(dh, bm, True, dt), dh, bm, dt), (dt, dh, bm)

    q, k, v = make(1, 4, 2, 1, 32, 64, torch.float32)
    timed = []

    def fake_bench(run):  # 64-key tiles "run out of resources", 32 are the fastest
        cfg = DA.default_config(64, 16, True, torch.float32)
        timed.append(cfg["BLOCK_N"])
        if cfg["BLOCK_N"] == 64:
            raise RuntimeError("triton OutOfResources: shared memory")
        return 1.0 if cfg["BLOCK_N"] == 32 else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    best = DA.autotune(q, k, v)
    assert best["BLOCK_N"] == 32 and 64 in timed
    assert DA.default_config(64, 16, True, torch.float32) == best  # remembered, not re-timed
    DA.POLICY.tuned.clear()


def test_fp32_tiles_are_the_spill_free_ones():
    """fp32 caches run IEEE dots as FMAs with their tiles in registers: the 16-bit candidates
    spilled on sm_90 (tests/test_kernels_sm90.py compiles what is kept). Only tiles measured
    spill-free are kept; past 64 query rows none is, and the policy says so."""
    from molmoe.kernels import decode_attention as DA

    for bm in (16, 32, 64):
        kept = DA.POLICY.pruned(dict(dtype=torch.float32, head_dim=128, block_m=bm))
        assert kept and all((c["BLOCK_N"], c["num_warps"]) in DA._FP32_SPILL_FREE[bm]
                            for c in kept)
        assert DA.default_config(128, bm, True, torch.float32) in kept
    assert DA.default_config(128, 64, True, torch.bfloat16) == dict(BLOCK_N=64, num_warps=4,
                                                                     num_stages=3)
    assert DA.POLICY.pruned(dict(dtype=torch.float32, head_dim=128, block_m=128)) == []
    with pytest.warns(RuntimeWarning, match="decode_attention: no tile config fits"):
        DA.default_config(128, 128, True, torch.float32)


def test_bad_inputs_name_the_problem():
    q, k, v = make(1, 6, 4, 1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(q, k, v)
    q, k, v = make(1, 4, 2, 1, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim 48"):
        decode_attention(q, k, v)
    q, k, v = make(1, 4, 2, 1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="dtypes differ"):
        decode_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        decode_attention(q, k, v, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache_seqlens must be"):
        decode_attention(q, k, v, cache_seqlens=torch.ones(2, dtype=torch.int32))


def test_opcheck():
    q, k, v = make(2, 4, 2, 2, 40, 64, torch.float32)
    seqlens = torch.tensor([40, 9], dtype=torch.int32, device=DEV)
    kpm = torch.ones(2, 40, dtype=torch.bool, device=DEV)
    torch.library.opcheck(torch.ops.molmoe.decode_attention.default,
                          (q, k, v, seqlens, kpm, 0.125, 2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["tiny-molmoe", "tiny-7b-d"])
def test_model_kv_cache_decode_equals_full_recompute(name):
    # Prefill (prefill attention), then token-by-token decode through the installed op.
    model = random_model(name)
    calls = []

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return decode_attention(*args, **kw)

    model.set_ops(dataclasses.replace(REFERENCE_OPS, decode_attention=counted))
    ids, images, masks, idx = random_inputs(model.config, batch=2)
    S = ids.shape[1]
    with torch.no_grad():
        full = model(ids, images, masks, idx)
        cache = model.new_kv_cache(2, S + 4)
        steps = [model(ids[:, :-3], images, masks, idx, kv_cache=cache)]
        for s in range(S - 3, S):
            steps.append(model(ids[:, s:s + 1], kv_cache=cache, position_ids=torch.full((2, 1), s)))
    assert len(calls) == 3 * model.config.text.n_layers  # the op really served the decode steps
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)


def test_model_left_padded_decode_equals_full_recompute():
    # Left-padded batch (the engine's layout): the key mask, not the slot index, hides padding.
    model = random_model("tiny-7b-d")
    model.set_ops(dataclasses.replace(REFERENCE_OPS, decode_attention=decode_attention))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.text.vocab_size, (2, 14), generator=g)
    ids[1, :5] = -1
    mask = ids != -1
    pos = (torch.cumsum(mask.long(), -1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 16)
        model(ids[:, :-3], kv_cache=cache)
        steps = [model(ids[:, s:s + 1], kv_cache=cache, position_ids=pos[:, s:s + 1])
                 for s in range(11, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, -3:], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv", [(16, 16), (28, 4), (64, 8)])
def test_bf16_against_reference_gpu(Hq, Hkv):
    q, k, v = make(4, Hq, Hkv, 1, 3000, 128, torch.bfloat16, seed=4)
    seqlens = torch.tensor([3000, 1, 1500, 2999], dtype=torch.int32, device=DEV)
    kpm = torch.ones(4, 3000, dtype=torch.bool, device=DEV)
    kpm[2, :100] = False
    for n in (None, 1, 16):
        out = decode_attention(q, k, v, cache_seqlens=seqlens, key_padding_mask=kpm, num_splits=n)
        check_close(q, k, v, out, cache_seqlens=seqlens, key_padding_mask=kpm)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    q, k, v = make(2, 28, 4, 1, 4096, 128, torch.bfloat16, seed=5)
    seqlens = torch.tensor([100, 4000], dtype=torch.int32, device=DEV)
    eager = decode_attention(q, k, v, cache_seqlens=seqlens)  # also compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(q, k, v, cache_seqlens=seqlens)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    # New lengths and queries in the same buffers: replay follows the data, not the capture.
    seqlens.copy_(torch.tensor([4096, 7], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, decode_attention(q, k, v, cache_seqlens=seqlens))


def test_bench_cpu_path_runs(tmp_path):
    # The benchmark's one command on this machine: reference figures, JSON + PNG, GPU note.
    import json

    from bench.bench_decode_attention import main

    path = main(["--quick", "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    impls = {r["impl"] for r in payload["rows"]}
    assert {"reference", "sdpa"} <= impls
    assert all(r["gbps"] > 0 for r in payload["rows"])
    if not torch.cuda.is_available():
        assert any("need a GPU" in n for n in payload["notes"])
