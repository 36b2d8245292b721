"""Generation engine: cached decoding, batching, sampling, stopping, streaming, length limits."""
import pytest
import torch
from tokenizers import Tokenizer

from molmoe.demo import build_tokenizer_json
from molmoe.generation import (Engine, GenerationConfig, GenerationLengthError, left_pad_batch,
                               sample_next, top_k_filter, top_p_filter)
from tests.tiny import random_inputs, random_model


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-molmoe", seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    # Byte-level tokenizer of the demo checkpoint: ids 0..255 are bytes, 256 is <|endoftext|>.
    return Tokenizer.from_str(build_tokenizer_json())


def prompt(config, *, crops=2, text=10, seed=1, image=True):
    ids, images, masks, idx = random_inputs(config, crops=crops, text=text, seed=seed)
    if not image:  # the same text without the image tokens
        return {"input_ids": torch.cat([ids[0, :1], ids[0, -text:]])}
    return {"input_ids": ids[0], "images": images[0], "image_masks": masks[0],
            "image_input_idx": idx[0]}


def greedy_by_recomputation(model, p, n):
    """Reference: rerun the whole sequence without a cache for every new token."""
    ids = p["input_ids"].clone()
    image = [p.get(k) for k in ("images", "image_masks", "image_input_idx")]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids[None], *[None if t is None else t[None] for t in image])
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([tok])])
    return out


def test_cached_decoding_equals_full_recomputation(model, tokenizer):
    p = prompt(model.config, crops=2, text=9)
    res = Engine(model, tokenizer).generate(p, GenerationConfig(max_new_tokens=12))
    assert res.token_ids == greedy_by_recomputation(model, p, 12)
    assert res.finish_reason == "length" and res.timings.new_tokens == 12
    assert len(set(res.token_ids)) > 2  # a varied sequence: the comparison has teeth


def test_batch_equals_one_by_one(model, tokenizer):
    prompts = [prompt(model.config, crops=2, text=10, seed=1),
               prompt(model.config, text=7, seed=2, image=False),
               prompt(model.config, crops=3, text=4, seed=3),
               prompt(model.config, crops=1, text=15, seed=4)]
    engine = Engine(model, tokenizer)
    cfg = GenerationConfig(max_new_tokens=8)
    batched = engine.generate(prompts, cfg)
    for p, r in zip(prompts, batched):
        alone = engine.generate(p, cfg)
        assert r.token_ids == alone.token_ids
        assert r.text == alone.text


def test_left_padding_shifts_image_indices_and_pads_crops(model):
    a, b = prompt(model.config, crops=2, text=3), prompt(model.config, text=5, image=False)
    a_len, b_len = len(a["input_ids"]), len(b["input_ids"])
    batch = left_pad_batch([b, a])
    S = max(a_len, b_len)
    assert batch.input_ids_BS.shape == (2, S)
    assert (batch.input_ids_BS[0, : S - b_len] == -1).all()
    assert batch.position_ids_BS[0, -1] == b_len - 1 and batch.position_ids_BS[1, -1] == a_len - 1
    assert (batch.images_BTPF[0] == -1).all() and (batch.image_input_idx_BTQ[0] == -1).all()
    idx = a["image_input_idx"]
    shifted = batch.image_input_idx_BTQ[1]
    assert torch.equal(shifted[idx >= 0], idx[idx >= 0] + (S - a_len))
    assert (shifted[idx < 0] == -100).all()
    # A different crop count pads the extra crops with -1 (the collator's convention).
    c = prompt(model.config, crops=3, text=3)
    batch = left_pad_batch([a, c])
    assert batch.images_BTPF.shape[1] == 3 and (batch.images_BTPF[0, 2] == -1).all()
    assert (batch.image_masks_BTP[0, 2] == -1).all()


def test_sampling_with_seed_is_reproducible(model, tokenizer):
    p = prompt(model.config)
    engine = Engine(model, tokenizer)
    cfg = dict(max_new_tokens=10, do_sample=True, temperature=1.5)
    a = engine.generate(p, GenerationConfig(**cfg, seed=7))
    b = engine.generate(p, GenerationConfig(**cfg, seed=7))
    assert a.token_ids == b.token_ids
    others = {tuple(engine.generate(p, GenerationConfig(**cfg, seed=s)).token_ids)
              for s in range(8, 12)}
    assert len(others | {tuple(a.token_ids)}) > 1  # the seed matters: samples differ


def test_top_k_one_equals_greedy(model, tokenizer):
    p = prompt(model.config)
    engine = Engine(model, tokenizer)
    greedy = engine.generate(p, GenerationConfig(max_new_tokens=10))
    k1 = engine.generate(p, GenerationConfig(max_new_tokens=10, do_sample=True, top_k=1,
                                             temperature=3.0, seed=0))
    assert k1.token_ids == greedy.token_ids


def test_top_k_filter_on_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 9.0, 1.0, 8.0]])
    out = top_k_filter(logits, 2)
    assert torch.isinf(out).sum(dim=-1).tolist() == [3, 3]
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0 and out[1, 2] == 9.0 and out[1, 4] == 8.0
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_filter_on_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = lambda p: (~torch.isinf(top_p_filter(logits, p))).squeeze(0).tolist()
    assert keep(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert keep(0.51) == [True, True, False, False]
    assert keep(0.8) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(0.01) == [True, False, False, False]  # the top token always survives
    assert keep(1.0) == [True] * 4
    # Order in the vocabulary does not matter.
    perm = torch.tensor([2, 0, 3, 1])
    assert (~torch.isinf(top_p_filter(logits[:, perm], 0.8))).squeeze(0).tolist() == [
        False, True, False, True]


def test_sampling_draws_only_kept_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]]).expand(500, -1)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, do_sample=True, top_k=2, generator=g)
    assert set(ids.tolist()) == {1, 2}


def test_stop_string_cuts_text(model, tokenizer):
    p = prompt(model.config)
    engine = Engine(model, tokenizer)
    cfg = dict(do_sample=True, temperature=2.0, seed=5)
    full = engine.generate(p, GenerationConfig(max_new_tokens=16, **cfg))
    assert len(full.text) >= 6, full.text
    stop = full.text[3:5]
    cut = engine.generate(p, GenerationConfig(max_new_tokens=16, stop_strings=(stop,), **cfg))
    assert cut.finish_reason == "stop_string"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text and len(cut.token_ids) < 16


def test_max_new_tokens_respected(model, tokenizer):
    p = prompt(model.config)
    for n in (1, 5):
        r = Engine(model, tokenizer).generate(p, GenerationConfig(max_new_tokens=n))
        assert len(r.token_ids) == n and r.finish_reason == "length"


def test_eos_stops(model, tokenizer):
    p = prompt(model.config)
    engine = Engine(model, tokenizer)
    cfg = dict(do_sample=True, temperature=2.0, seed=5, max_new_tokens=16)
    free = engine.generate(p, GenerationConfig(**cfg))
    eos = free.token_ids[4]
    first = free.token_ids.index(eos)
    r = engine.generate(p, GenerationConfig(**cfg, eos_token_id=eos))
    assert r.finish_reason == "eos"
    assert r.token_ids == free.token_ids[:first]  # the EOS itself is not returned
    assert r.timings.new_tokens == first + 1


def test_streaming_pieces_concatenate_to_text(model, tokenizer):
    prompts = [prompt(model.config, seed=1), prompt(model.config, text=6, seed=2, image=False)]
    engine = Engine(model, tokenizer)
    pieces = {0: [], 1: []}
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=2.0, seed=1)
    results = engine.generate(prompts, cfg, on_text=lambda i, d: pieces[i].append(d))
    for i, r in enumerate(results):
        assert "".join(pieces[i]) == r.text
        assert len(pieces[i]) > 1
    # With a stop string, the streamed text never shows any of it.
    stop = results[0].text[5:7]
    pieces = {0: [], 1: []}
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=2.0, seed=1,
                           stop_strings=(stop,))
    results = engine.generate(prompts, cfg, on_text=lambda i, d: pieces[i].append(d))
    assert "".join(pieces[0]) == results[0].text and stop not in results[0].text


def test_too_long_prompt_is_refused_with_numbers(model, tokenizer):
    p = prompt(model.config)
    n = len(p["input_ids"])
    limit = model.config.text.max_position_embeddings
    with pytest.raises(GenerationLengthError, match=rf"{n} tokens.*{limit}"):
        Engine(model, tokenizer).generate(p, GenerationConfig(max_new_tokens=limit - n + 1))


def test_config_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(TypeError):
        GenerationConfig(10)  # keyword-only


@pytest.mark.parametrize("name", ["tiny-7b-d", "tiny-7b-o"])
def test_cached_decoding_equals_recomputation_dense(name, tokenizer):
    """The same for the dense variants: GQA with qkv bias (7B-D) and norm_after (7B-O)."""
    m = random_model(name, seed=5)
    p = prompt(m.config, crops=2, text=9)
    res = Engine(m, tokenizer).generate(p, GenerationConfig(max_new_tokens=10))
    assert res.token_ids == greedy_by_recomputation(m, p, 10)
    assert len(set(res.token_ids)) > 2  # a varied sequence, not one token repeated
