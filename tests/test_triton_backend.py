"""The whole Triton backend at once: `molmoe.load(..., backend="triton")` on tiny checkpoints, with
the ViT attention, patch pooling, RoPE, prefill attention, decode attention and the MoE all running
as Triton kernels (Triton's interpreter on the CPU), against the reference backend in fp32."""
import dataclasses

import pytest
import torch
from tokenizers import Tokenizer

import molmoe
from molmoe.backends import ops_for
from molmoe.ops import REFERENCE_OPS, Ops
from molmoe.demo import build_tokenizer_json
from molmoe.generation import Engine, GenerationConfig
from tests.tiny import random_inputs, random_model, write_checkpoint

CASES = [("tiny-molmoe", "molmoe-hf"), ("tiny-7b-d", "dense"), ("tiny-7b-o", "dense")]


@pytest.fixture(autouse=True)
def big_attention_tiles(monkeypatch):
    # The tiny ViT runs 577 tokens per crop: wide tiles keep the interpreter to seconds (tile
    # edges are covered by tests/test_attention.py with the small default tiles).
    if not torch.cuda.is_available():
        monkeypatch.setenv("MOLMOE_ATTENTION_CONFIG",
                           "BLOCK_M=128,BLOCK_N=128,num_warps=1,num_stages=1")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def counting(ops: Ops):
    """The same ops, each wrapped to count its calls (to show every kernel really ran)."""
    calls = {f.name: 0 for f in dataclasses.fields(Ops)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    return Ops(**{n: wrap(n, getattr(ops, n)) for n in calls}), calls


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def checkpoint(request, tmp_path_factory):
    name, layout = request.param
    return write_checkpoint(random_model(name, seed=4), tmp_path_factory.mktemp(name), layout)


def test_triton_ops_are_the_kernels():
    ops = ops_for("triton")
    for field in dataclasses.fields(Ops):
        fn = getattr(ops, field.name)
        assert fn.__module__.startswith("molmoe.kernels."), (field.name, fn.__module__)
        assert fn is not getattr(REFERENCE_OPS, field.name)


def test_load_with_triton_backend_gives_reference_logits(checkpoint):
    ref = molmoe.load(checkpoint)
    fast = molmoe.load(checkpoint, backend="triton")
    assert all(m.ops is ops_for("triton") for m in fast.modules() if hasattr(m, "ops"))
    ops, calls = counting(ops_for("triton"))
    fast.set_ops(ops)
    ids, images, masks, idx = random_inputs(ref.config, batch=2, crops=1, text=11, seed=3)
    ids[1, -4:] = -1  # right padding in the second row: the key padding mask path
    with torch.no_grad():
        want, got = ref(ids, images, masks, idx), fast(ids, images, masks, idx)
    assert calls["attention"] > 0 and calls["patch_pool"] > 0 and calls["apply_rope"] > 0
    assert calls["moe_ffn"] > 0 or ref.config.text.moe is None
    valid = ids != -1
    assert rel_err(got[valid], want[valid]) < 1e-4


def test_generation_with_triton_backend_gives_reference_tokens(checkpoint):
    """Batched greedy generation (left padding, an image prompt and a text-only one): prefill
    attention, then the decode-attention kernel on the KV cache, give the reference's tokens."""
    tokenizer = Tokenizer.from_str(build_tokenizer_json())
    ref = molmoe.load(checkpoint)
    ops, calls = counting(ops_for("triton"))
    fast = molmoe.load(checkpoint).set_ops(ops)
    ids, images, masks, idx = random_inputs(ref.config, crops=1, text=6, seed=7)
    prompts = [{"input_ids": ids[0], "images": images[0], "image_masks": masks[0],
                "image_input_idx": idx[0]},
               {"input_ids": torch.cat([ids[0, :1], ids[0, -9:]])}]
    cfg = GenerationConfig(max_new_tokens=6)
    want = Engine(ref, tokenizer).generate(prompts, cfg)
    got = Engine(fast, tokenizer).generate(prompts, cfg)
    assert calls["decode_attention"] > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert len(set(want[0].token_ids + want[1].token_ids)) > 2  # varied: the check has teeth
