"""bench_attention's masks, FLOP count and CPU path.

The benchmark's claims rest on three things checked here: the Molmo prompt layout it builds, the
boolean mask and FlexAttention mask_mod it derives from that layout being the SAME mask (and the
one the `attention` contract defines: allowed(i, j) = j <= i or block[i] == block[j] >= 0), and
the FLOP count taken from that mask.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from bench.bench_attention import (IMAGE_TOKENS, TEXT_PREFIX, Case, allowed_mask, mask_mod_for,
                                   molmo_block_ids)


def loop_mask(ids, causal):
    """The contract's definition, written as loops: an independent oracle."""
    S = len(ids)
    return torch.tensor([[(j <= i if causal else True) or (ids[i] == ids[j] and ids[i] >= 0)
                          for j in range(S)] for i in range(S)])


def blocks(ids):
    out = {}
    for pos, b in enumerate(ids.tolist()):
        if b >= 0:
            out.setdefault(b, []).append(pos)
    return out


@pytest.mark.parametrize("S,n_images,first_len", [(512, 1, 512 - TEXT_PREFIX - 32),
                                                  (1024, 1, IMAGE_TOKENS), (2048, 2, IMAGE_TOKENS),
                                                  (4096, 5, IMAGE_TOKENS)])
def test_molmo_layout(S, n_images, first_len):
    ids = molmo_block_ids(S)
    bl = blocks(ids)
    assert len(bl) == n_images and len(bl[0]) == first_len
    assert (ids[:TEXT_PREFIX] == -1).all() and (ids[-32:] == -1).all()  # text prefix and tail
    for pos in bl.values():  # each image one contiguous run
        assert pos == list(range(pos[0], pos[0] + len(pos)))


@pytest.mark.parametrize("causal", [True, False])
def test_allowed_mask_and_mask_mod_match_the_contract(causal):
    # Blocks at the start, back to back, in the middle; text between.
    ids = torch.tensor([0, 0, 0, -1, 1, 1, 2, 2, 2, 2, -1, -1, 3, 3, -1, 4], dtype=torch.int32)
    S = len(ids)
    want = loop_mask(ids.tolist(), causal)
    got = allowed_mask(ids[None], S, causal, "cpu")[0]
    assert torch.equal(got, want)
    if causal:
        mod = mask_mod_for("image", ids[None])
        q, kv = torch.arange(S)[:, None], torch.arange(S)[None, :]
        assert torch.equal(mod(torch.tensor(0), torch.tensor(0), q, kv), want)
        causal_mod = mask_mod_for("causal", None)
        assert torch.equal(causal_mod(0, 0, q, kv), loop_mask([-1] * S, True))


def test_flop_count_is_the_allowed_pairs():
    # Closed form: causal pairs S(S+1)/2, plus each image block's n(n-1)/2 pairs above the diagonal.
    S = 2048
    case = Case("molmoe", "image", 3, S)
    pairs = S * (S + 1) // 2 + sum(len(p) * (len(p) - 1) // 2
                                   for p in blocks(molmo_block_ids(S)).values())
    assert case.flops_fwd("cpu") == 4 * 128 * 16 * 3 * pairs
    assert Case("vit", "full", 2, 577).flops_fwd("cpu") == 4 * 64 * 16 * 2 * 577 * 577
    assert Case("7b-d", "causal", 1, 512).flops_fwd("cpu") == 4 * 128 * 28 * 512 * 513 // 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_sdpa_with_the_explicit_mask():
    # The benchmark's flex contender sees the same mask as its SDPA one (eager flex: the mask
    # semantics are the same as compiled, and it takes a second, not a compile).
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    S, B = 300, 2  # not a multiple of the 128-token block; a block straddles a block edge
    ids = torch.full((B, S), -1, dtype=torch.int32)
    ids[0, 5:200] = 0
    ids[1, 100:140], ids[1, 140:290] = 0, 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, S, 64, generator=g)
    k, v = torch.randn(B, 2, S, 64, generator=g), torch.randn(B, 2, S, 64, generator=g)
    bm = create_block_mask(mask_mod_for("image", ids), B, None, S, S, device="cpu")
    o = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    mask = allowed_mask(ids, S, True, "cpu")[:, None]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_bench_cpu_path_runs(tmp_path):
    # The benchmark's one command on this machine: PyTorch figures, JSON + PNG, GPU note.
    from bench.bench_attention import main

    path = main(["--quick", "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    rows = payload["rows"]
    impls = {(r["impl"], r["case"]["layout"], r["case"]["pass"]) for r in rows}
    assert {("sdpa", "causal", "fwd"), ("sdpa_mask", "image", "fwd+bwd"), ("flex", "image", "fwd"),
            ("reference", "causal", "fwd+bwd")} <= impls
    assert all(r["tflops"] > 0 for r in rows)
    assert (tmp_path / "attention.png").exists()
    if not torch.cuda.is_available():
        assert any("need a GPU" in n for n in payload["notes"])
        # the 16k target shape is skipped here, and the run says so
        assert any("16384" in n and "skipped" in n for n in payload["notes"])


def test_bench_grid_covers_the_16k_target():
    from bench.bench_attention import TARGET_S, grid

    for quick in (False, True):  # a GPU run measures S = 16384, quick or not
        cases = grid(True, quick)
        assert {(c.model, c.layout) for c in cases if c.S == TARGET_S} >= {
            ("molmoe", "causal"), ("7b-d", "causal"), ("molmoe", "image")}
        assert all(c.B >= 1 for c in cases)
    assert max(c.S for c in grid(False, True)) < TARGET_S  # the CPU run stays small


def test_bench_correctness_gate_catches_a_wrong_contender(monkeypatch):
    # The GPU run's check on the CPU (fp32, small): SDPA passes, a 1%-off contender is caught.
    from bench.bench_attention import MODELS, Model, check_impls, implementations

    monkeypatch.setitem(MODELS, "vit", Model(4, 4, 64))
    case = Case("vit", "full", 1, 45)
    q, k, v, blk = case.tensors(torch.float32, "cpu")
    impls, _ = implementations(case, q, k, v, blk, gpu=False, triton=False)
    impls.pop("flex")  # no FlexAttention backward on the CPU
    impls["off"] = lambda q, k, v: impls["reference"](q, k, v) * 1.01
    lines, failed = check_impls(case, impls, q, k, v)
    assert set(failed) == {"off"} and "o max error" in failed["off"]
    assert sum(ln.endswith("ok") for ln in lines) == 2  # reference, sdpa


def test_bench_targets():
    from bench.bench_attention import targets
    from bench.common import Record, Timing

    def rec(impl, layout, ms):
        return Record("attention", impl, {"model": "molmoe", "layout": layout, "S": 1024,
                                          "pass": "fwd"}, Timing(ms, ms, ms), flops=1e12)

    lines = targets([rec("triton", "causal", 1.0), rec("sdpa_flash", "causal", 0.9),
                     rec("triton", "image", 1.0), rec("flex", "image", 1.4)])
    r16 = Record("attention", "triton", {"model": "molmoe", "layout": "causal", "S": 16384,
                                          "pass": "fwd"}, Timing(2.0, 2.0, 2.0), flops=1e12)
    assert any("S=16384 fwd: triton 500 TFLOP/s (>= 450): met" in ln for ln in targets([r16]))
    assert any("causal" in ln and "0.90x sdpa_flash" in ln and "NOT met" in ln for ln in lines)
    assert any("image" in ln and "1.40x flex" in ln and ln.endswith(": met") for ln in lines)
