"""Tokenizers of the released checkpoints: ids of the prompt, Molmo's special ids (spec §5.1),
decode round trips, and agreement with transformers' own loading of the same files."""
import json

import pytest

from molmoe.processing import IMAGE_TOKENS, Tokenizer, TokenizerError, prompt_text

PROMPT = prompt_text("Describe this image.")
SAMPLES = [
    PROMPT,
    " User: point_count: How many dogs are there? Assistant:",
    "Numbers 1234567 and 3.14159, emojis 🐶🐱, accents café naïve, CJK 你好世界.",
    "Line one\nLine two\r\n\ttabbed    spaces   ",
    "<point x=\"10.5\" y=\"20.3\" alt=\"dog\">dog</point> it's we'll they've I'M",
    "",
]


def test_qwen2_prompt_ids_and_specials(qwen2):
    assert qwen2.encode(PROMPT) == [2657, 25, 60785, 419, 2168, 13, 21388, 25]
    assert (qwen2.image_start_id, qwen2.image_end_id, qwen2.image_patch_id, qwen2.image_col_id,
            qwen2.image_prompt_id) == (152064, 152065, 152066, 152067, 152068)
    assert qwen2.eos_token_id == qwen2.bos_token_id == qwen2.pad_token_id == 151643
    # The vocabulary padding tokens sit between the Qwen2 specials and the image tokens.
    assert qwen2.token_to_id("<|im_end|>") == 151645
    assert qwen2.token_to_id("|<EXTRA_TOKENS_0>|") == 151646
    assert qwen2.token_to_id("|<EXTRA_TOKENS_417>|") == 152063
    assert qwen2.vocab_size == 152069


def test_molmoe_prompt_ids_and_specials(olmoe):
    assert olmoe.encode(PROMPT) == [11447, 27, 3666, 19268, 436, 2460, 15, 17762, 27]
    assert (olmoe.image_start_id, olmoe.image_end_id, olmoe.image_patch_id, olmoe.image_col_id,
            olmoe.image_prompt_id) == (50280, 50281, 50282, 50283, 50284)
    # tokenizer_config's pad wins over special_tokens_map's stale '<|pad|>' (spec §5.1).
    assert (olmoe.eos_token_id, olmoe.bos_token_id, olmoe.pad_token_id) == (50279, 50279, 1)
    assert olmoe.vocab_size == 50285


@pytest.mark.parametrize("name", ["qwen2", "olmoe"])
def test_decode_round_trip(name, request):
    tok = request.getfixturevalue(name)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    ids = [tok.image_start_id, tok.image_patch_id, tok.image_col_id, tok.image_end_id]
    text_ids = tok.encode(" hello")
    assert tok.decode(ids + text_ids) == " hello"          # specials skipped by default
    assert "<im_patch>" in tok.decode(ids + text_ids, skip_special_tokens=False)
    assert tok.encode("".join(IMAGE_TOKENS)) == [tok.image_start_id, tok.image_end_id,
                                                 tok.image_patch_id, tok.image_col_id,
                                                 tok.image_prompt_id]


@pytest.mark.parametrize("subdir", ["molmo-7b-d-0924", "molmoe-1b-0924"])
def test_matches_transformers(shared_data, subdir):
    """Same ids as transformers' tokenizer loaded from the same files (an implementation nobody
    here wrote; for 7B-D it builds Qwen2 from vocab.json + merges.txt itself)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(shared_data / subdir))
    ours = Tokenizer.from_dir(shared_data / subdir)
    for s in SAMPLES + ["".join(IMAGE_TOKENS) + " after <|endoftext|>"]:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False), s
    assert ours.eos_token_id == ref.eos_token_id


def test_demo_tokenizer(tmp_path):
    from molmoe.demo import demo_checkpoint

    tok = Tokenizer.from_dir(demo_checkpoint(tmp_path))
    assert (tok.eos_token_id, tok.pad_token_id) == (256, 257)
    assert (tok.image_start_id, tok.image_col_id) == (258, 261)
    assert tok.decode(tok.encode(PROMPT)) == PROMPT


def test_missing_or_broken_files(tmp_path, shared_data):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    # A tokenizer without Molmo's image tokens is refused by name.
    from tokenizers import Tokenizer as HFTokenizer, models
    plain = HFTokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="image tokens"):
        Tokenizer.from_dir(tmp_path)
    # Added tokens whose ids leave a gap are caught, naming the token.
    d = tmp_path / "gap"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    (d / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 5}))
    with pytest.raises(TokenizerError, match="should have id 5"):
        Tokenizer.from_dir(d)


# ------------------------------------------------------------------ malformed files (issue 10)

def _qwen2_copy(shared_data, tmp_path):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(shared_data / "molmo-7b-d-0924", d)
    return d


@pytest.mark.parametrize("entry", [{}, {"content": 5}, {"content": "<x>", "special": "yes"}, 7])
def test_bad_added_tokens_decoder_entry_is_a_tokenizer_error(shared_data, tmp_path, entry):
    import json

    from molmoe.processing import TokenizerError

    d = _qwen2_copy(shared_data, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["151643"] = entry
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=r"added_tokens_decoder\['151643'\] must be"):
        Tokenizer.from_dir(d)


@pytest.mark.parametrize("tid", [-1, "x", 1.5, True, None])
def test_bad_added_token_id_is_a_tokenizer_error(shared_data, tmp_path, tid):
    import json

    from molmoe.processing import TokenizerError

    d = _qwen2_copy(shared_data, tmp_path)
    added = json.loads((d / "added_tokens.json").read_text())
    added["<im_patch>"] = tid
    (d / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(TokenizerError, match=r"added_tokens.json: token '<im_patch>': id"):
        Tokenizer.from_dir(d)


def test_lone_surrogate_in_text_is_a_usage_error(shared_data):
    from molmoe.errors import UsageError

    tok = Tokenizer.from_dir(shared_data / "molmoe-1b-0924")
    for encode in (tok.encode, tok.encode_text):
        with pytest.raises(UsageError, match=r"lone surrogate U\+D800 at character 3"):
            encode("abc\ud800def")
