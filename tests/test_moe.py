"""The Triton MoE op against the released loop (moe_ffn_ref), against transformers'
OlmoeSparseMoeBlock (nobody here wrote it), against plain-PyTorch losses, inside a tiny MolmoE, and
(GPU only) in bf16, twice for determinism, and under CUDA-graph replay.

Tolerance: the kernel's error against an fp32 computation is at most twice PyTorch's own
low-precision error plus a small floor (relative to the output's scale). Expert choices must be
identical to the reference's (the logits are the same F.linear, ties go to the lower index).
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from molmoe.ops import REFERENCE_OPS
from molmoe.kernels.moe import (DECODE_MAX_TOKENS, KINDS, aux_losses, block_m_for, choose_path,
                                default_config, kernel_configs, moe_experts, moe_ffn, moe_ffn_ref,
                                permute, prune_configs, route)
from tests.tiny import random_inputs, random_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TILE = block_m_for(1, 1, DEV == "cuda")  # the interpreter's row tile (16)
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make(T, D, F_, E, dtype=torch.float32, seed=0, dominant=False, tie_rows=()):
    """Inputs at unit scale. `dominant`: router row 0 outweighs the rest for every token (x has a
    positive mean along it). `tie_rows`: (i, j) pairs of identical router rows (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    router = torch.randn(E, D, generator=g) / D ** 0.5
    if dominant:
        x = x.abs() + 0.5
        router[0] = 4.0 / D ** 0.5
    for i, j in tie_rows:
        router[j] = router[i]
    wg = torch.randn(E, F_, D, generator=g) / D ** 0.5
    wu = torch.randn(E, F_, D, generator=g) / D ** 0.5
    wd = torch.randn(E, D, F_, generator=g) / F_ ** 0.5
    return [t.to(DEV, dtype) for t in (x, router, wg, wu, wd)]


def rel_err(got, want, scale):
    return ((got.float() - want.float()).abs().max() / scale).item() if got.numel() else 0.0


def assert_within(got, lowp, want32, dtype, what):
    """got (kernel) vs want32 (fp32 reference): <= 2 x PyTorch's own error (lowp) + floor."""
    scale = want32.float().abs().max().clamp(min=1.0) if want32.numel() else 1.0
    err, torch_err = rel_err(got, want32, scale), rel_err(lowp, want32, scale)
    assert err <= 2 * torch_err + FLOOR[dtype], f"{what}: err {err:.3g}, torch {torch_err:.3g}"


def loss_of(y, aux, dy):
    # Every gradient path: the output, the load-balancing loss and the z-loss.
    return (y.float() * dy).sum() + 0.5 * aux["lb_loss"] + 0.1 * aux["z_loss"]


def grads(fn, inputs, top_k, renorm, dy, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y, aux = fn(*leaves, top_k, renorm, **kw)
    gs = torch.autograd.grad(loss_of(y, aux, dy), leaves, allow_unused=True)
    return y.detach(), aux, [torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)]


# (T, D, F, E, K, renormalize, dominant, reason)
CASES = [
    (0, 16, 16, 4, 2, False, False, "T=0: an empty batch"),
    (1, 16, 16, 8, 2, False, False, "T=1: a decode step"),
    (3, 13, 11, 8, 2, True, False, "T=3, odd/prime D and F, renormalised"),
    (TILE - 5, 24, 20, 8, 1, False, False, "fewer tokens than a row tile, K=1"),
    (20, 24, 20, 8, 1, False, True, "every token on one expert (dominant router row), 7 empty"),
    (3, 16, 24, 16, 2, False, False, "empty experts: 3 tokens x 2 of 16 experts"),
    (9, 17, 23, 5, 5, False, False, "K=E (prime 5): every expert on every token"),
    (9, 17, 23, 5, 5, True, False, "K=E renormalised: weights sum to 1 exactly"),
    (41, 67, 71, 4, 2, True, False,
     "several row tiles per expert; prime D, F > 64: two column tiles and two K steps"),
]
IDS = [c[-1] for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,D,F_,E,K,renorm,dominant,reason", CASES, ids=IDS)
def test_forward_and_all_gradients_match_reference(T, D, F_, E, K, renorm, dominant, reason,
                                                   dtype):
    inputs = make(T, D, F_, E, dtype, seed=T, dominant=dominant)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(7)).to(DEV)
    y, aux, g = grads(moe_ffn, inputs, K, renorm, dy)  # needs grad: the grouped path
    y_lp, aux_lp, g_lp = grads(moe_ffn_ref, inputs, K, renorm, dy)
    y32, aux32, g32 = grads(moe_ffn_ref, [t.float() for t in inputs], K, renorm, dy)
    assert torch.equal(aux["topk_idx"], aux_lp["topk_idx"]), "expert choices differ"
    assert torch.equal(aux_lp["topk_idx"], aux32["topk_idx"]), "precondition: same routing"
    assert torch.equal(aux["counts"].cpu(), aux_lp["counts"].cpu())
    assert int(aux["counts"].sum()) == T * K
    if dominant:
        assert int(aux["counts"][0]) == T and int(aux["counts"][1:].sum()) == 0
    assert torch.equal(aux["router_logits"], aux_lp["router_logits"])
    want_w = torch.softmax(aux_lp["router_logits"], -1, dtype=torch.float32).gather(
        1, aux_lp["topk_idx"])
    want_w = want_w / want_w.sum(-1, keepdim=True) if renorm else want_w
    torch.testing.assert_close(aux["topk_weights"], want_w, atol=1e-6, rtol=1e-5)
    assert_within(y, y_lp, y32, dtype, "y")
    for name in ("lb_loss", "z_loss"):
        torch.testing.assert_close(aux[name], aux32[name], atol=1e-5, rtol=1e-4)
    for name, a, b, c in zip(("dx", "drouter", "dw_gate", "dw_up", "dw_down"), g, g_lp, g32):
        assert_within(a, b, c, dtype, name)
    if T <= DECODE_MAX_TOKENS:  # without gradients a few tokens take the decode path
        with torch.no_grad():
            y_dec, aux_dec = moe_ffn(*inputs, K, renorm)
        assert_within(y_dec, y_lp, y32, dtype, "y (decode path)")
        assert torch.equal(aux_dec["counts"].cpu(), aux["counts"].cpu())


@pytest.mark.parametrize("T", [1, 3, DECODE_MAX_TOKENS])
def test_decode_path_equals_grouped_path(T):
    # Decode reads each selected expert once for all tokens that chose it; E=4 with T>1 makes
    # experts shared by several tokens.
    inputs = make(T, 24, 40, 4, seed=11)
    with torch.no_grad():
        y_dec, aux_dec = moe_ffn(*inputs, 2, path="decode")
        y_grp, aux_grp = moe_ffn(*inputs, 2, path="grouped")
    assert torch.equal(aux_dec["counts"].cpu(), aux_grp["counts"].cpu())
    torch.testing.assert_close(y_dec, y_grp, atol=1e-6, rtol=1e-5)
    # Decode skips the losses (latency); aux carries what computes them.
    assert aux_dec["lb_loss"] is None and aux_dec["z_loss"] is None
    lb, z = aux_losses(aux_dec["counts"], aux_dec["router_probs"], aux_dec["router_lse"], 2)
    torch.testing.assert_close(lb, aux_grp["lb_loss"])
    torch.testing.assert_close(z, aux_grp["z_loss"])
    assert choose_path(T, needs_grad=False, path=None) == "decode"
    assert choose_path(T, needs_grad=True, path=None) == "grouped"
    assert choose_path(DECODE_MAX_TOKENS + 1, needs_grad=False, path=None) == "grouped"
    with pytest.raises(ValueError, match="decode path"):
        choose_path(T, needs_grad=True, path="decode")


def olmoe_block(router, wg, wu, wd, K, renorm):
    """transformers' OLMoE sparse block with our stacked weights mapped into its layout."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    E, F_, D = wg.shape
    cfg = OlmoeConfig(hidden_size=D, intermediate_size=F_, num_experts=E, num_experts_per_tok=K,
                      norm_topk_prob=renorm, hidden_act="silu")
    block = OlmoeSparseMoeBlock(cfg).to(DEV, wg.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(torch.cat([wg, wu], dim=1))  # (E, 2F, D): [gate; up]
        block.experts.down_proj.copy_(wd)  # (E, D, F)
    return block


@pytest.mark.parametrize("T,D,F_,E,K,renorm,dominant,reason", [CASES[i] for i in (2, 4, 8)],
                         ids=[IDS[i] for i in (2, 4, 8)])
def test_matches_transformers_olmoe_block(T, D, F_, E, K, renorm, dominant, reason):
    x, router, wg, wu, wd = make(T, D, F_, E, seed=T + 100, dominant=dominant)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(8)).to(DEV)
    block = olmoe_block(router, wg, wu, wd, K, renorm)
    xh = x.clone().requires_grad_()
    y_hf = block(xh[None])[0]
    (y_hf * dy).sum().backward()
    leaves = [t.clone().requires_grad_() for t in (x, router, wg, wu, wd)]
    y, _aux = moe_ffn(*leaves, K, renorm)
    (y * dy).sum().backward()
    tol = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(y, y_hf, **tol)
    torch.testing.assert_close(leaves[0].grad, xh.grad, **tol)
    torch.testing.assert_close(leaves[1].grad, block.gate.weight.grad, **tol)
    torch.testing.assert_close(torch.cat([leaves[2].grad, leaves[3].grad], 1),
                               block.experts.gate_up_proj.grad, **tol)
    torch.testing.assert_close(leaves[4].grad, block.experts.down_proj.grad, **tol)


@pytest.mark.parametrize("K,renorm", [(2, False), (3, True)])
def test_aux_losses_and_their_router_gradients_against_plain_pytorch(K, renorm):
    x, router, *experts = make(29, 20, 12, 7, seed=3)
    r = router.clone().requires_grad_()
    _, aux = moe_ffn(x, r, *experts, K, renorm)
    g_lb, = torch.autograd.grad(aux["lb_loss"], r, retain_graph=True)
    g_z, = torch.autograd.grad(aux["z_loss"], r)
    # Plain PyTorch: Switch/OLMoE lb = E * sum_e f_e P_e (f without gradient), ST-MoE z-loss.
    r2 = router.clone().requires_grad_()
    logits = x @ r2.T
    p = torch.softmax(logits.float(), -1)
    chosen = torch.topk(p, K, -1).indices
    f = F.one_hot(chosen, 7).sum((0, 1)).float() / (29 * K)
    lb = 7 * (f * p.mean(0)).sum()
    z = torch.logsumexp(logits.float(), -1).pow(2).mean()
    torch.testing.assert_close(aux["lb_loss"], lb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux["z_loss"], z, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_lb, torch.autograd.grad(lb, r2, retain_graph=True)[0],
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_z, torch.autograd.grad(z, r2)[0], atol=1e-6, rtol=1e-5)
    no_tokens = aux_losses(torch.zeros(7, dtype=torch.long, device=DEV), p[:0], p[:0, 0], K)
    assert no_tokens[0].item() == 0.0 and no_tokens[1].item() == 0.0
    # transformers' OLMoE loss counts f_e per token, not per assignment: K times megablocks'.
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func
    hf = load_balancing_loss_func((logits.detach(),), 7, K)
    torch.testing.assert_close(K * aux["lb_loss"].detach(), hf, atol=1e-6, rtol=1e-5)


def test_training_steps_follow_the_reference():
    # SGD on one MoE layer with every loss term on (output, load balancing, z): the kernel's
    # gradients drive the same loss curve as the reference's (routing changes as it trains).
    x, router, wg, wu, wd = make(24, 16, 12, 6, seed=21)
    target = torch.randn(24, 16, generator=torch.Generator().manual_seed(22)).to(DEV)
    curves = []
    for fn in (moe_ffn, moe_ffn_ref):
        params = [t.clone().requires_grad_() for t in (x, router, wg, wu, wd)]
        opt = torch.optim.SGD(params, lr=0.5)
        losses = []
        for _ in range(3):
            y, aux = fn(*params, 2)
            loss = F.mse_loss(y, target) + 0.01 * aux["lb_loss"] + 0.001 * aux["z_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert bool((curves[0].diff() < 0).all()), curves[0]  # it does train
    torch.testing.assert_close(curves[0], curves[1], atol=1e-6, rtol=1e-5)


def test_frozen_experts_or_input_skip_their_gradients():
    # Only what needs a gradient gets one (frozen experts: no dW kernels run); the rest agree.
    x, router, wg, wu, wd = make(10, 16, 12, 4, seed=13)
    dy = torch.randn(10, 16, generator=torch.Generator().manual_seed(3)).to(DEV)
    _, _, full = grads(moe_ffn, (x, router, wg, wu, wd), 2, False, dy)
    for frozen in ((2, 3, 4), (0,), (0, 2, 3, 4)):  # experts; input; all but the router
        leaves = [t.clone().requires_grad_(i not in frozen)
                  for i, t in enumerate((x, router, wg, wu, wd))]
        y, aux = moe_ffn(*leaves, 2)
        loss_of(y, aux, dy).backward()
        for i, (t, want) in enumerate(zip(leaves, full)):
            if i in frozen:
                assert t.grad is None
            else:
                torch.testing.assert_close(t.grad, want, atol=1e-6, rtol=1e-6)


def test_router_ties_go_to_the_lower_expert_index():
    # Identical router rows give bit-identical probabilities; the kernel takes the lower index
    # first. The oracle is a STABLE descending sort: torch.topk itself does not promise an order
    # among equal values (on the CPU it returns the higher index first, see the last check).
    x, router, *_ = make(16, 8, 4, 8, seed=5, tie_rows=[(1, 6), (3, 2), (0, 7)])
    logits = x @ router.T
    w, idx, probs, lse = route(logits, 5, False)
    p32 = torch.softmax(logits, -1, dtype=torch.float32)
    order = torch.sort(p32, dim=-1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(idx.long(), order)
    torch.testing.assert_close(w, p32.gather(1, order), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(w, torch.topk(p32, 5, -1).values, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-6, rtol=1e-6)
    # An all-equal row: the first K experts in index order, renormalised to 1/3 each.
    w, idx, _, _ = route(torch.zeros(1, 8, device=DEV), 3, True)
    assert idx.tolist() == [[0, 1, 2]] and torch.allclose(w, torch.full_like(w, 1 / 3))
    if DEV == "cpu":  # documents why the oracle is not torch.topk
        assert torch.topk(torch.zeros(1, 8), 3).indices.tolist() != [[0, 1, 2]]


@pytest.mark.parametrize("T,K,E,block_m", [(0, 2, 4, 16), (1, 1, 3, 16), (37, 3, 8, 16),
                                           (300, 2, 5, 32), (200, 8, 64, 16), (5, 7, 7, 64),
                                           (2100, 8, 64, 128)],
                         ids=["empty", "one", "small", "3 chunks of 256 assignments", "E=64 K=8",
                              "K=E, tile 64", "66 chunks: the prefix sum carries over 64-chunk "
                              "steps (MolmoE-1B E, K, tile)"])
def test_permutation_invariants(T, K, E, block_m):
    g = torch.Generator().manual_seed(T + E)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.long)
    idx = idx.to(DEV, torch.int32)
    counts, start, sorted_assign, assign_row, tile_expert = permute(idx, E, block_m)
    N = T * K
    flat = idx.reshape(-1).long().cpu()
    counts, start, sa, ar, te = (t.cpu().long() for t in (counts, start, sorted_assign,
                                                           assign_row, tile_expert))
    assert int(counts.sum()) == N
    assert torch.equal(counts, torch.bincount(flat, minlength=E))
    assert torch.equal(sa[ar], torch.arange(N))  # the scatter index inverts the gather index
    real = sa >= 0
    assert int(real.sum()) == N and torch.equal(torch.sort(sa[real]).values, torch.arange(N))
    assert sa.numel() >= N + E * (block_m - 1) and sa.numel() % block_m == 0
    assert bool((start % block_m == 0).all())
    for e in range(E):  # expert e: rows [start, start + count), stable (ascending a), then -1
        rows = sa[start[e]: start[e] + counts[e]]
        assert bool((flat[rows] == e).all()) and bool((rows.diff() > 0).all())
        pad_end = start[e] + -(-counts[e] // block_m) * block_m
        assert bool((sa[start[e] + counts[e]: pad_end] == -1).all())
        assert bool((te[start[e] // block_m: pad_end // block_m] == e).all())
    used = int(sum(-(-c // block_m) for c in counts.tolist()))
    assert bool((te[used:] == -1).all()) and bool((te[:used] >= 0).all())


def test_tiny_molmoe_logits_match_reference():
    model = random_model("tiny-molmoe")
    ids, images, masks, idx = random_inputs(model.config, batch=1)
    calls = []

    def counted(*args, **kw):
        calls.append(args[0].shape[0])
        return moe_ffn(*args, **kw)

    with torch.no_grad():
        ref = model(ids, images, masks, idx)
        model.set_ops(dataclasses.replace(REFERENCE_OPS, moe_ffn=counted))
        out = model(ids, images, masks, idx)
    assert len(calls) == model.config.text.n_layers  # the op really served every MoE layer
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_opcheck():
    x, router, wg, wu, wd = make(5, 16, 12, 4, seed=2)
    logits = (x @ router.T).requires_grad_()
    torch.library.opcheck(torch.ops.molmoe.moe_route.default, (logits, 2, True))
    topk_w, topk_idx, _, _ = route(logits.detach(), 2, False)
    torch.library.opcheck(torch.ops.molmoe.moe_permute.default, (topk_idx, 4, TILE))
    counts, start, sa, _, te = permute(topk_idx, 4, TILE)
    args = (x, wg, wu, wd, topk_w)
    args = tuple(t.clone().requires_grad_() for t in args) + (counts, start, sa, te, 2, TILE, True)
    torch.library.opcheck(torch.ops.molmoe.moe_experts.default, args)
    torch.library.opcheck(torch.ops.molmoe.moe_experts_decode.default,
                          (x, wg, wu, wd, topk_w, topk_idx),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_matches_eager():
    # fullgraph: no graph break anywhere in moe_ffn (router GEMM, custom ops, aux losses).
    inputs = make(11, 16, 12, 4, seed=4)
    # backend="aot_eager": Dynamo + AOTAutograd trace the custom ops through their fake and
    # autograd registrations (what an op must get right); inductor's C++ codegen of the few
    # surrounding torch ops would add ~25 s of compiling on this machine and test nothing of ours.
    compiled = torch.compile(lambda *a: moe_ffn(*a, 2, False)[0], fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), moe_ffn(*inputs, 2)[0], atol=1e-6, rtol=1e-5)
    leaves = [t.clone().requires_grad_() for t in inputs]
    compiled(*leaves).sum().backward()
    ref = [t.clone().requires_grad_() for t in inputs]
    moe_ffn(*ref, 2)[0].sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_configs_are_visible_pruned_and_pinnable(monkeypatch):
    for kind in KINDS:
        configs = kernel_configs(kind, on_gpu=True)
        kept = prune_configs(configs, kind, 128, torch.bfloat16)
        assert kept and all(c in configs for c in kept)
        if kind in ("gate_up", "down", "dx", "dw_gate_up"):  # 256-wide or 2-accumulator tiles
            assert len(kept) < len(configs)
        assert len(kernel_configs(kind, on_gpu=False)) == 1
    # MolmoE-1B prefill: 4096 tokens x 8 of 64 experts = 512 rows per expert -> 128-row tiles.
    assert block_m_for(4096 * 8, 64, on_gpu=True) == 128
    assert block_m_for(4 * 8, 64, on_gpu=True) == 16
    monkeypatch.setenv("MOLMOE_MOE_CONFIG", "BLOCK_M=32;down:BLOCK_N=64,num_warps=2")
    assert block_m_for(4096 * 8, 64, on_gpu=True) == 32
    cfg = default_config("down", torch.bfloat16, 2048, 1024, 32, on_gpu=True)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]) == (32, 64, 2)
    assert default_config("gate_up", torch.bfloat16, 2048, 1024, 32, True)["num_warps"] != 2
    monkeypatch.setenv("MOLMOE_MOE_CONFIG", "sideways:BLOCK_N=64")
    with pytest.raises(ValueError, match="unknown kind"):
        default_config("down", torch.bfloat16, 2048, 1024, 32, on_gpu=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_default_configs_fit_sm90_for_their_dtype(dtype):
    # The fp32 dx default (128 x 128 x 64, 3 stages) needed 262,144 B of shared memory against
    # sm_90's 232,448 B: the default is pruned by the dtype's element size like any candidate
    # (tests/test_moe_sm90.py compiles them).
    from molmoe.kernels.moe_tuning import _smem_bytes, fits
    from molmoe.kernels._common import SMEM_LIMIT

    for kind in KINDS:
        for block_m in ((0,) if kind.endswith("_decode") else (16, 32, 64, 128)):
            cfg = default_config(kind, dtype, 2048, 1024, block_m, on_gpu=True)
            assert fits(cfg, kind, block_m or 16, dtype), (kind, block_m, cfg)
            assert _smem_bytes(cfg, kind, block_m or 16, dtype) <= SMEM_LIMIT


def test_moe_pin_typos_are_errors(monkeypatch):
    monkeypatch.setenv("MOLMOE_MOE_CONFIG", "dx:BLOK_N=64")
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['BLOK_N'\]; valid names: "
                                         r"\['BLOCK_K', 'BLOCK_M', 'BLOCK_N', 'GROUP_M'"):
        default_config("dx", torch.bfloat16, 2048, 1024, 128, on_gpu=True)
    monkeypatch.setenv("MOLMOE_MOE_CONFIG", "BLOCK_N=48")
    with pytest.raises(ValueError, match="BLOCK_N=48 must be a power of two"):
        default_config("dx", torch.bfloat16, 2048, 1024, 128, on_gpu=True)


def test_pinned_tiles_are_used_and_correct(monkeypatch):
    # Another tiling end to end: 32-row tiles (other padding), 16-wide column tiles and 16-deep
    # K steps (several of each), dW tiles 16 x 16 over 8-row steps.
    monkeypatch.setenv("MOLMOE_MOE_CONFIG", "BLOCK_M=32;BLOCK_N=16,BLOCK_K=16;"
                       "dw_gate_up:BLOCK_M=16,BLOCK_K=8;dw_down:BLOCK_M=16,BLOCK_K=8")
    assert block_m_for(10, 4, on_gpu=False) == 32
    assert default_config("down", torch.float32, 20, 18, 32, on_gpu=False)["BLOCK_N"] == 16
    assert default_config("dw_down", torch.float32, 20, 18, 32, on_gpu=False)["BLOCK_K"] == 8
    inputs = make(13, 20, 18, 5, seed=12)
    dy = torch.randn(13, 20, generator=torch.Generator().manual_seed(1)).to(DEV)
    y, aux, g = grads(moe_ffn, inputs, 2, False, dy)
    y_ref, aux_ref, g_ref = grads(moe_ffn_ref, inputs, 2, False, dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_problem():
    x, router, wg, wu, wd = make(3, 16, 12, 4)
    with pytest.raises(ValueError, match="top_k=5"):
        moe_ffn(x, router, wg, wu, wd, 5)
    with pytest.raises(ValueError, match="shapes disagree"):
        moe_ffn(x, router, wg, wu, wd.transpose(1, 2), 2)
    with pytest.raises(ValueError, match="w_up is torch.float16"):
        moe_ffn(x, router, wg, wu.half(), wd, 2)
    with pytest.raises(ValueError, match="expected x"):
        moe_ffn(x[None], router, wg, wu, wd, 2)


def test_experts_with_given_routing_and_non_contiguous_weights():
    # moe_experts is the building block a benchmark times without the router; weights given as
    # transposed views (a copy is made) must give the same result.
    x, router, wg, wu, wd = make(6, 16, 12, 4, seed=9)
    topk_w, topk_idx, _, _ = route(x @ router.T, 2, False)
    y, counts = moe_experts(x, wg, wu, wd, topk_w, topk_idx, path="grouped")
    y_t, _ = moe_experts(x, wg.transpose(1, 2).contiguous().transpose(1, 2), wu, wd, topk_w,
                         topk_idx, path="grouped")
    ref, aux = moe_ffn_ref(x, router, wg, wu, wd, 2)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(y, y_t) and torch.equal(counts.cpu(), aux["counts"].cpu())


# ----------------------------------------------------------------------------- GPU only


def routed_oracle(x, router, wg, wu, wd, topk_idx):
    """moe_ffn with the expert choice given (differentiable in everything else), in the inputs'
    dtype: bf16 and fp32 logits may order near-equal experts differently, so the bf16 test
    fixes the routing to compare the arithmetic."""
    logits = x @ router.T
    p = torch.softmax(logits, -1, dtype=torch.float32)
    w = p.gather(1, topk_idx).to(x.dtype)
    y = torch.zeros_like(x)
    for e in range(router.shape[0]):
        tok, slot = torch.where(topk_idx == e)
        h = F.linear(F.silu(F.linear(x[tok], wg[e])) * F.linear(x[tok], wu[e]), wd[e])
        y = y.index_add(0, tok, h * w[tok, slot, None])
    counts = torch.bincount(topk_idx.flatten(), minlength=router.shape[0])
    lb, z = aux_losses(counts, p, torch.logsumexp(logits.float(), -1), topk_idx.shape[1])
    return y, {"lb_loss": lb, "z_loss": z}


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 100, 1000])
def test_bf16_forward_and_gradients_gpu(T):
    # MolmoE-like ratios at a small size; bf16 tl.dot needs the GPU (the interpreter's is wrong).
    inputs = make(T, 256, 128, 16, torch.bfloat16, seed=T)
    dy = torch.randn(T, 256, device=DEV)
    with torch.no_grad():
        y_inf, _ = moe_ffn(*inputs, 4)
    y, aux, g = grads(moe_ffn, inputs, 4, False, dy)
    _, aux_ref = moe_ffn_ref(*inputs, 4)
    # Same expert sets as the reference (the order inside a set may differ at exact ties).
    assert torch.equal(aux["topk_idx"].sort(-1).values, aux_ref["topk_idx"].sort(-1).values)
    idx = aux["topk_idx"]
    oracle = lambda *a, **kw: routed_oracle(*a[:5], idx)  # noqa: E731
    y_lp, _, g_lp = grads(oracle, inputs, 4, False, dy)
    y32, _, g32 = grads(oracle, [t.float() for t in inputs], 4, False, dy)
    assert_within(y, y_lp, y32, torch.bfloat16, "y")
    assert_within(y_inf, y_lp, y32, torch.bfloat16, "y (inference path)")
    for name, a, b, c in zip(("dx", "drouter", "dw_gate", "dw_up", "dw_down"), g, g_lp, g32):
        assert_within(a, b, c, torch.bfloat16, name)


@pytest.mark.gpu
def test_deterministic_forward_and_backward_gpu():
    inputs = make(2048, 512, 256, 64, torch.bfloat16, seed=1)
    dy = torch.randn(2048, 512, device=DEV)
    first = grads(moe_ffn, inputs, 8, False, dy)
    second = grads(moe_ffn, inputs, 8, False, dy)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 512])
def test_cuda_graph_replay_equals_eager_gpu(T):
    x, router, wg, wu, wd = make(T, 512, 256, 64, torch.bfloat16, seed=2)
    with torch.no_grad():
        eager = moe_ffn(x, router, wg, wu, wd, 8)[0]  # also compiles before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = moe_ffn(x, router, wg, wu, wd, 8)[0]
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        x.copy_(torch.randn_like(x))  # new tokens, new routing: replay follows the data
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, moe_ffn(x, router, wg, wu, wd, 8)[0])


def test_training_loop_backward_equals_per_expert_indexing():
    """The training loop splits the stacked experts with one unbind (w[e] per expert made the
    backward zero-fill and add a whole (E, F, D) gradient per expert and projection); outputs
    and every gradient are bit-identical to indexing w[e], unused experts included."""
    from molmoe.ops.moe import _experts_loop

    def indexed(x, w_gate, w_up, w_down, topk_w, topk_idx):
        y = torch.zeros_like(x)
        for e in range(w_gate.shape[0]):
            token_idx, slot = torch.where(topk_idx == e)
            if token_idx.numel() == 0:
                continue
            h = x[token_idx]
            h = F.linear(F.silu(F.linear(h, w_gate[e])) * F.linear(h, w_up[e]), w_down[e])
            y.index_add_(0, token_idx, (h * topk_w[token_idx, slot, None]).to(x.dtype))
        return y

    gen = torch.Generator().manual_seed(0)
    T, D, Fd, E, K = 37, 32, 24, 16, 3
    leaves = [torch.randn(T, D, generator=gen), torch.randn(E, Fd, D, generator=gen),
              torch.randn(E, Fd, D, generator=gen), torch.randn(E, D, Fd, generator=gen),
              torch.rand(T, K, generator=gen)]
    leaves = [t.requires_grad_(True) for t in leaves]
    idx = torch.randint(0, E - 2, (T, K), generator=gen)  # the last two experts get no token
    gy = torch.randn(T, D, generator=gen)
    x, wg, wu, wd, tw = leaves
    want = indexed(x, wg, wu, wd, tw, idx)
    got = _experts_loop(x, wg, wu, wd, tw, idx)
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(want, leaves, gy), torch.autograd.grad(got, leaves, gy)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["grouped", "decode"])
def test_fp16_overflow_saturates_instead_of_inf(path):
    # gate = up = 400 make h = silu(gate) * up = 160000 > 65504: stored unclamped, h becomes inf
    # in fp16 and the down GEMM's output inf / NaN. The kernels saturate h (and z, y) at fp16's
    # largest finite value; the oracle does the same saturation in fp32 (issue 15).
    T, D, F_, E = 3, 16, 16, 2
    x = torch.full((T, D), 2.0)
    router = torch.randn(E, D, generator=torch.Generator().manual_seed(0))
    wg = torch.full((E, F_, D), 12.5)  # x . wg = 16 * 2 * 12.5 = 400
    wu = torch.full((E, F_, D), 12.5)
    wd = torch.randn(E, D, F_, generator=torch.Generator().manual_seed(1)) * 1e-3
    args = [t.to(DEV, torch.float16) for t in (x, router, wg, wu, wd)]
    y, aux = moe_ffn(*args, 1, path=path)
    assert torch.isfinite(y).all(), "fp16 overflow reached the output"
    xf, _, wgf, wuf, wdf = (t.float() for t in args)
    e = aux["topk_idx"][:, 0]
    g = torch.einsum("td,tfd->tf", xf, wgf[e])
    h = (F.silu(g) * torch.einsum("td,tfd->tf", xf, wuf[e])).clamp(-65504, 65504).half()
    want = torch.einsum("tf,tdf->td", h.float(), wdf[e]) * aux["topk_weights"][:, :1]
    assert h.float().max() == 65504  # the case does overflow
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=1e-2)


def test_fp16_gradient_overflow_stays_inf_for_the_loss_scaler():
    """Gradients are not saturated: where the fp16 expert backward overflows (d gate / d up,
    the dx rows, their combine), dx holds inf as the reference's does, so torch.amp.GradScaler
    sees the overflow and skips the step (a saturated 65504 would pass as a finite gradient).
    The forward still saturates (test above). Given routing: dx comes from the experts only."""
    from molmoe.ops.moe import _experts_loop

    T, D, F_, E, K = 4, 16, 16, 2, 2
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(T, D, generator=g) * 0.1).to(DEV, torch.float16)
    wg, wu = (torch.randn(E, F_, D, generator=g).to(DEV, torch.float16) for _ in range(2))
    wd = torch.full((E, D, F_), 4.0).to(DEV, torch.float16)
    topk_w = torch.full((T, K), 0.5, device=DEV)
    topk_idx = torch.tensor([[0, 1]] * T, device=DEV)
    dy = torch.full((T, D), 3000.0).to(DEV, torch.float16)  # d h = w dy wd ~ 1e5 > 65504

    def dx_of(fn, **kw):
        leaf = x.detach().clone().requires_grad_()
        y = fn(leaf, wg, wu, wd, topk_w, topk_idx, **kw)
        y = y[0] if isinstance(y, tuple) else y
        return torch.autograd.grad(y, leaf, dy)[0]

    want = dx_of(_experts_loop)
    got = dx_of(moe_experts, path="grouped")
    assert not torch.isfinite(want).all(), "precondition: the reference's dx overflows"
    assert not torch.isfinite(got).all(), "dx overflow was hidden (saturated)"
    assert (got.abs() == 65504).sum() == 0


def test_interleaved_gate_up_weight_layout_and_cache():
    # The gate_up kernel reads w_gu (E, 2F, D), rows 2f / 2f+1 = gate / up of column f, built
    # behind the kernel boundary once per weight pair and version (kernels/moe.py header).
    import gc

    from molmoe.kernels import moe as M

    x, router, wg, wu, wd = make(11, 24, 20, 4, seed=31)
    w_gu = M.interleave_gate_up(wg, wu)
    assert w_gu.shape == (4, 40, 24) and w_gu.is_contiguous()
    assert torch.equal(w_gu[:, 0::2], wg) and torch.equal(w_gu[:, 1::2], wu)
    assert all(torch.equal(a, b) for a, b in zip(w_gu.view(4, 20, 2, 24).unbind(2), (wg, wu)))
    first = M._gate_up_weight(wg, wu)
    assert M._gate_up_weight(wg, wu) is first and torch.equal(first, w_gu)  # built once
    other_up = wu.clone()
    assert M._gate_up_weight(wg, other_up) is not first  # another w_up: rebuilt
    # An in-place write (an optimizer step, a load) bumps the version: rebuilt, never stale.
    y0 = moe_ffn(x, router, wg, wu, wd, 2)[0]
    with torch.no_grad():
        wu.mul_(-1.0)
    assert torch.equal(M._gate_up_weight(wg, wu)[:, 1::2], wu)
    y1 = moe_ffn(x, router, wg, wu, wd, 2)[0]
    torch.testing.assert_close(y1, moe_ffn_ref(x, router, wg, wu, wd, 2)[0], atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(y0, y1)
    n = len(M._GATE_UP)
    del wg, first
    gc.collect()
    assert len(M._GATE_UP) == n - 1  # a freed weight drops its entry (and its copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interleaved_weights_are_read_without_a_copy(dtype):
    # Weights that already are the even / odd rows of one (E, 2F, D) buffer (MoEFFN.interleave_,
    # what molmoe.load and set_backend make) are the kernel's gate|up weight as they are: no
    # cached copy is built, the backward's dx reads rows 2D apart, and every output and
    # gradient equals the separate-weights run bit for bit.
    from molmoe.kernels import moe as M
    from molmoe.ops.moe import interleaved_layout, interleaved_view

    x, router, wg0, wu0, wd = make(37, 24, 20, 4, dtype, seed=43)
    both = torch.stack((wg0, wu0), dim=2)  # (E, F, 2, D)
    wg, wu = both[:, :, 0], both[:, :, 1]
    assert interleaved_layout(wg, wu) and interleaved_view(wg, wu).data_ptr() == wg.data_ptr()
    assert interleaved_view(wg0, wu0) is None and interleaved_view(wu, wg) is None
    assert interleaved_view(wg, both[:, :, 1].clone()) is None  # same strides, other storage
    wg.requires_grad_()
    wu.requires_grad_()
    sep = [t.detach().clone().requires_grad_() for t in (x, wg0, wu0)]
    x.requires_grad_()
    n = len(M._GATE_UP)
    y = moe_ffn(x, router, wg, wu, wd, 2)[0]
    assert len(M._GATE_UP) == n  # nothing cached: read in place
    y_sep = moe_ffn(sep[0], router, sep[1], sep[2], wd, 2)[0]
    assert torch.equal(y, y_sep)
    g = torch.randn_like(y)
    (y.float() * g.float()).sum().backward()
    (y_sep.float() * g.float()).sum().backward()
    for got, want in zip((x.grad, wg.grad, wu.grad), (s.grad for s in sep)):
        assert torch.equal(got, want)


def test_model_weights_interleaved_in_place_by_set_backend():
    # set_backend lays each MoE layer's w_gate / w_up out interleaved: same Parameter objects
    # (an optimizer keeps working), same values, same state dict; `.to()` separates them again
    # and the next set_backend interleaves again.
    from molmoe.model.decoder import MoEFFN
    from molmoe.ops.moe import interleaved_view

    model = random_model("tiny-molmoe")
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert layers
    params = [(m.w_gate, m.w_up) for m in layers]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_backend("reference")
    for m, (g, u) in zip(layers, params):
        assert m.w_gate is g and m.w_up is u
        assert interleaved_view(m.w_gate, m.w_up) is not None
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    model.to(torch.float64)
    assert interleaved_view(layers[0].w_gate, layers[0].w_up) is None
    model.set_backend("reference")
    assert all(interleaved_view(m.w_gate, m.w_up) is not None for m in layers)


def test_persistent_forward_equals_one_program_per_tile(monkeypatch):
    # In fp16/bf16 the grouped forward GEMMs run a fixed grid striding over the real row tiles
    # only (the interpreter: 3 programs); MOLMOE_MOE_PERSISTENT=0 (and fp32) launch one program
    # per tile of the static bound. Skewed routing leaves padding tiles: the same outputs bit
    # for bit, saved gate / up rows past the work zeroed by the persistent programs too, and
    # gradients equal.
    from molmoe.kernels import moe as M

    E, K, bm = 6, 2, 16
    x, router, wg, wu, wd = make(37, 24, 24, E, torch.float16, seed=41, dominant=True)
    assert M.persistent_programs(100, "gate_up", {}, bm, torch.float32, x.device) == 0
    probs = torch.softmax(x @ router.T, dim=-1)
    topk_w, topk_idx = torch.topk(probs, K, dim=-1)
    topk_w, topk_idx = topk_w.float().contiguous(), topk_idx.to(torch.int32)
    counts, start, sorted_assign, _, tile_expert = M.permute(topk_idx, E, bm)
    work_rows = int(start[-1]) + -(-int(counts[-1]) // bm) * bm
    assert work_rows < sorted_assign.numel() and (tile_expert[work_rows // bm:] == -1).all()
    launched, real = [], M.persistent_programs
    monkeypatch.setattr(M, "persistent_programs",
                        lambda n, *a: launched.append((n, real(n, *a))) or launched[-1][1])
    outs, grad = {}, {}
    dy = torch.randn(37, 24, generator=torch.Generator().manual_seed(2)).to(DEV, x.dtype)
    # every buffer the forward allocates starts as NaN: what is not written shows
    x_nan = x.clone()
    x_nan.new_empty = lambda *size, dtype=x.dtype, device=DEV: torch.full(
        size, float("nan"), dtype=dtype, device=device)
    for mode in ("1", "0"):
        monkeypatch.setenv("MOLMOE_MOE_PERSISTENT", mode)
        outs[mode] = M._experts_fwd(x_nan, wg, wu, wd, topk_w, counts, start, sorted_assign,
                                    tile_expert, K, bm, True)
        for saved in outs[mode][1:]:  # gate, up: zeros past the work, no NaN anywhere
            assert saved[work_rows:].eq(0).all() and not saved.isnan().any()
        grad[mode] = grads(moe_ffn, (x, router, wg, wu, wd), K, False, dy)
    for a, b in zip(outs["1"], outs["0"]):
        assert torch.equal(a, b)
    for a, b in zip((grad["1"][0], *grad["1"][2]), (grad["0"][0], *grad["0"][2])):
        assert torch.equal(a, b)
    (gu_tiles, gu_programs), (down_tiles, down_programs) = launched[:2]
    assert gu_programs == down_programs == 3 and 3 < gu_tiles and 3 < down_tiles
    assert all(p == 0 for _, p in launched[-2:])  # the fallback: one program per tile
    want = moe_ffn_ref(*(t.float() for t in (x, router, wg, wu, wd)), K)[0]
    assert_within(grad["1"][0], moe_ffn_ref(x, router, wg, wu, wd, K)[0], want, torch.float16,
                  "persistent fp16")


def test_tma_and_pointer_paths_agree(monkeypatch):
    # fp16 weights with 16-byte aligned bases and rows go through tensor descriptors (Triton's
    # interpreter runs them too), misaligned ones through pointer loads: same results, both
    # paths (grouped and decode).
    from molmoe.kernels import moe as M

    inputs = make(20, 24, 40, 4, torch.float16, seed=21)  # rows of 48 / 80 bytes
    x, router, wg, wu, wd = inputs

    def shifted(t):  # the same values one element into a buffer: a misaligned base
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
        return buf.view(t.shape).copy_(t)

    chosen, real = [], M._use_tma
    monkeypatch.setattr(M, "_use_tma", lambda *a: chosen.append(real(*a)) or chosen[-1])
    for path, T in (("grouped", 20), ("decode", 3)):
        by_tma = moe_ffn(x[:T], router, wg, wu, wd, 2, path=path)[0]
        by_ptr = moe_ffn(x[:T], router, *map(shifted, (wg, wu, wd)), 2, path=path)[0]
        torch.testing.assert_close(by_tma, by_ptr, atol=1e-3, rtol=1e-3)
        want = moe_ffn_ref(*(t.float() for t in (x[:T], router, wg, wu, wd)), 2)[0]
        assert_within(by_tma, moe_ffn_ref(x[:T], router, wg, wu, wd, 2)[0], want,
                      torch.float16, f"{path} via TMA")
    assert chosen == [True, False, True, False]


def test_dw_segments_cover_every_row_once_longest_first():
    """The dW kernels' work list (kernels/moe.py `dw_segments`): every sorted row of every
    expert in exactly one segment of at most seg_rows rows, an empty expert in one segment of 0
    rows (its program writes the zeros), split experts' segments in consecutive workspace slots
    within the static bound, unused entries last, and the longest segments first."""
    from molmoe.kernels.moe import dw_segments

    for counts in ([0, 0, 57, 3, 0, 16, 1, 0], [96, 0, 0, 0], [5] * 8, [0] * 3 + [200]):
        E, N = len(counts), sum(counts)
        counts_t = torch.tensor(counts, dtype=torch.int64)
        start = torch.cumsum(torch.tensor([0] + counts[:-1]) + 7, 0)  # padded, gaps between
        for seg_rows in (16, 32, 1000):
            segs, nseg, first_slot, slots = dw_segments(counts_t, start, N, seg_rows)
            segs = segs.tolist()
            used = [s for s in segs if s[2] >= 0]
            assert all(s[2] == -1 for s in segs[len(used):]), "unused entries last"
            assert [s[2] for s in used] == sorted((s[2] for s in used), reverse=True)
            for e, c in enumerate(counts):
                mine = sorted((s for s in used if s[0] == e), key=lambda s: s[1])
                assert len(mine) == int(nseg[e]) == max(1, -(-c // seg_rows))
                rows = [r for s in mine for r in range(s[1], s[1] + s[2])]
                assert rows == list(range(int(start[e]), int(start[e]) + c))
                assert all(0 <= s[2] <= seg_rows for s in mine)
                if len(mine) == 1:
                    assert mine[0][3] == -1
                else:
                    assert [s[3] for s in mine] == list(range(int(first_slot[e]),
                                                              int(first_slot[e]) + len(mine)))
                    assert mine[-1][3] < slots


def test_row_split_dw_equals_whole_expert_dw(monkeypatch):
    """Skewed routing (every token on expert 0, fp32 and fp16): with segments of 16 rows the
    dominant expert's dW is summed from several programs' fp32 partials (`_dw_split_reduce`);
    it matches the unsplit kernels and the reference, and every other gradient is bit-identical
    (the split touches only the dW)."""
    from molmoe.kernels import moe as M

    seen = []
    real = M.dw_segments
    monkeypatch.setattr(M, "dw_segments", lambda *a: seen.append(real(*a)) or seen[-1])
    for dtype in (torch.float32, torch.float16):
        inputs = make(45, 24, 40, 6, dtype, seed=5, dominant=True)
        dy = torch.randn(45, 24, generator=torch.Generator().manual_seed(8)).to(DEV)
        monkeypatch.setattr(M, "dw_segment_rows", lambda N, E, bk: 1 << 20)  # never split
        _, _, whole = grads(moe_ffn, inputs, 2, False, dy)
        assert seen[-1][3] == 0
        monkeypatch.setattr(M, "dw_segment_rows", lambda N, E, bk: 16)
        _, aux, split = grads(moe_ffn, inputs, 2, False, dy)
        segs, nseg, _, slots = seen[-1]
        assert int(aux["counts"][0]) == 45 and int(nseg[0]) == 3 and slots > 0
        _, _, lp = grads(moe_ffn_ref, inputs, 2, False, dy)
        _, _, ref32 = grads(moe_ffn_ref, [t.float() for t in inputs], 2, False, dy)
        for name, i in (("dx", 0), ("drouter", 1)):
            assert torch.equal(split[i], whole[i]), name
        for name, i in (("dw_gate", 2), ("dw_up", 3), ("dw_down", 4)):
            scale = ref32[i].abs().max().item()
            assert (split[i].float() - whole[i].float()).abs().max().item() <= (
                1e-6 if dtype == torch.float32 else 2e-3) * scale, name
            assert_within(split[i], lp[i], ref32[i], dtype, name)
