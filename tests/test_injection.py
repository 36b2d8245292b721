"""User text cannot inject special tokens (issue 10): every special string of every tokenizer is
encoded as plain text, so the prompt holds exactly one `<im_patch>` per image feature and no
control id; `compat="released"` keeps the released processor's behaviour (injection included).

The special strings are enumerated from each tokenizer's own added-token table, not listed here.
"""
import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from molmoe.errors import UsageError
from molmoe.processing import Processor, Tokenizer, load_image, prompt_text
from tests.fuzz import FUZZ, seeded
from tests.test_tokenizer import SAMPLES

IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)  # the smallest image: 2 crops, 288 features
NAMES = ["qwen2", "olmoe", "demo"]


@pytest.fixture(scope="module")
def processors(shared_data, tmp_path_factory):
    from molmoe.demo import demo_checkpoint

    demo = demo_checkpoint(tmp_path_factory.mktemp("demo"))
    return {"qwen2": Processor.from_pretrained(shared_data / "molmo-7b-d-0924"),
            "olmoe": Processor.from_pretrained(shared_data / "molmoe-1b-0924"),
            "demo": Processor.from_pretrained(demo)}


def special_tokens(tok: Tokenizer) -> dict[str, int]:
    """Every added token the tokenizer flags special, straight from the `tokenizers` table."""
    return {t.content: i for i, t in tok._tok.get_added_tokens_decoder().items() if t.special}


def forbidden_ids(tok: Tokenizer) -> set[int]:
    return set(special_tokens(tok).values()) | {
        tok.image_start_id, tok.image_end_id, tok.image_patch_id, tok.image_col_id,
        tok.image_prompt_id, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}


def as_normalised(tok: Tokenizer, text: str) -> str:
    """What decoding gives back: the text after the tokenizer's normalizer (NFC or none)."""
    norm = tok._tok.normalizer
    return text if norm is None else norm.normalize_str(text)


def test_enumeration_covers_the_issue_strings(processors):
    """The enumeration is not empty and holds the strings the issue names."""
    for name, proc in processors.items():
        specials = special_tokens(proc.tokenizer)
        assert {"<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>",
                "<|endoftext|>"} <= set(specials), name
    qwen2 = special_tokens(processors["qwen2"].tokenizer)
    assert {"<|im_start|>", "<|im_end|>", "|<EXTRA_TOKENS_0>|", "|<EXTRA_TOKENS_417>|"} <= set(qwen2)
    assert len(qwen2) == 3 + 418 + 5  # Qwen2 specials, padding tokens, image tokens


@pytest.mark.parametrize("name", NAMES)
def test_no_special_string_injects(processors, name):
    proc = processors[name]
    tok = proc.tokenizer
    bad = forbidden_ids(tok)
    n_img = proc.image_token_count(1, 1)
    for s in special_tokens(tok):
        text = f"a {s} b"
        out = proc(text, images=IMAGE)
        ids = out["input_ids"]
        n_features = int((out["image_input_idx"] >= 0).sum())
        assert int((ids == tok.image_patch_id).sum()) == n_features, s
        text_ids = ids[1 + n_img:].tolist()
        assert not bad.intersection(text_ids), s
        # Nothing is lost either: the special string comes back as the characters typed.
        assert tok.decode(text_ids, skip_special_tokens=False) == prompt_text(text), s


@pytest.mark.parametrize("name", NAMES)
def test_ordinary_text_is_unchanged(processors, name):
    """Plain-text encoding equals the released encoding wherever no special string occurs:
    whitespace runs (NeoX's non-special added tokens), emoji, CJK, the prompt template."""
    tok = processors[name].tokenizer
    for s in SAMPLES + [prompt_text(s) for s in SAMPLES] + ["a     b |||IP_ADDRESS||| c"]:
        assert tok.encode_text(s) == tok.encode(s), s


def fragments(names=("qwen2", "olmoe")) -> list[str]:
    """Pieces of special strings (prefixes, suffixes, whole), joiners, and characters that NFC
    maps onto ASCII (KELVIN SIGN -> K) or composes (e + COMBINING ACUTE)."""
    from molmoe.demo import _SPECIALS
    from molmoe.processing import IMAGE_TOKENS

    whole = set(_SPECIALS) | set(IMAGE_TOKENS) | {"<|im_start|>", "<|im_end|>",
                                                  "|<EXTRA_TOKENS_0>|", "|<EXTRA_TOKENS_417>|"}
    out = set(whole)
    for s in whole:
        out.update(s[:k] for k in range(1, len(s)))
        out.update(s[k:] for k in range(1, len(s)))
    return sorted(out) + [" ", "  ", "\n", "a", "\u212a", "e\u0301", "\u00e9", "|", "<", ">"]


FRAGMENTS = fragments()


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@seeded
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=12))
def test_fragments_never_inject(processors, name, parts):
    proc = processors[name]
    tok = proc.tokenizer
    text = "".join(parts)
    ids = proc(text)["input_ids"].tolist()
    assert ids[0] == tok.bos_token_id
    assert not forbidden_ids(tok).intersection(ids[1:])
    assert tok.decode(ids[1:], skip_special_tokens=False) == as_normalised(tok, prompt_text(text))


def test_released_compat_keeps_the_released_injection(processors):
    """compat="released" is bit for bit the released processor, whose flaw is that user text
    can name a special token; the default encodes it as text."""
    for name, proc in processors.items():
        tok = proc.tokenizer
        released = Processor(tok, proc.settings, compat="released")
        ids = released("hello <im_patch>")["input_ids"].tolist()
        assert ids.count(tok.image_patch_id) == 1, name
        assert tok.image_patch_id not in proc("hello <im_patch>")["input_ids"].tolist(), name
        assert released("hello")["input_ids"].tolist() == proc("hello")["input_ids"].tolist()


@pytest.mark.skipif("compat" not in inspect.signature(load_image).parameters,
                    reason="needs load_image(..., compat=) from the images.py part of issue 10")
def test_released_compat_with_an_image(processors):
    """With an image: one <im_patch> more than there are image features, as released."""
    proc = processors["olmoe"]
    released = Processor(proc.tokenizer, proc.settings, compat="released")
    out = released("hello <im_patch>", images=IMAGE)
    n_features = int((out["image_input_idx"] >= 0).sum())
    assert int((out["input_ids"] == proc.tokenizer.image_patch_id).sum()) == n_features + 1
    assert torch.equal(out["images"], proc("hello", images=IMAGE)["images"])


def test_from_pretrained_compat(shared_data):
    d = shared_data / "molmoe-1b-0924"
    tok_ids = Processor.from_pretrained(d, compat="released")("<|endoftext|>")["input_ids"]
    assert tok_ids.tolist().count(50279) == 2  # the BOS and the injected EOS, as released
    assert Processor.from_pretrained(d)("<|endoftext|>")["input_ids"].tolist().count(50279) == 1


def test_invalid_compat_is_a_usage_error(processors, shared_data):
    tok = processors["demo"].tokenizer
    for bad in ("Released", "", None, 1):
        with pytest.raises(UsageError, match="compat"):
            Processor(tok, compat=bad)
    with pytest.raises(UsageError, match="compat"):
        Processor.from_pretrained(shared_data / "molmoe-1b-0924", compat="hf")
