"""The MoE benchmark's baselines (bench/moe_baselines.py) against the reference, and bench_moe's CPU
path. torch._grouped_mm runs on the CPU in torch 2.13 (fp32/fp16/bf16, with autograd), so the
grouped_mm baseline is checked here with the real op, and again with the plain-loop emulation of
the same offsets contract, so the sort / offsets / combine code is checked independently of it.
"""
import json

import pytest
import torch

from bench.moe_baselines import (grouped_mm_loop, grouped_mm_moe_ffn, megablocks_dmoe,
                                 megablocks_grads_in_our_layout, sort_by_expert)
from molmoe.ops import moe_ffn_ref

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
GMMS = [pytest.param(grouped_mm_loop, id="loop-emulation"),
        pytest.param(getattr(torch, "_grouped_mm", None), id="torch._grouped_mm",
                     marks=pytest.mark.skipif(not HAS_GROUPED_MM, reason="no torch._grouped_mm"))]


def make(T, D, Fd, E, dtype=torch.float32, seed=0, one_expert=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    router_w = torch.randn(E, D, generator=g) / D**0.5
    if one_expert is not None:  # every token's top-1 is this expert: its logit dominates
        x[:, 0] = 4.0
        router_w[one_expert, 0] = 30.0
    w_gate = torch.randn(E, Fd, D, generator=g) / D**0.5
    w_up = torch.randn(E, Fd, D, generator=g) / D**0.5
    w_down = torch.randn(E, D, Fd, generator=g) / Fd**0.5
    return [t.to(dtype) for t in (x, router_w, w_gate, w_up, w_down)]


def run(fn, args, top_k, renormalize, gy):
    leaves = [a.detach().requires_grad_() for a in args]
    y, aux = fn(*leaves, top_k, renormalize)
    grads = torch.autograd.grad(y, leaves, gy, allow_unused=True) if y.numel() else [None] * 5
    return y, aux, grads


@pytest.mark.parametrize("gmm", GMMS)
def test_loop_emulation_matches_grouped_mm_offsets(gmm):
    # Offsets are cumulative END offsets: empty first, middle and last groups, one full group.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(11, 8, generator=g)  # widths multiples of 16 bytes: torch._grouped_mm's rule
    b = torch.randn(5, 8, 12, generator=g)
    for ends in ([0, 3, 3, 9, 11], [11, 11, 11, 11, 11], [0, 0, 0, 0, 11], [2, 4, 6, 8, 11]):
        offs = torch.tensor(ends, dtype=torch.int32)
        start, want = 0, []
        for e, end in enumerate(ends):
            want.append(a[start:end] @ b[e])
            start = end
        torch.testing.assert_close(gmm(a, b, offs=offs), torch.cat(want), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="no torch._grouped_mm")
def test_grouped_mm_alignment_rule_holds_on_cpu_too():
    # The reason the odd-width cases below run on the loop emulation only.
    offs = torch.tensor([2, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="16 bytes"):
        torch._grouped_mm(torch.randn(5, 6), torch.randn(2, 6, 3), offs=offs)
    assert torch._grouped_mm(torch.randn(5, 8), torch.randn(2, 8, 4), offs=offs).shape == (5, 4)


def test_loop_emulation_rejects_bad_offsets():
    with pytest.raises(ValueError, match="int32"):
        grouped_mm_loop(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([1, 4]))


@pytest.mark.parametrize("T,E,K,seed", [(1, 4, 2, 0), (13, 8, 3, 1), (40, 6, 6, 2), (7, 5, 1, 3)])
def test_sort_by_expert_invariants(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # (T, K) distinct
    order, token, counts, offs = sort_by_expert(idx, E)
    flat = idx.reshape(-1)
    assert int(counts.sum()) == T * K and offs.dtype == torch.int32 and int(offs[-1]) == T * K
    assert torch.equal(counts.long(), torch.bincount(flat, minlength=E))
    assert torch.equal(torch.sort(order).values, torch.arange(T * K))  # a permutation
    assert torch.equal(flat[order], torch.sort(flat, stable=True).values)  # grouped by expert
    assert torch.equal(token, order // K)
    start = 0
    for e in range(E):  # within an expert, slots keep their order: deterministic
        seg = order[start:int(offs[e])]
        assert torch.all(seg[1:] > seg[:-1])
        start = int(offs[e])


# (T, D, F, E, K, renormalize, one_expert, reason)
CASES = [
    (1, 16, 8, 4, 2, False, None, "one token: decode"),
    (3, 36, 20, 8, 1, False, None, "k = 1; widths not powers of two"),
    (17, 16, 8, 5, 5, True, None, "k = E: every expert gets every token; renormalised"),
    (20, 24, 12, 8, 2, False, 3, "every token's top-1 on one expert"),
    (5, 16, 8, 16, 2, True, None, "more experts than slots: empty experts"),
    (64, 32, 16, 8, 3, False, None, "many tokens per expert"),
    (9, 33, 17, 7, 3, False, None, "odd and prime widths (loop emulation only: alignment)"),
]


@pytest.mark.parametrize("gmm", GMMS)
@pytest.mark.parametrize("T,D,Fd,E,K,renorm,one,reason", CASES, ids=[c[-1] for c in CASES])
def test_grouped_mm_moe_matches_reference_fp32(T, D, Fd, E, K, renorm, one, reason, gmm):
    if gmm is not grouped_mm_loop and (D % 4 or Fd % 4):  # fp32: 16 bytes = 4 elements
        with pytest.raises(RuntimeError, match="16 bytes"):  # its alignment rule, stated
            grouped_mm_moe_ffn(*make(T, D, Fd, E), K, renorm, gmm=gmm)
        return
    args = make(T, D, Fd, E, one_expert=one)
    gy = torch.randn(T, D, generator=torch.Generator().manual_seed(9))
    y_ref, aux_ref, g_ref = run(moe_ffn_ref, args, K, renorm, gy)
    fn = lambda *a: grouped_mm_moe_ffn(*a, gmm=gmm)  # noqa: E731
    y, aux, grads = run(fn, args, K, renorm, gy)
    if one is not None:
        assert int(aux["counts"][one]) == T
    if E > T * K:
        assert (aux["counts"] == 0).any()
    assert torch.equal(aux["topk_idx"], aux_ref["topk_idx"])
    assert torch.equal(aux["counts"].long(), aux_ref["counts"])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "router_w", "w_gate", "w_up", "w_down"), grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="no torch._grouped_mm")
def test_grouped_mm_moe_bf16_error_within_twice_torch_own():
    # bf16, as on the GPU: error vs the fp32 reference <= 2x the bf16 reference's + a floor.
    args32 = make(48, 64, 32, 8)
    args = [a.to(torch.bfloat16) for a in args32]
    # Compare only tokens routed alike in fp32 and bf16: the expert math, not near-ties.
    y32, aux32 = moe_ffn_ref(*[a.float() for a in args], 2)
    y_lp, aux_lp = moe_ffn_ref(*args, 2)
    y, _ = grouped_mm_moe_ffn(*args, 2)
    same = (torch.sort(aux32["topk_idx"]).values == torch.sort(aux_lp["topk_idx"]).values).all(-1)
    assert same.float().mean() > 0.8  # the comparison covers most tokens
    err = (y.float() - y32)[same].abs().max()
    torch_err = (y_lp.float() - y32)[same].abs().max()
    assert err <= 2 * torch_err + 1e-3 * y32.abs().max(), (err, torch_err)


def test_empty_batch():
    args = make(0, 16, 8, 4)
    y, aux = grouped_mm_moe_ffn(*args, 2, gmm=grouped_mm_loop)
    assert y.shape == (0, 16) and int(aux["counts"].sum()) == 0


@pytest.mark.gpu
def test_megablocks_dmoe_same_weights_matches_reference():
    pytest.importorskip("megablocks")
    torch.manual_seed(0)
    x, router_w, w_gate, w_up, w_down = (t.cuda().to(torch.bfloat16) for t in make(64, 256, 128, 8))
    layer, fn = megablocks_dmoe(router_w, w_gate, w_up, w_down, 2)
    y_ref, _ = moe_ffn_ref(x, router_w, w_gate, w_up, w_down, 2)
    y = fn(x)
    assert (y.float() - y_ref.float()).abs().max() < 3e-2 * y_ref.abs().max()
    params, maps = megablocks_grads_in_our_layout(layer, 8, 128, 256)
    assert torch.equal(maps["w_down"](params["w_down"].detach()), w_down)
    assert torch.equal(maps["w_gate"](params["w_gate"].detach()), w_gate)


def test_bench_cpu_path_runs(tmp_path):
    # The benchmark's one command on this machine: reference figures, JSON + PNG, GPU note.
    from bench.bench_moe import main

    path = main(["--quick", "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    rows = payload["rows"]
    assert {"reference", "grouped_mm"} <= {r["impl"] for r in rows}
    assert {r["case"]["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["tflops"] > 0 for r in rows)
    assert all(r["gbps"] > 0 for r in rows if r["case"]["pass"] == "fwd")
    assert (tmp_path / "moe.png").exists()
    if not torch.cuda.is_available():
        assert any("need a GPU" in n for n in payload["notes"])


def test_bench_correctness_gate_passes_baselines_and_catches_a_wrong_contender(monkeypatch):
    # The GPU run's check, on the CPU in fp32: the baselines pass, a 1%-off contender is caught
    # and reported (it would not be timed).
    import bench.bench_moe as bm

    monkeypatch.setattr(bm, "CHECK_TOKENS", 24)
    layer = bm.Layer("t", D=64, F=32, E=8, K=2)
    w = bm.make_weights(layer, torch.float32, "cpu")
    cands, _ = bm.contenders(layer, w, gpu=False, triton=False)
    cands["off"] = bm.functional(
        "off", lambda *a: (moe_ffn_ref(*a)[0] * 1.01, None), w, layer.K)
    lines, failed = bm.check(cands, layer, w, torch.float32)
    assert set(failed) == {"off"} and "y max error" in failed["off"]
    assert sum("ok" in ln for ln in lines) == len(cands) - 1


def test_bench_targets_read_the_right_rows():
    from bench.bench_moe import targets
    from bench.common import Record, Timing

    def rec(impl, T, ps, ms):
        return Record("moe", impl, {"T": T, "pass": ps}, Timing(ms, ms, ms), flops=1e12,
                      bytes=1e9 if ps == "fwd" else None)

    peaks = {"matmul_tflops": 1000.0, "copy_gbps": 1000.0}
    rows = [rec("triton", 4, "fwd", 1.2), rec("triton", 4096, "fwd", 1.5),
            rec("grouped_mm", 4096, "fwd", 1.4), rec("megablocks", 4096, "fwd", 2.0)]
    lines = targets(rows, peaks)
    assert any("decode T=4" in ln and "83%" in ln and ln.endswith("met") for ln in lines)
    # 1e12 FLOP in 1.5 ms = 667 TFLOP/s = 67% MFU, but slower than grouped_mm: not met.
    assert any("T=4096 fwd" in ln and "67% MFU" in ln and "NOT met" in ln for ln in lines)
