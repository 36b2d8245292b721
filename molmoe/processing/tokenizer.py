"""The checkpoint's tokenizer, through the `tokenizers` library, and Molmo's special token ids.

Two file layouts (spec §5.1):
  * `tokenizer.json` (MolmoE, the demo checkpoint): loaded as is.
  * `vocab.json` + `merges.txt` + `added_tokens.json` (Molmo-7B-D/72B ship Qwen2's slow-tokenizer
    files): rebuilt as Qwen2's fast tokenizer would be (NFC, Qwen2's split regex, byte-level BPE)
    with the added tokens at their listed ids: the Qwen2 specials, the `|<EXTRA_TOKENS_i>|`
    padding tokens and the five image tokens at 152064..152068.
The image-token ids are found by encoding the five strings, as the released processor does.

User text is encoded with `encode_text`, never `encode`. Deliberate deviation from the released
processor: its tokenizer matches added tokens anywhere in the prompt, so a user typing
"<im_patch>" or "<|endoftext|>" gets the real image or control id (one `<im_patch>` more than
there are image features, an EOS mid-prompt). `encode_text` encodes such strings as the
ordinary text they are ("<", "im", "_patch", ">"): it runs a second tokenizer, the same model,
normalizer and pre-tokenizer with the special added tokens taken out, and with the special ids
taken out of the BPE vocabulary too (MolmoE's "<|endoftext|>" and "<|padding|>" are also plain
vocabulary entries, which a merge could otherwise rebuild). Because no special string is matched
at all, neither NFC normalisation (KELVIN SIGN -> K) nor a special string assembled across
pieces of the prompt can produce one. Added tokens that are not special stay: they are text
(NeoX's whitespace runs, OLMo's |||IP_ADDRESS||| placeholders), so text without a special string
encodes exactly as `encode` does. `encode` keeps the released behaviour for `compat="released"`.
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from molmoe.errors import MolmoeError, UsageError, is_int
from molmoe.fileio import read_json, read_text, regular_file

IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")

# Qwen2's pre-tokenizer split (Qwen2TokenizerFast / tokenizer.json of Qwen2 models).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(MolmoeError):
    """Missing or inconsistent tokenizer files; the message names the file and the token."""


class Tokenizer:
    """encode/decode plus the ids Molmo needs. `encode` never adds special tokens."""

    def __init__(self, tok: HFTokenizer, *, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, source: str = "<tokenizer>"):
        self._tok = tok
        self.source = source
        self.eos_token_id = self._require(eos_token, "eos_token")
        # Molmo's tokenizers have no BOS; the processor uses EOS in its place (spec §4.6).
        self.bos_token_id = self._require(bos_token, "bos_token") if bos_token else self.eos_token_id
        self.pad_token_id = self._require(pad_token, "pad_token") if pad_token else self.eos_token_id
        ids = tok.encode("".join(IMAGE_TOKENS), add_special_tokens=False).ids
        if len(ids) != len(IMAGE_TOKENS):
            raise TokenizerError(f"{source}: the image tokens {IMAGE_TOKENS} do not encode to 5 "
                                 f"single ids (got {ids}); this is not a Molmo tokenizer")
        (self.image_start_id, self.image_end_id, self.image_patch_id, self.image_col_id,
         self.image_prompt_id) = ids

    def _require(self, token: str, what: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.source}: {what} {token!r} is not in the vocabulary")
        return tid

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The released encoding: special strings in `text` become their special ids."""
        return self._tok.encode(_valid_text(text), add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """`text` as plain text: never a special or image id (see the module docstring)."""
        ids = self._plain.encode(_valid_text(text), add_special_tokens=False).ids
        injected = self.special_ids.intersection(ids)
        if injected:  # only a non-BPE tokenizer whose model itself emits a special id gets here
            tid = min(injected)
            raise TokenizerError(f"{self.source}: text {text!r} encodes to the special token "
                                 f"{self._tok.id_to_token(tid)!r} (id {tid}) even with special "
                                 "tokens disabled")
        return ids

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids user text must never produce: every special added token, the image tokens and
        EOS/BOS/pad."""
        added = self._tok.get_added_tokens_decoder()
        return frozenset([i for i, t in added.items() if t.special] + [
            self.image_start_id, self.image_end_id, self.image_patch_id, self.image_col_id,
            self.image_prompt_id, self.eos_token_id, self.bos_token_id, self.pad_token_id])

    @functools.cached_property
    def _plain(self) -> HFTokenizer:
        """The tokenizer with every special id removed, built on first use (about 1 s for
        Qwen2's 151k merges)."""
        spec = json.loads(self._tok.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"]
                                if t["id"] not in self.special_ids]
        model = spec["model"]
        if model.get("type") == "BPE":
            removed = {tok for tok, i in model["vocab"].items() if i in self.special_ids}
            if removed:
                model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in removed}
                model["merges"] = [m for m in model["merges"] if not removed.intersection(
                    _merge_parts(m))]
        return HFTokenizer.from_str(json.dumps(spec))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @classmethod
    def from_dir(cls, directory: str | pathlib.Path) -> "Tokenizer":
        d = pathlib.Path(directory)
        cfg = read_json(d / "tokenizer_config.json", TokenizerError) \
            if (d / "tokenizer_config.json").exists() else {}
        smap = read_json(d / "special_tokens_map.json", TokenizerError) \
            if (d / "special_tokens_map.json").exists() else {}
        if (d / "tokenizer.json").exists():
            path = regular_file(d / "tokenizer.json", TokenizerError)  # a FIFO would hang
            try:
                tok = HFTokenizer.from_file(str(path))
            except Exception as e:
                raise TokenizerError(f"{d / 'tokenizer.json'}: cannot load ({e})") from None
            source = str(d / "tokenizer.json")
        elif (d / "vocab.json").exists() and (d / "merges.txt").exists():
            tok = _build_bpe(d, cfg)
            source = str(d / "vocab.json")
        else:
            raise TokenizerError(f"{d}: no tokenizer.json and no vocab.json + merges.txt")

        def pick(name: str) -> str | None:
            # tokenizer_config first: MolmoE's special_tokens_map names a stale pad ('<|pad|>').
            for source_cfg in (cfg, smap):
                tokstr = _token_str(source_cfg.get(name))
                if tokstr is not None and tok.token_to_id(tokstr) is not None:
                    return tokstr
            return None

        eos = pick("eos_token") or ("<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None
                                    else None)
        if eos is None:
            raise TokenizerError(f"{d}: no eos_token in tokenizer_config.json / "
                                 "special_tokens_map.json that the vocabulary knows")
        return cls(tok, eos_token=eos, bos_token=pick("bos_token"), pad_token=pick("pad_token"),
                   source=source)


def _merge_parts(merge) -> tuple[str, str, str]:
    """A BPE merge (["a", "b"] or the older "a b") -> (a, b, a + b)."""
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    return a, b, a + b


def _valid_text(text: str) -> str:
    """`text` if it is valid Unicode; a lone surrogate (not encodable as UTF-8, so no tokenizer
    can take it) is a UsageError naming its offset."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"text holds a lone surrogate U+{ord(text[e.start]):04X} at character "
                         f"{e.start}, which is not valid Unicode text") from None
    return text


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
_MAX_TOKEN_ID = 1 << 24  # far above any Molmo vocabulary (152k), so the checks below stay cheap


def _token_id(value, where: str) -> int:
    """A token id from a tokenizer file: a non-negative integer (or its decimal string)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not is_int(value) or not 0 <= value < _MAX_TOKEN_ID:
        raise TokenizerError(f"{where}: id {value!r} is not an integer in 0..{_MAX_TOKEN_ID - 1}")
    return value


def _build_bpe(d: pathlib.Path, cfg: dict) -> HFTokenizer:
    """Byte-level BPE from slow-tokenizer files, laid out as Qwen2TokenizerFast builds it."""
    cls = cfg.get("tokenizer_class", "Qwen2Tokenizer")
    if cls not in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise TokenizerError(f"{d / 'tokenizer_config.json'}: tokenizer_class {cls!r} ships no "
                             "tokenizer.json and only Qwen2's vocab.json+merges.txt layout is "
                             "supported")
    vocab = read_json(d / "vocab.json", TokenizerError)
    for token, tid in vocab.items():
        _token_id(tid, f"{d / 'vocab.json'}: token {token!r}")
    merges = []
    for n, line in enumerate(read_text(d / "merges.txt", TokenizerError).splitlines()):
        if not line or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{d / 'merges.txt'}: line {n + 1} is not a pair: {line!r}")
        merges.append((parts[0], parts[1]))
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                     byte_fallback=False))
    except Exception as e:  # the Rust side names what it refuses (e.g. a merge of unknown tokens)
        raise TokenizerError(f"{d / 'vocab.json'} + merges.txt: not a BPE vocabulary ({e})"
                             ) from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Added tokens at their listed ids. tokenizers numbers new tokens consecutively after the
    # vocabulary, so they are added in id order and every id is checked afterwards.
    added: dict[str, int] = {}
    if (d / "added_tokens.json").exists():
        path = d / "added_tokens.json"
        for content, tid in read_json(path, TokenizerError).items():
            added[content] = _token_id(tid, f"{path}: token {content!r}")
    decoder_cfg = cfg.get("added_tokens_decoder", {})
    where = f"{d / 'tokenizer_config.json'}: added_tokens_decoder"
    if not isinstance(decoder_cfg, dict):
        raise TokenizerError(f"{where} must be an object of id -> token")
    for tid, spec in decoder_cfg.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("content"), str) and all(
                isinstance(spec.get(flag, False), bool) for flag in _ADDED_TOKEN_FLAGS)):
            raise TokenizerError(f"{where}[{tid!r}] must be an object with a string 'content' "
                                 f"and true/false {', '.join(_ADDED_TOKEN_FLAGS)}; got {spec!r}"
                                 [:300])
        added.setdefault(spec["content"], _token_id(tid, f"{where}[{tid!r}]"))
    for content, tid in sorted(added.items(), key=lambda kv: kv[1]):
        spec = decoder_cfg.get(str(tid), {})
        token = AddedToken(content, single_word=spec.get("single_word", False),
                           lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                           normalized=spec.get("normalized", False),
                           special=spec.get("special", True))
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(content)
        if got != tid:
            raise TokenizerError(f"{d / 'added_tokens.json'}: token {content!r} should have id "
                                 f"{tid} but lands at {got} (ids must continue the vocabulary "
                                 "without gaps)")
    return tok
