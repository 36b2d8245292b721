"""Fused 2x2 patch pooling against the model's reference: forward and the gradients w.r.t. every
input that has one (feats, pad_embed, Wq/bq, Wk/bk, Wv/bv, Wo/bo), over grids, crop counts,
masks and dtypes chosen on purpose; structural invariants of the cell gather; opcheck; the tiny
models with the op installed; (GPU only) bf16 at Molmo's shapes; the benchmark's CPU path.
"""
import dataclasses

import pytest
import torch

from molmoe.ops import REFERENCE_OPS
from molmoe.kernels.patch_pool import patch_pool, patch_pool_ref
from tests.tiny import random_inputs, random_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["feats", "pad_embed", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo"]


def make_masks(kind, N, P, gen):
    """Processor-like image_masks (N, P): None; all ones (no padding anywhere); a mix of 0
    (all padding), partial fractions, 1 and -1 (counts as partial, spec §3.2) with whole cells
    of each; or the processor's layout (last crop all -1, others partly 0 at the edge)."""
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(N, P)
    if kind == "mixed":
        values = torch.tensor([0.0, 0.25, 0.7, 1.0, -1.0])
        m = values[torch.randint(0, 5, (N, P), generator=gen)]
        m[:, :2] = 0.0  # with the next row's first two: a whole cell of all-padding patches
        g = int(P**0.5)
        m[:, g:g + 2] = 0.0
        return m
    if kind == "processor":
        m = torch.ones(N, P)
        m[:, -P // 4:] = 0.0  # a padded bottom band
        m[:, -P // 4 - 3: -P // 4] = 0.5
        m[-1] = -1.0  # the legacy -1 row on the last crop (§4.5)
        return m
    raise ValueError(kind)


def make(N, g, C, E, dtype, masks="mixed", bias=True, pad_dtype=None, seed=0):
    """feats (N, g*g, C), masks, pad_embed (2, C) and the weights; weights scaled so the scores
    are O(1) and the 4-key softmax is neither uniform nor one-hot."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)

    feats = rnd(N, g * g, C)
    pad_embed = rnd(2, C).to(pad_dtype or dtype)
    ws = [rnd(E, C, scale=C**-0.5), rnd(E, scale=0.3) if bias else None,
          rnd(E, C, scale=C**-0.5), rnd(E, scale=0.3) if bias else None,
          rnd(E, C, scale=C**-0.5), rnd(E, scale=0.3) if bias else None,
          rnd(E, E, scale=E**-0.5), rnd(E, scale=0.3) if bias else None]
    image_masks = make_masks(masks, N, g * g, gen)
    return feats, (None if image_masks is None else image_masks.to(DEV)), pad_embed, ws


def run(fn, feats, image_masks, pad_embed, ws, H, cast_back, grad_out=None, upcast=False):
    """Output and gradients w.r.t. every input of `fn` (None where an input has no gradient)."""
    inputs = [feats, pad_embed] + ws
    if upcast:
        inputs = [None if t is None else t.float() for t in inputs]
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(leaves[0], image_masks, leaves[1], *leaves[2:], H, cast_back)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, used, grad_out.to(out.dtype), allow_unused=True))
    return out, [None if t is None else next(grads) for t in leaves], grad_out


def check_close(name, got, ref32, ref_lowp, low_precision):
    """Kernel error vs the fp32 reference <= 2x PyTorch's own low-precision error + a floor."""
    if ref32 is None:
        assert got is None and ref_lowp is None, name
        return
    scale = 1.0 + ref32.abs().max().item()
    err = (got.float() - ref32).abs().max().item()
    torch_err = (ref_lowp.float() - ref32).abs().max().item()
    floor = (2e-3 if low_precision else 2e-6) * scale
    assert err <= 2 * torch_err + floor, (name, err, torch_err, scale)


def check_against_reference(N, g, C, E, H, dtype, masks, cast_back, bias=True, pad_dtype=None):
    feats, image_masks, pad_embed, ws = make(N, g, C, E, dtype, masks, bias, pad_dtype)
    args = (feats, image_masks, pad_embed, ws, H, cast_back)
    out, grads, go = run(patch_pool, *args)
    assert out.shape == (N, (g // 2) ** 2, E) and out.dtype == dtype
    assert not out.isnan().any()
    ref, ref_grads, _ = run(patch_pool_ref, *args, grad_out=go)
    ref32, ref32_grads, _ = run(patch_pool_ref, *args, grad_out=go, upcast=True)
    low = dtype != torch.float32
    check_close("out", out, ref32, ref, low)
    for name, a, r, r32 in zip(NAMES, grads, ref_grads, ref32_grads):
        assert a is None or a.dtype == (pad_dtype or dtype if name == "pad_embed" else dtype)
        if name == "bk" and a is not None:
            # The k bias shifts the 4 scores of a (cell, head) alike, which softmax ignores: the
            # kernel returns its exact zero gradient; the reference's is rounding noise around 0.
            assert a.abs().max() == 0
            assert r32.abs().max() <= 1e-4 * (1 + ref32_grads[NAMES.index("bv")].abs().max())
            continue
        check_close(name, a, r32, r, low)
    return out


# (N crops, grid side g, channels C, width E, heads H, reason)
SHAPES = [
    (1, 2, 8, 8, 1, "one crop, one 2x2 cell, one head"),
    (3, 4, 7, 12, 4, "several crops, 4x4 grid, odd C, head dim 3 (masked lanes)"),
    (1, 24, 16, 32, 16, "the real 24x24 grid (144 cells, not a multiple of the tile), 16 heads"),
    (8, 6, 10, 24, 2, "6x6 grid, 8 crops: crop 7's 9 cells straddle the 64-cell tile edge"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,g,C,E,H,reason", SHAPES, ids=[s[-1] for s in SHAPES])
def test_shapes_forward_and_all_grads(N, g, C, E, H, reason, dtype):
    check_against_reference(N, g, C, E, H, dtype, "mixed", cast_back=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cast_back", [True, False])
@pytest.mark.parametrize("masks", ["none", "ones", "mixed", "processor"])
def test_masks_and_cast_back(masks, cast_back, dtype):
    check_against_reference(2, 4, 9, 16, 2, dtype, masks, cast_back)


def test_no_biases():
    # The op's contract allows bias-free projections (None): the kernel adds zeros there.
    check_against_reference(2, 4, 8, 8, 2, torch.float32, "mixed", True, bias=False)


def test_fp32_pad_embed_with_fp16_features_cast_back():
    # MolmoE's §7.1 case: an fp32 pad_embed beside low-precision features and weights; the
    # reference adds in fp32 and casts back, the kernel projects the pad embeddings in fp32.
    check_against_reference(2, 4, 8, 16, 2, torch.float16, "mixed", True, pad_dtype=torch.float32)


def test_all_ones_mask_equals_no_mask():
    # Mask value 1 everywhere adds no pad embedding: the same result as no mask at all.
    feats, _, pad_embed, ws = make(2, 4, 8, 8, torch.float32, "none")
    ones = torch.ones(2, 16, device=DEV)
    a = patch_pool(feats, ones, pad_embed, *ws, 2, True)
    b = patch_pool(feats, None, pad_embed, *ws, 2, True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_each_cell_reads_exactly_its_four_patches():
    # Structural invariant of the gather: perturbing patch (r, c) changes only the output of
    # cell t = (r // 2) * (g / 2) + c // 2 of the same crop, for every patch of a 6x6 grid.
    N, g, C, E, H = 2, 6, 4, 8, 2
    feats, masks, pad_embed, ws = make(N, g, C, E, torch.float32, "mixed")
    base = patch_pool(feats, masks, pad_embed, *ws, H, True)
    for r in range(g):
        for c in range(g):
            bumped = feats.clone()
            bumped[1, r * g + c] += 1.0
            changed = (patch_pool(bumped, masks, pad_embed, *ws, H, True) - base).abs().amax(-1)
            expected = torch.zeros(N, (g // 2) ** 2, dtype=torch.bool, device=DEV)
            expected[1, (r // 2) * (g // 2) + c // 2] = True
            assert torch.equal(changed > 1e-6, expected), (r, c)


def test_member_order_is_irrelevant():
    # Spec §3.3: the order of the 4 members does not matter. Mirror every cell left-right
    # (swap columns 2j and 2j+1): each cell keeps the same 4 patches, so the same output.
    N, g, C, E, H = 2, 4, 8, 8, 2
    feats, masks, pad_embed, ws = make(N, g, C, E, torch.float32, "mixed")
    perm = torch.arange(g * g).view(g, g // 2, 2).flip(-1).reshape(-1).to(DEV)
    a = patch_pool(feats, masks, pad_embed, *ws, H, True)
    b = patch_pool(feats[:, perm], masks[:, perm], pad_embed, *ws, H, True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_zero_crops():
    feats, masks, pad_embed, ws = make(1, 4, 8, 8, torch.float32, "mixed")
    out = patch_pool(feats[:0], masks[:0], pad_embed, *ws, 2, True)
    assert out.shape == (0, 4, 8)


def test_bad_inputs_name_the_problem():
    feats, masks, pad_embed, ws = make(1, 4, 8, 8, torch.float32, "mixed")
    with pytest.raises(ValueError, match="even square grid"):
        patch_pool(feats[:, :15], masks[:, :15], pad_embed, *ws, 2, True)
    f9, m9, _, _ = make(1, 3, 8, 8, torch.float32, "mixed")
    with pytest.raises(ValueError, match="even square grid"):
        patch_pool(f9, m9, pad_embed, *ws, 2, True)
    with pytest.raises(ValueError, match="pad_embed"):
        patch_pool(feats, masks, pad_embed[:, :7], *ws, 2, True)
    with pytest.raises(ValueError, match="image_masks"):
        patch_pool(feats, masks[:, :8], pad_embed, *ws, 2, True)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        patch_pool(feats, masks, pad_embed, *ws, 3, True)
    with pytest.raises(ValueError, match="must be \\(N, P, C\\)"):
        patch_pool(feats[0], masks, pad_embed, *ws, 2, True)


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    N, P, Gc, E, H = 2, 16, 4, 8, 2
    q_raw, k_raw, v_raw = (torch.randn(N, n, E, generator=gen).to(DEV) for n in (Gc, P, P))
    coef = (torch.rand(N, P, 2, generator=gen) > 0.5).float().to(DEV)
    pad_u = torch.randn(3, 2, E, generator=gen).to(DEV)
    bias = torch.randn(3, E, generator=gen).to(DEV)
    leaves = [t.clone().requires_grad_(True) for t in (q_raw, k_raw, v_raw)]
    op = torch.ops.molmoe.patch_pool_attend.default
    torch.library.opcheck(op, (*leaves, coef, pad_u.requires_grad_(True),
                               bias.requires_grad_(True), H))
    torch.library.opcheck(op, (*leaves, None, None, bias, H))
    do = torch.randn(N, Gc, E, generator=gen).to(DEV)
    torch.library.opcheck(torch.ops.molmoe.patch_pool_attend_bwd.default,
                          (do, q_raw, k_raw, v_raw, coef, pad_u.detach(), bias.detach(), H))


def _model_check(name, ops, params_filter):
    model = random_model(name)
    ids, images, masks, idx = random_inputs(model.config, batch=2)
    params = [p for n, p in model.named_parameters() if params_filter(n)]
    ref = model(ids, images, masks, idx)
    ref_grads = torch.autograd.grad(ref.square().mean(), params)
    model.set_ops(ops)
    out = model(ids, images, masks, idx)
    grads = torch.autograd.grad(out.square().mean(), params)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-molmoe", "tiny-7b-d"])
def test_model_logits_and_grads_with_fused_pooling(name):
    # Images with 0, partial and -1 mask values (tests.tiny.random_inputs); logits within fp32
    # tolerance, and the gradients of the pooling weights and pad_embed match the reference's.
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return patch_pool(*args)

    _model_check(name, dataclasses.replace(REFERENCE_OPS, patch_pool=counted),
                 lambda n: "pad_embed" in n or "image_pooling_2d" in n or "projector" in n)
    assert len(calls) == 1  # the op really served the pooling


@pytest.mark.parametrize("name", ["tiny-molmoe", "tiny-7b-d"])
def test_model_with_fused_pooling_and_rope(name):
    from molmoe.kernels.rope import apply_rope

    _model_check(name, dataclasses.replace(REFERENCE_OPS, patch_pool=patch_pool,
                                           apply_rope=apply_rope),
                 lambda n: "image_vit" not in n)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("cast_back", [True, False])
def test_bf16_at_molmo_shapes_gpu(cast_back):
    # 13 crops x 24x24 patches x 2048 channels, 16 heads x 64, the model's projection sizes.
    check_against_reference(13, 24, 2048, 1024, 16, torch.bfloat16, "processor", cast_back)


@pytest.mark.gpu
def test_deterministic_gpu():
    feats, masks, pad_embed, ws = make(13, 24, 2048, 1024, torch.bfloat16, "mixed")
    a = patch_pool(feats, masks, pad_embed, *ws, 16, True)
    b = patch_pool(feats, masks, pad_embed, *ws, 16, True)
    assert torch.equal(a, b)


def test_bench_cpu_path_runs(tmp_path):
    # The benchmark's one command on this machine: reference figures, JSON + PNG, GPU note.
    import json

    from bench.bench_patch_pool import main

    path = main(["--quick", "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    impls = {r["impl"] for r in payload["rows"]}
    assert "reference" in impls
    assert all(r["gbps"] > 0 and r["tflops"] > 0 for r in payload["rows"])
    assert (tmp_path / "patch_pool.png").exists()
    if not torch.cuda.is_available():
        assert any("need a GPU" in n for n in payload["notes"])


def test_tile_policy_configs_prune_and_pins(monkeypatch):
    # The interpreter runs one config, so the GPU list and its pruning never run here: check
    # them directly with the launcher's own sizes. No triton.autotune: launches look up.
    from molmoe.kernels.patch_pool import POLICY, _ctx, _launch_args, _m_bucket, kernel_configs

    monkeypatch.delenv("MOLMOE_PATCH_POOL_CONFIG", raising=False)
    gpu = kernel_configs(on_gpu=True)
    for N, H in ((1, 16), (13, 16)):  # one crop (144 cells) and one 13-crop image
        q_raw, k_raw = torch.zeros(N, 144, 1024), torch.zeros(N, 576, 1024)
        _, sizes, _ = _launch_args(q_raw, k_raw, k_raw, None, None, torch.zeros(3, 1024), H)
        kept = POLICY.pruned(_ctx(sizes))
        assert kept and len(kept) < len(gpu)
        # register budget: 9 fp32 tiles of BLOCK_M x 64 within ~160 registers per thread
        assert all(9 * c["BLOCK_M"] * 64 <= 160 * 32 * c["num_warps"] for c in kept)
        assert all(c["BLOCK_M"] <= 256 for c in kept)
        assert POLICY.config(_ctx(sizes), on_gpu=True) in kept
    assert [_m_bucket(m) for m in (1, 144, 1872, 10**6)] == [1, 256, 2048, 1 << 16]
    ctx = dict(E=1024, D=64, M_BUCKET=256, BLOCK_D=64)
    monkeypatch.setenv("MOLMOE_PATCH_POOL_CONFIG", "BLOCK_M=16,num_warps=2")
    assert POLICY.config(ctx, on_gpu=True) == dict(BLOCK_M=16, num_warps=2)
    monkeypatch.setenv("MOLMOE_PATCH_POOL_CONFIG", "BLOCK_M")
    with pytest.raises(ValueError, match="MOLMOE_PATCH_POOL_CONFIG"):
        POLICY.config(ctx, on_gpu=True)
    monkeypatch.setenv("MOLMOE_PATCH_POOL_CONFIG", "BLOCKM=16")
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['BLOCKM'\]; valid names: "
                                         r"\['BLOCK_M', 'num_warps'\]"):
        POLICY.config(ctx, on_gpu=True)