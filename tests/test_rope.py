"""Fused RoPE against the model's reference (forward and the q/k gradients), with the decoder's
own non-contiguous views and the model's own position tables; opcheck; the tiny models with the
op installed; (GPU only) bf16 at Molmo shapes and CUDA-graph replay; the benchmark's CPU path.

cos/sin get no gradient by design (functions of integer positions), so only q and k are checked.
"""
import dataclasses

import pytest
import torch

from molmoe.ops import REFERENCE_OPS
from molmoe.kernels.rope import apply_rope, apply_rope_ref
from molmoe.model.layers import rope_tables
from tests.tiny import random_inputs, random_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def decoder_qk(B, S, Hq, Hkv, Dh, dtype, seed=0):
    """q, k exactly as the decoder makes them: one fused qkv projection output split, viewed as
    (B, S, H, Dh) and transposed to (B, H, S, Dh): non-contiguous, unit stride on Dh only."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * Dh, generator=g).to(DEV, dtype)
    q, k, _ = qkv.split([Hq * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    return (q.view(B, S, Hq, Dh).transpose(1, 2), k.view(B, S, Hkv, Dh).transpose(1, 2))


def tables(positions_BS, Dh, theta):
    """The model's own construction (layers.rope_tables), fp32 (B, S, Dh)."""
    return rope_tables(positions_BS.to(DEV), Dh, theta)


def check_close(out, ref32, ref_lowp, floor):
    """Kernel error vs the fp32 reference <= 2x PyTorch's own low-precision error + a floor."""
    err = (out.float() - ref32).abs().max().item()
    torch_err = (ref_lowp.float() - ref32).abs().max().item()
    assert err <= 2 * torch_err + floor, (err, torch_err)


# (B, Hq, Hkv, S, Dh, theta, first position, reason)
CASES = [
    (1, 16, 16, 1, 128, 10000.0, 32767, "decode step, MolmoE heads, its last table row (32767)"),
    (2, 28, 4, 7, 128, 1e6, 4089, "7B-D GQA 7, odd S, up to the 7B limit 4095"),
    (1, 1, 1, 33, 64, 10000.0, 0, "one head, S one past a 32-row tile, ViT-sized head dim"),
    (3, 4, 2, 9, 64, 5e5, 100, "GQA 2: head groups straddle the q/k boundary"),
    (2, 16, 16, 65, 64, 10000.0, 3, "16 heads, S = 2 tiles + 1"),
    (1, 3, 1, 5, 6, 10000.0, 7, "Dh/2 = 3 is not a power of two (masked lanes)"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,S,Dh,theta,p0,reason", CASES, ids=[c[-1] for c in CASES])
def test_forward_and_grads_match_reference(B, Hq, Hkv, S, Dh, theta, p0, reason, dtype):
    q, k = decoder_qk(B, S, Hq, Hkv, Dh, dtype)
    assert S == 1 or not (q.is_contiguous() or k.is_contiguous())  # the decoder's views
    cos, sin = tables(torch.arange(p0, p0 + S).expand(B, S), Dh, theta)
    q.requires_grad_(True)
    k.requires_grad_(True)
    qo, ko = apply_rope(q, k, cos, sin)
    assert qo.dtype == dtype and ko.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    rq, rk = apply_rope_ref(q, k, cos, sin)
    q32, k32 = q.detach().float().requires_grad_(True), k.detach().float().requires_grad_(True)
    rq32, rk32 = apply_rope_ref(q32, k32, cos, sin)
    # Same fp32 arithmetic, then one cast: equal to the reference up to fp32 rounding
    # (bitwise in the interpreter; the GPU may contract a multiply-add into an FMA).
    torch.testing.assert_close(qo, rq, atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 1e-3)
    torch.testing.assert_close(ko, rk, atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 1e-3)
    check_close(qo, rq32, rq, 1e-6)
    check_close(ko, rk32, rk, 1e-6)

    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), (q, k))
    rdq, rdk = torch.autograd.grad((rq * gq).sum() + (rk * gk).sum(), (q, k))
    rdq32, rdk32 = torch.autograd.grad((rq32 * gq.float()).sum() + (rk32 * gk.float()).sum(),
                                       (q32, k32))
    assert dq.dtype == dtype and dk.dtype == dtype
    check_close(dq, rdq32, rdq, 1e-5)
    check_close(dk, rdk32, rdk, 1e-5)
    # The rotation is orthogonal: its backward preserves norms per (position, frequency pair).
    torch.testing.assert_close(dq.float().norm(), gq.float().norm(), rtol=1e-3, atol=0)


def test_left_padded_positions_and_rotation_identity():
    # The engine's left padding: pos = max(0, cumsum(mask) - 1), several rows at position 0,
    # where cos = 1, sin = 0 and the rotation must be the identity.
    B, S, Hq, Hkv, Dh = 2, 12, 4, 2, 128
    q, k = decoder_qk(B, S, Hq, Hkv, Dh, torch.float32, seed=1)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :5] = 0
    pos = (torch.cumsum(mask, -1) - 1).clamp(min=0)
    cos, sin = tables(pos, Dh, 1e6)
    qo, ko = apply_rope(q, k, cos, sin)
    rq, rk = apply_rope_ref(q, k, cos, sin)
    torch.testing.assert_close(qo, rq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, rk, atol=1e-6, rtol=1e-6)
    assert torch.equal(qo[1, :, :6], q[1, :, :6]) and torch.equal(ko[0, :, 0], k[0, :, 0])


def test_only_one_output_used_and_contiguous_inputs():
    # k's output unused (its grad arrives as None -> zero dk); contiguous inputs take the same path.
    B, S, Hq, Hkv, Dh = 1, 5, 2, 1, 64
    q = torch.randn(B, Hq, S, Dh, device=DEV, requires_grad=True)
    k = torch.randn(B, Hkv, S, Dh, device=DEV, requires_grad=True)
    cos, sin = tables(torch.arange(S)[None], Dh, 10000.0)
    qo, _ = apply_rope(q, k, cos, sin)
    g = torch.randn_like(qo)
    dq, dk = torch.autograd.grad((qo * g).sum(), (q, k))
    rq, _ = apply_rope_ref(q, k, cos, sin)
    rdq, = torch.autograd.grad((rq * g).sum(), (q,))
    torch.testing.assert_close(dq, rdq, atol=1e-6, rtol=1e-6)
    assert dk.abs().max() == 0


def test_general_tables_not_only_phi_phi():
    # The op's contract is x*cos + rotate_half(x)*sin for any fp32 tables, not only [phi, phi]:
    # random tables catch a kernel that reads cos[:h] where it should read cos[h:].
    B, S, Hq, Hkv, Dh = 2, 3, 2, 2, 64
    q, k = decoder_qk(B, S, Hq, Hkv, Dh, torch.float32, seed=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    cos, sin = (torch.randn(B, S, Dh, device=DEV) for _ in range(2))
    out, ref = apply_rope(q, k, cos, sin), apply_rope_ref(q, k, cos, sin)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)
    g = [torch.randn_like(t) for t in out]
    grads = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(out, g)), (q, k))
    rgrads = torch.autograd.grad(sum((r * gi).sum() for r, gi in zip(ref, g)), (q, k))
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_problem():
    q, k = decoder_qk(1, 4, 2, 2, 64, torch.float32)
    cos, sin = tables(torch.arange(4)[None], 64, 10000.0)
    with pytest.raises(ValueError, match="must be even"):
        apply_rope(q[..., :63], k[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(ValueError, match="does not match q"):
        apply_rope(q, k[:, :, :3], cos, sin)
    with pytest.raises(ValueError, match="expected"):
        apply_rope(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="fp32 tables"):
        apply_rope(q, k, cos.half(), sin.half())
    with pytest.raises(ValueError, match=r"\(B, H, S, Dh\)"):
        apply_rope(q[0], k[0], cos, sin)


def test_opcheck():
    q, k = decoder_qk(2, 5, 4, 2, 64, torch.float32)
    cos, sin = tables(torch.arange(5).expand(2, 5), 64, 10000.0)
    torch.library.opcheck(torch.ops.molmoe.apply_rope.default,
                          (q.detach().requires_grad_(True), k.detach().requires_grad_(True),
                           cos, sin))
    torch.library.opcheck(torch.ops.molmoe.apply_rope_bwd.default, (q, k, cos, sin))


@pytest.mark.parametrize("name", ["tiny-molmoe", "tiny-7b-d"])
def test_model_logits_and_grads_with_fused_rope(name):
    # Images included (positions run through the image tokens); logits within fp32 tolerance and
    # a backward through the whole model (q/k norms, qkv weights) matches the reference's.
    model = random_model(name)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return apply_rope(*args)

    ids, images, masks, idx = random_inputs(model.config, batch=2)
    params = [p for n, p in model.named_parameters() if "vision" not in n]
    ref = model(ids, images, masks, idx)
    ref_grads = torch.autograd.grad(ref.square().mean(), params)
    model.set_ops(dataclasses.replace(REFERENCE_OPS, apply_rope=counted))
    out = model(ids, images, masks, idx)
    grads = torch.autograd.grad(out.square().mean(), params)
    assert len(calls) == model.config.text.n_layers  # the op really served every layer
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,S", [(16, 16, 4096), (28, 4, 2048), (28, 4, 1)])
def test_bf16_at_molmo_shapes_gpu(Hq, Hkv, S):
    B, Dh = 2, 128
    q, k = decoder_qk(B, S, Hq, Hkv, Dh, torch.bfloat16, seed=3)
    q.requires_grad_(True)
    k.requires_grad_(True)
    cos, sin = tables(torch.arange(S).expand(B, S) + (4095 - S + 1), Dh, 1e6)
    q32, k32 = (t.detach().float().requires_grad_(True) for t in (q, k))
    out, ref = apply_rope(q, k, cos, sin), apply_rope_ref(q, k, cos, sin)
    ref32 = apply_rope_ref(q32, k32, cos, sin)
    for o, r, r32 in zip(out, ref, ref32):
        check_close(o, r32, r, 1e-6)
    g = [torch.randn_like(t) for t in out]
    grads = torch.autograd.grad(sum((o * gi).sum() for o, gi in zip(out, g)), (q, k))
    rgrads = torch.autograd.grad(sum((r * gi).sum() for r, gi in zip(ref, g)), (q, k))
    rgrads32 = torch.autograd.grad(sum((r * gi.float()).sum() for r, gi in zip(ref32, g)),
                                   (q32, k32))
    for a, b, b32 in zip(grads, rgrads, rgrads32):
        check_close(a, b32, b, 1e-5)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    q, k = decoder_qk(4, 1, 28, 4, 128, torch.bfloat16, seed=4)
    cos, sin = tables(torch.full((4, 1), 77), 128, 1e6)
    eager = apply_rope(q, k, cos, sin)  # autotunes before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = apply_rope(q, k, cos, sin)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, eager))
    new_cos, new_sin = tables(torch.full((4, 1), 3000), 128, 1e6)
    cos.copy_(new_cos)
    sin.copy_(new_sin)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, apply_rope(q, k, cos, sin)))


def test_bench_cpu_path_runs(tmp_path):
    # The benchmark's one command on this machine: reference figures, JSON + PNG, GPU note.
    import json

    from bench.bench_rope import main

    path = main(["--quick", "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    impls = {r["impl"] for r in payload["rows"]}
    assert {"reference", "attention_sdpa"} <= impls
    assert all(r["gbps"] > 0 for r in payload["rows"] if r["impl"] == "reference")
    assert (tmp_path / "rope.png").exists()
    if not torch.cuda.is_available():
        assert any("need a GPU" in n for n in payload["notes"])


def test_tile_policy_configs_prune_and_pins(monkeypatch):
    # The interpreter runs one config, so the GPU list and its pruning never run here: check
    # them directly. No triton.autotune any more: a launch only looks its tile up.
    from molmoe.kernels import rope as RO

    monkeypatch.delenv("MOLMOE_ROPE_CONFIG", raising=False)
    gpu = RO.kernel_configs(on_gpu=True)
    ctx = dict(Dh=128, Hq=16, Hkv=16, S_BUCKET=1)
    decode = RO.POLICY.pruned(ctx)
    assert decode and all(c["BLOCK_S"] == 1 and c["num_warps"] <= 2 for c in decode)
    assert {c["HEADS"] for c in decode} == {2, 4, 8, 16, 64}  # 64 >= 32 heads: one group
    assert RO.POLICY.config(ctx, on_gpu=True) in decode  # the default, pruned for decode
    prefill = RO.POLICY.pruned(dict(Dh=128, Hq=28, Hkv=4, S_BUCKET=4096))
    assert max(c["BLOCK_S"] for c in prefill) == 32 and len(prefill) < len(gpu)
    assert RO.POLICY.config(dict(Dh=128, Hq=28, Hkv=4, S_BUCKET=4096), True) == \
        dict(BLOCK_S=16, HEADS=8, num_warps=4)
    assert [RO._s_bucket(s) for s in (1, 7, 512, 513, 100000)] == [1, 8, 512, 1024, 4096]
    monkeypatch.setenv("MOLMOE_ROPE_CONFIG", "BLOCK_S=4,HEADS=2,num_warps=2")
    assert RO.POLICY.config(ctx, on_gpu=True) == dict(BLOCK_S=4, HEADS=2, num_warps=2)
    monkeypatch.setenv("MOLMOE_ROPE_CONFIG", "fast")
    with pytest.raises(ValueError, match="MOLMOE_ROPE_CONFIG"):
        RO.POLICY.config(ctx, on_gpu=True)
    monkeypatch.setenv("MOLMOE_ROPE_CONFIG", "BLOCK_S=4,HEAD=2")
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['HEAD'\]; valid names: "
                                         r"\['BLOCK_S', 'HEADS', 'num_warps'\]"):
        RO.POLICY.config(ctx, on_gpu=True)


def test_pinned_tile_runs_in_the_interpreter(monkeypatch):
    # A pin reaches the launch: 4 positions, 2 heads a program (several programs each way).
    monkeypatch.setenv("MOLMOE_ROPE_CONFIG", "BLOCK_S=4,HEADS=2")
    q, k = decoder_qk(2, 9, 4, 2, 16, torch.float32, seed=7)
    cos, sin = tables(torch.arange(9).repeat(2, 1), 16, 1e4)
    for got, want in zip(apply_rope(q, k, cos, sin), apply_rope_ref(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
