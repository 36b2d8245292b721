"""`molmoe profile decode` (molmoe.profiling): the command runs end to end and writes what it says,
its op counter counts what it should, and the transformers model it compares against computes the
same logits as ours (else the comparison would time a different model)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from molmoe.cli import main
from molmoe.generation.step import decode_step, prefill
from molmoe.profiling import (SYNC_OPS, OpCounter, _hf_cache_kwarg, count_ops, hf_decoder,
                              hf_state_dict, sync_count)
from tiny import random_inputs, random_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "small.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_end_to_end_writes_json_png_traces(tmp_path, small_image, capsys):
    out = tmp_path / "prof"
    rc = main(["profile", "decode", "--model", "tiny-molmoe", "--image", str(small_image),
               "--batch", "2", "--new-tokens", "5", "--repeats", "2", "--profile-steps", "1",
               "--backend", "reference", "--compare", "transformers", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("time to first token", "ours / transformers", "top ops", "needs a GPU"):
        assert text in printed
    report = json.loads((out / "profile.json").read_text())
    assert (out / "profile.png").stat().st_size > 1000
    for key in ("command", "environment", "model", "prompt", "preprocessing_ms", "image_decode_ms",
                "implementations", "ratios", "greedy_check", "needs_gpu"):
        assert key in report, key
    assert {"date", "commit", "device", "torch", "transformers"} <= set(report["environment"])
    ours, hf = report["implementations"]
    assert (ours["name"], hf["name"]) == ("molmoe-reference", "transformers")
    assert hf["class"] == "OlmoeForCausalLM"
    for r in (ours, hf):
        assert r["decode_ms"]["n"] == 2 * 4  # repeats x (new tokens - 1) steps
        assert r["decode_ms"]["p10_ms"] <= r["decode_ms"]["p50_ms"] <= r["decode_ms"]["p90_ms"]
        assert r["prefill_decoder_ms"]["n"] == 2
        assert r["ops_per_step"] > 0 and r["peak_memory"]["bytes"] > 0
        for phase in ("decode", "prefill"):
            trace = r[f"profile_{phase}"]["trace"]
            assert json.loads(open(trace).read())["traceEvents"], trace
            assert r[f"profile_{phase}"]["rows"]
    t = ours["ttft_ms"]
    assert report["prompt"]["crops"] >= 2 and t["vision"]["p50_ms"] > 0
    assert t["connector"]["p50_ms"] > 0 and t["prefill"]["p50_ms"] > 0
    # the step: no host sync, the same op count whatever the cache length
    assert ours["sync_ops_per_step"] == 0
    assert ours["ops_per_step"] == ours["ops_per_step_later"]
    b = ours["bytes_per_step"]
    assert b["weights_experts"] > 0 and b["kv"] > 0
    assert b["total"] == pytest.approx(b["weights_dense"] + b["weights_experts"] + b["kv"])
    assert report["greedy_check"]["molmoe-reference"]["equal"]
    ratios = report["ratios"]["molmoe-reference"]
    assert ratios["decode_batch2"] == pytest.approx(ours["decode_ms"]["p50_ms"]
                                                    / hf["decode_ms"]["p50_ms"])


def test_text_only_prompt_padded_to_prompt_tokens(tmp_path, capsys):
    rc = main(["profile", "decode", "--model", "tiny-7b-d", "--image", "none",
               "--prompt-tokens", "40", "--new-tokens", "3", "--repeats", "1",
               "--profile-steps", "1", "--compare", "transformers", "--device", "cpu",
               "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["prompt"]["tokens"] == 40 and report["prompt"]["crops"] == 0
    assert report["implementations"][1]["class"] == "Qwen2ForCausalLM"
    assert report["implementations"][0]["ttft_ms"]["vision"]["p50_ms"] == 0
    assert "prompt already takes" in _usage_error(["--prompt-tokens", "3"], capsys)


def _usage_error(extra, capsys) -> str:
    rc = main(["profile", "decode", "--model", "tiny-molmoe", "--image", "none",
               "--device", "cpu"] + extra)
    assert rc == 2
    return capsys.readouterr().err


def test_count_ops_counts_syncs_and_matches_the_counter():
    x = torch.arange(6.0)
    ops = count_ops(lambda t: (t * 2).sum().item(), x)
    assert ops["mul"] == 1 and ops["sum"] == 1 and ops["_local_scalar_dense"] == 1
    assert sync_count(ops) == 1 and "_local_scalar_dense" in SYNC_OPS
    with OpCounter() as counter:
        torch.nonzero(x > 2)
    assert counter.syncs() == ["nonzero"]


@pytest.mark.parametrize("name", ["tiny-molmoe", "tiny-7b-d"])
def test_decode_step_op_count_does_not_depend_on_cache_length(name):
    model = random_model(name)
    with torch.no_grad():
        model.new_kv_cache(2, 64)
        tokens = torch.tensor([3, 4])
        counts = [count_ops(decode_step, model, tokens, torch.tensor([p, p + 1]))
                  for p in (0, 5, 40)]
    assert counts[0] == counts[1] == counts[2]
    assert sync_count(counts[0]) == 0


@pytest.mark.parametrize("name,cls", [("tiny-molmoe", "OlmoeForCausalLM"),
                                      ("tiny-7b-d", "Qwen2ForCausalLM"),
                                      ("tiny-7b-o", "Olmo2ForCausalLM")])
def test_transformers_mapping_gives_our_logits(name, cls):
    """The model `--compare transformers` times computes what ours does, on shared tensors."""
    model = random_model(name)
    hf = hf_decoder(model)
    assert type(hf).__name__ == cls
    t = model.config.text
    ids = torch.randint(0, t.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
    # views of our weights, not copies (except OLMoE's fused gate_up_proj)
    q = hf.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == model.decoder.blocks[0].attn.qkv.weight.data_ptr()
    copies = [k for k, v in hf_state_dict(model).items()
              if not any(v.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                         for p in model.parameters())]
    assert all(k.endswith("gate_up_proj") for k in copies)


def test_transformers_cached_decode_matches_our_step():
    """Greedy decode with transformers' own cache == our prefill + decode_step (logits)."""
    model = random_model("tiny-molmoe")
    hf = hf_decoder(model)
    ids, *_ = random_inputs(model.config, crops=1, text=9, seed=3)
    ids = ids[0, -9:]
    with torch.no_grad():
        model.new_kv_cache(1, 16)
        first = prefill(model, {"input_ids": ids}, 0)
        out = hf(ids[None], use_cache=True)
        torch.testing.assert_close(first, out.logits[0, -1], atol=1e-5, rtol=1e-4)
        tok = first.argmax()[None]
        ours = decode_step(model, tok, torch.tensor([9]))[0]
        cache = {_hf_cache_kwarg(hf): out.past_key_values}
        theirs = hf(tok[None], use_cache=True, **cache).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_fewer_new_tokens_than_profiled_steps_and_too_many_layers(tmp_path, capsys):
    """The profiled decode may run more steps than the timed one: the cache covers both. A
    preset cut to more layers than it has is refused, not silently grown."""
    rc = main(["profile", "decode", "--model", "tiny-molmoe", "--image", "none", "--new-tokens",
               "2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "p")])
    assert rc == 0, capsys.readouterr().err
    rc = main(["profile", "decode", "--model", "tiny-molmoe", "--image", "none", "--layers", "9",
               "--device", "cpu", "--out", str(tmp_path / "q")])
    assert rc == 2 and "--layers 9" in capsys.readouterr().err
