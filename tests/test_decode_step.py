"""The decode step over the slot KV cache (molmoe.generation.step): equal to a full recompute,
compiled with fullgraph=True without graph breaks, and free of host-synchronising ops."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from molmoe.ops import REFERENCE_OPS, grouped_experts, moe_ffn_ref
from molmoe.ops.moe import _experts_loop
from molmoe.errors import UsageError
from molmoe.generation.step import DecodeRunner, decode_step, prefill
from molmoe.profiling import OpCounter
from tiny import random_inputs, random_model

NAMES = ["tiny-molmoe", "tiny-7b-d", "tiny-7b-o"]

def _prompts(model, lengths, with_image: bool):
    out = []
    for i, n in enumerate(lengths):
        ids, images, masks, idx = random_inputs(model.config, crops=2, text=n, seed=10 + i)
        p = {"input_ids": ids[0]}
        if with_image:
            p.update(images=images[0], image_masks=masks[0], image_input_idx=idx[0])
        else:
            p["input_ids"] = ids[0, -n:]
        out.append(p)
    return out


def _greedy(model, prompts, steps, runner=None):
    """Slot-cache generation: each prompt prefilled into its row, then batched decode steps."""
    model.new_kv_cache(len(prompts), max(p["input_ids"].shape[0] for p in prompts) + steps)
    runner = runner or (lambda t, p: decode_step(model, t, p))
    first = torch.stack([prefill(model, p, row) for row, p in enumerate(prompts)])
    tokens = first.argmax(-1)
    positions = torch.tensor([p["input_ids"].shape[0] for p in prompts])
    out = [tokens]
    for _ in range(steps - 1):
        tokens = runner(tokens, positions).argmax(-1)
        positions = positions + 1
        out.append(tokens)
    return torch.stack(out, 1)  # (B, steps)


def _full_greedy(model, prompt, steps):
    """The same tokens by recomputing the whole sequence at every step (no cache)."""
    ids = prompt["input_ids"]
    extra = {k: v[None] for k, v in prompt.items() if k != "input_ids"}
    out = []
    for _ in range(steps):
        logits = model(ids[None], **extra)[0, -1]
        tok = logits.argmax()
        out.append(int(tok))
        ids = torch.cat([ids, tok[None]])
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_image", [False, True])
def test_slot_cache_decode_equals_full_recompute(name, with_image):
    model = random_model(name)
    prompts = _prompts(model, [5, 9, 3], with_image)
    with torch.no_grad():
        got = _greedy(model, prompts, 6)
        for b, p in enumerate(prompts):
            assert got[b].tolist() == _full_greedy(model, p, 6)


@pytest.mark.parametrize("name", NAMES)
def test_decode_step_logits_equal_full_forward(name):
    """Logits, not only argmax: the step's row b equals the full forward's last position."""
    model = random_model(name)
    prompts = _prompts(model, [4, 7], with_image=True)
    with torch.no_grad():
        model.new_kv_cache(2, max(p["input_ids"].shape[0] for p in prompts) + 1)
        firsts = [prefill(model, p, row) for row, p in enumerate(prompts)]
        tokens = torch.stack(firsts).argmax(-1)
        positions = torch.tensor([p["input_ids"].shape[0] for p in prompts])
        step = decode_step(model, tokens, positions)
        for b, p in enumerate(prompts):
            extra = {k: v[None] for k, v in p.items() if k != "input_ids"}
            full = model(torch.cat([p["input_ids"], tokens[b:b + 1]])[None], **extra)[0]
            torch.testing.assert_close(firsts[b], full[-2], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(step[b], full[-1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_decode_step_has_no_host_sync(name):
    model = random_model(name)
    with torch.no_grad():
        model.new_kv_cache(3, 12)
        tokens, positions = torch.tensor([1, 2, 3]), torch.tensor([4, 0, 7])
        with OpCounter() as counter:
            decode_step(model, tokens, positions)
    assert counter.ops, "the counter saw nothing"
    assert counter.syncs() == []


def test_grouped_experts_inside_has_no_host_sync():
    """The reference MoE's inference experts run as one opaque custom op in the step; what it
    runs inside syncs no more than the step around it."""
    g = torch.Generator().manual_seed(0)
    E, D, F_, K, T = 8, 16, 12, 2, 5
    x = torch.randn(T, D, generator=g)
    w = [torch.randn(E, F_, D, generator=g), torch.randn(E, F_, D, generator=g),
         torch.randn(E, D, F_, generator=g)]
    idx = torch.topk(torch.rand(T, E, generator=g), K).indices
    counts = torch.zeros(E, dtype=torch.int64).scatter_add_(0, idx.flatten(),
                                                            torch.ones(T * K, dtype=torch.int64))
    with OpCounter() as counter:
        grouped_experts(x, *w, torch.rand(T, K, generator=g), idx, counts)
    assert "_grouped_mm" in counter.ops and counter.syncs() == []


def test_sync_counter_sees_a_sync():
    """The counter is not blind: the released per-expert loop syncs once per expert."""
    model = random_model("tiny-molmoe")
    model.set_ops(dataclasses.replace(REFERENCE_OPS, moe_ffn=_looping_moe))
    with torch.no_grad():
        model.new_kv_cache(1, 8)
        with OpCounter() as counter:
            decode_step(model, torch.tensor([1]), torch.tensor([2]))
    assert "nonzero" in counter.syncs()


def _looping_moe(x, router_w, w_gate, w_up, w_down, top_k, renormalize=False):
    probs = torch.softmax(torch.nn.functional.linear(x, router_w), -1, dtype=torch.float32)
    w, idx = torch.topk(probs, top_k, -1)
    return _experts_loop(x, w_gate, w_up, w_down, w.to(x.dtype), idx), {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 3, 40])
def test_grouped_reference_moe_equals_released_loop(dtype, T):
    """The inference path (grouped GEMMs) gives the released loop's output, to the rounding of
    GEMMs blocked differently (the sum order over experts is the same)."""
    g = torch.Generator().manual_seed(T)
    E, D, F_, K = 8, 32, 24, 3
    x = torch.randn(T, D, generator=g).to(dtype)
    router = torch.randn(E, D, generator=g).to(dtype)
    wg, wu = (torch.randn(E, F_, D, generator=g).to(dtype) * 0.2 for _ in range(2))
    wd = torch.randn(E, D, F_, generator=g).to(dtype) * 0.2
    with torch.no_grad():
        y, aux = moe_ffn_ref(x, router, wg, wu, wd, K)
        want = _experts_loop(x, wg, wu, wd, aux["topk_weights"], aux["topk_idx"])
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, want, **tol)
    assert aux["lb_loss"] is None  # inference: no router losses
    assert aux["counts"].tolist() == torch.bincount(aux["topk_idx"].flatten(), minlength=E).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_compiled_decode_step_fullgraph_same_tokens(name):
    """torch.compile(fullgraph=True) of the step: zero graph breaks, eager's greedy tokens,
    batched, with and without images."""
    torch._dynamo.reset()
    model = random_model(name)
    explain = torch._dynamo.explain(decode_step)
    with torch.no_grad():
        model.new_kv_cache(2, 8)
        report = explain(model, torch.tensor([1, 2]), torch.tensor([3, 5]))
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
    for with_image in (False, True):
        prompts = _prompts(model, [6, 3], with_image)
        with torch.no_grad():
            eager = _greedy(model, prompts, 5)
            runner = DecodeRunner(model, "compile")
            compiled = _greedy(model, prompts, 5, runner)
        assert torch.equal(compiled, eager)


@pytest.mark.parametrize("name", NAMES)
def test_triton_decode_step_has_no_host_sync_and_matches(name):
    """The Triton backend's step (interpreter on the CPU): same logits as the reference, and no
    host-synchronising op around its kernels (each kernel is one opaque custom op)."""
    model = random_model(name)
    with torch.no_grad():
        model.new_kv_cache(3, 40)
        for row in range(3):  # fill the rows with something to attend to
            prefill(model, {"input_ids": torch.arange(5 + row) % 50 + 3}, row)
        tokens, positions = torch.tensor([1, 2, 3]), torch.tensor([5, 6, 7])
        want = decode_step(model, tokens, positions)
        model.set_backend("triton")
        with OpCounter() as counter:
            got = decode_step(model, tokens, positions)
    assert any(op.startswith("decode_attention") for op in counter.ops), counter.ops
    assert counter.syncs() == []
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_cuda_graph_and_compiled_step_equal_eager(backend, mode):
    """On CUDA (bf16 weights: the reference MoE's grouped GEMMs are bf16-only there): the
    captured / compiled step gives eager's greedy tokens, batched, with an image, and the
    capture sees no host sync (CUDA refuses to capture one)."""
    torch._dynamo.reset()
    model = random_model("tiny-molmoe").cuda().to(torch.bfloat16).set_backend(backend)
    prompts = [{k: v.cuda() for k, v in p.items()}
               for p in _prompts(model, [6, 3, 9], with_image=True)]
    with torch.no_grad():
        eager = _greedy(model, prompts, 6)
        got = _greedy(model, prompts, 6, DecodeRunner(model, mode))
    assert torch.equal(got, eager)


def test_graph_mode_refusals():
    model = random_model("tiny-molmoe")
    with torch.no_grad():
        model.new_kv_cache(1, 4)
    with pytest.raises(UsageError, match="needs a CUDA device"):
        DecodeRunner(model, "graph")
    with pytest.raises(UsageError, match="unknown decode mode"):
        DecodeRunner(model, "fast")
