"""The training objective (molmoe.training): answer-token cross-entropy plus the router losses,
checked against an independent recomputation, and the Triton backend's gradients against the
reference's on the whole-model loss (Triton's interpreter, fp32)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from molmoe.errors import UsageError
from molmoe.training import LB_COEF, Z_COEF, moe_layers, training_loss
from tiny import random_inputs, random_model


def _batch(model, with_image=True, crops=2):
    ids, images, masks, idx = random_inputs(model.config, batch=2, crops=crops, text=10, seed=4)
    ids[1, :3] = -1  # batch padding
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, -6:] = True  # the answer: the last 6 tokens
    inputs = {"input_ids": ids}
    if with_image:
        inputs.update(images=images, image_masks=masks, image_input_idx=idx)
    else:
        inputs["input_ids"] = ids[:, -10:]
        mask = mask[:, -10:]
    return inputs, mask


def _router_losses(x_TD, router_w, top_k):
    """Switch / OLMoE load balancing and ST-MoE z-loss, written here from their definitions."""
    logits = x_TD @ router_w.T
    probs = logits.float().softmax(-1)
    T, E = probs.shape
    chosen = probs.topk(top_k, dim=-1).indices
    f = torch.zeros(E).index_add_(0, chosen.flatten(), torch.ones(chosen.numel())) / (T * top_k)
    lb = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits.float(), -1).square().mean()
    return lb, z


def test_losses_equal_their_definitions():
    model = random_model("tiny-molmoe").train()
    inputs, mask = _batch(model)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
             for m in moe_layers(model)]
    out = training_loss(model, inputs, mask)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        logits = model(**inputs)
    targets, m = inputs["input_ids"][:, 1:], mask[:, 1:]
    ce = F.cross_entropy(logits[:, :-1][m], targets[m])
    torch.testing.assert_close(out.ce, ce, rtol=1e-5, atol=1e-6)
    k = model.config.text.moe.top_k
    want = [_router_losses(x.reshape(-1, x.shape[-1]), layer.router.weight.detach(), k)
            for x, layer in zip(seen, moe_layers(model))]
    torch.testing.assert_close(out.lb, sum(w[0] for w in want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.z, sum(w[1] for w in want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.total, out.ce + LB_COEF * out.lb + Z_COEF * out.z)
    assert out.tokens == int(m.sum()) and out.lb > 0 and out.z > 0


def test_backward_reaches_every_weight_router_included():
    model = random_model("tiny-molmoe").train()
    inputs, mask = _batch(model)
    training_loss(model, inputs, mask).total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in moe_layers(model):
        assert layer.router.weight.grad.abs().sum() > 0


def test_dense_models_have_no_router_losses():
    model = random_model("tiny-7b-d").train()
    inputs, mask = _batch(model, with_image=False)
    out = training_loss(model, inputs, mask)
    assert float(out.lb) == 0.0 and float(out.z) == 0.0 and out.total == out.ce


def test_bad_loss_masks_are_refused():
    model = random_model("tiny-molmoe").train()
    inputs, mask = _batch(model)
    with pytest.raises(UsageError, match="shaped like input_ids"):
        training_loss(model, inputs, mask[:, 1:])
    bad = mask.clone()
    bad[1, 2] = True  # a padding position (-1) as a target
    with pytest.raises(UsageError, match="cannot produce"):
        training_loss(model, inputs, bad)
    with torch.no_grad(), pytest.raises(UsageError, match="needs gradients"):
        training_loss(model, inputs, mask)


@pytest.fixture
def big_attention_tiles(monkeypatch):
    if not torch.cuda.is_available():  # the tiny ViT's 577 tokens: keep the interpreter fast
        monkeypatch.setenv("MOLMOE_ATTENTION_CONFIG",
                           "BLOCK_M=128,BLOCK_N=128,num_warps=1,num_stages=1")


def test_triton_gradients_equal_the_reference(big_attention_tiles):
    """Every parameter's gradient of the whole-model loss (router losses included), Triton
    kernels (interpreter, fp32) against the reference. 168-px crops: 145 ViT tokens, two
    128-token attention tiles with a ragged tail (577 tokens took the interpreter ~3 minutes)."""
    grads = {}
    for backend in ("reference", "triton"):
        model = random_model("tiny-molmoe", image_size=168).train().set_backend(backend)
        inputs, mask = _batch(model, crops=1)  # one crop: the interpreter's ViT backward is slow
        out = training_loss(model, inputs, mask)
        out.total.backward()
        grads[backend] = (out, {n: p.grad for n, p in model.named_parameters()})
    (ref, g_ref), (tri, g_tri) = grads["reference"], grads["triton"]
    for part in ("ce", "lb", "z"):
        torch.testing.assert_close(getattr(tri, part), getattr(ref, part), rtol=1e-4, atol=1e-6)
    for name, g in g_ref.items():
        scale = g.abs().max().clamp(min=1e-6)
        err = (g_tri[name] - g).abs().max() / scale
        assert err < 2e-3, (name, float(err))
