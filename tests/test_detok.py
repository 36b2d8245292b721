"""TextStream (incremental detokenization, stop strings, streaming) against the quadratic
reference: every id decoded again at every step, the stop strings searched in the whole text.

Both released tokenizers (Qwen2's for Molmo-7B-D, OLMoE's for MolmoE-1B), on sequences built to
hit the hard cases: characters split across byte tokens (CJK, emoji), invalid bytes, random ids,
special and image ids interleaved, stop strings spanning tokens or only complete at the last
token. The cost test counts the ids handed to `decode`, not time.
"""
from __future__ import annotations

import random

import pytest

from molmoe.errors import UsageError
from molmoe.generation.detok import EOS_STRING, TextStream, text_stops

TEXTS = ["Point to the dog. 世界你好，こんにちは! 😀👍🏽 naïve café ∑ ok",
         "\u6f22\u5b57\u304b\u306a\u4ea4\u3058\u308a\u6587 🧑‍🤝‍🧑 emoji ZWJ; ﷽ Ǆ",
         "<point x=\"10.5\" y=\"20.0\" alt=\"dog\">dog</point> 🐕🐶",
         "plain ascii text with  double  spaces\nand\tcontrols\x07 end"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table of byte-level BPE (each byte has a one-byte token)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_ids(tok) -> dict[int, int]:
    """Byte -> its one-byte token. OLMoE's vocabulary lacks the bytes UTF-8 never uses (0xC0,
    0xC1, 0xF5..0xFF); every other byte must be there."""
    table = _bytes_to_unicode()
    ids = {b: tok.token_to_id(table[b]) for b in range(256)}
    never_utf8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
    assert all(ids[b] is not None for b in range(256) if b not in never_utf8)
    return {b: i for b, i in ids.items() if i is not None}


def reference(tok, ids, stops):
    """The engine's quadratic semantics: (text, stopped, ids consumed)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], True, k
    return tok.decode(ids, skip_special_tokens=True), False, len(ids)


def quadratic_streamable(text: str, stops) -> str:
    """What the engine streamed before TextStream (decoding everything at every token): the
    text without a trailing U+FFFD and without a tail that may begin a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


def run_stream(tok, ids, stops):
    """Push until stopped, check the streaming invariants on the way; (stream, deltas)."""
    stream = TextStream(tok, stops)
    final, _stopped, _n = reference(tok, ids, stops)
    deltas = []
    for k, t in enumerate(ids):
        deltas.append(stream.push(t))
        sent = "".join(deltas)
        # Nothing streamed that a later token could change: a prefix of the final text, and no
        # less than the engine's quadratic streaming had sent by now.
        assert final.startswith(sent), (ids[: k + 1], sent, final)
        if not stream.stopped:
            engine_ready = quadratic_streamable(tok.decode(ids[: k + 1]), stops)
            assert len(sent) >= len(engine_ready) or not final.startswith(engine_ready), \
                (ids[: k + 1], sent, engine_ready)
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return stream, deltas


def check(tok, ids, stops):
    text, stopped, n = reference(tok, ids, stops)
    stream, deltas = run_stream(tok, ids, stops)
    assert (stream.text, stream.stopped) == (text, stopped), (ids, stops)
    assert "".join(deltas) == text, (ids, stops)
    assert stream.ids == ids[:n]
    assert stream.finish() == "" and stream.text == text  # finish twice: nothing more


def _sequences(tok, rng: random.Random, count: int):
    """Id sequences: encoded text (CJK, emoji, ZWJ), the same text as single-byte tokens, random
    bytes (invalid UTF-8), random ids over the whole vocabulary, all with special ids mixed in."""
    byte_ids = _byte_ids(tok)
    specials = sorted(tok.special_ids)
    for i in range(count):
        kind = i % 5
        text = rng.choice(TEXTS)
        if kind == 0:
            ids = tok.encode_text(text)
        elif kind == 1:  # every character split into its bytes
            ids = [byte_ids[b] for b in text.encode("utf-8")]
        elif kind == 2:  # text tokens and byte tokens mixed, truncated characters included
            ids = []
            for piece in text.split(" "):
                raw = (piece + " ").encode("utf-8")
                if rng.random() < 0.5:
                    ids += [byte_ids[b] for b in raw[: rng.randrange(1, len(raw) + 1)]]
                else:
                    ids += tok.encode_text(piece + " ")
        elif kind == 3:  # random bytes: lead bytes without continuations, lone continuations
            ids = [byte_ids[rng.choice([rng.randrange(0xC0), rng.randrange(0x80, 0xC0),
                                        rng.randrange(0xC2, 0xF5), ord("a")])]
                   for _ in range(rng.randrange(1, 40))]
        else:  # any id at all
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        if rng.random() < 0.5:  # special / image ids interleaved
            for _ in range(rng.randrange(1, 6)):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        yield ids


def _stops_for(tok, ids, rng: random.Random):
    """No stops, stops absent from the text, and substrings of the text (spanning tokens, at
    the very end, starting with a multi-byte character)."""
    full = tok.decode(ids)
    choices = [(), ("\u0000never",), ("zz", "ok\u4e16")]
    if full:
        i = rng.randrange(len(full))
        j = rng.randrange(i + 1, min(len(full), i + 6) + 1)
        choices += [(full[i:j],), (full[-rng.randrange(1, min(4, len(full)) + 1):],),
                    ("never there", full[i:j], full[i:i + 1]),
                    (full[max(0, i - 3):j] + "x",)]  # a prefix of it appears: held, then flushed
    return rng.choice(choices)


@pytest.mark.parametrize("name", ["qwen2", "olmoe"])
def test_matches_quadratic_reference(name, request):
    tok = request.getfixturevalue(name)
    rng = random.Random(f"detok-{name}")
    for ids in _sequences(tok, rng, 400):
        check(tok, ids, _stops_for(tok, ids, rng))
        check(tok, ids, ())


@pytest.mark.parametrize("name", ["qwen2", "olmoe"])
def test_hand_picked_cases(name, request):
    tok = request.getfixturevalue(name)
    byte_ids = _byte_ids(tok)
    emoji = [byte_ids[b] for b in "😀".encode()]
    check(tok, emoji, ())  # complete only at the last byte
    check(tok, emoji[:3], ())  # never completed: finish flushes U+FFFD
    check(tok, emoji[:2] + tok.encode_text("a"), ())  # cut short by ASCII
    check(tok, emoji[:1] + [tok.image_patch_id] * 20 + emoji[1:], ())  # specials inside a char
    check(tok, [byte_ids[0x80]] * 50, ())  # lone continuation bytes only
    ids = tok.encode_text("The answer is 42. STOP here")
    check(tok, ids, ("STOP",))
    check(tok, ids, ("42. ST",))  # spans tokens
    check(tok, ids, ("here",))  # only at the last token
    check(tok, ids, ("her", "The"))  # the earliest stop wins even if listed last
    check(tok, ids, ("😀",))
    check(tok, tok.encode_text("ab😀cd"), ("😀",))
    check(tok, [byte_ids[b] for b in "ab😀cd".encode()], ("b😀c",))
    check(tok, [byte_ids[b] for b in "ab😀cd".encode()], ("\ufffd",))  # matches early


@pytest.mark.parametrize("name", ["qwen2", "olmoe"])
def test_streaming_holds_only_what_may_change(name, request):
    tok = request.getfixturevalue(name)
    byte_ids = _byte_ids(tok)
    stream = TextStream(tok, ("STOP",))
    assert stream.push(tok.encode_text("go")[0]) == "go"
    for b in "😀".encode()[:3]:  # an incomplete character is held
        assert stream.push(byte_ids[b]) == ""
    assert stream.push(byte_ids["😀".encode()[3]]) == "😀"
    assert "".join(stream.push(t) for t in tok.encode_text(" ST")) == " "  # "ST" may start STOP
    assert stream.push(tok.encode_text("x")[0]) == "STx"
    assert "".join(stream.push(t) for t in tok.encode_text(" STO")) == " "
    assert stream.finish() == "STO" and stream.text == "go😀 STx STO" and not stream.stopped
    with pytest.raises(UsageError):
        stream.push(1)


class _CountingTokenizer:
    """Counts the ids each decode call receives."""

    def __init__(self, tok):
        self.tok = tok
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        ids = list(ids)
        self.calls.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("name", ["qwen2", "olmoe"])
@pytest.mark.parametrize("kind", ["text", "bytes", "garbage", "specials"])
def test_per_token_cost_is_bounded(name, kind, request):
    tok = request.getfixturevalue(name)
    byte_ids = _byte_ids(tok)
    rng = random.Random(kind)
    if kind == "text":
        ids = []
        while len(ids) < 2000:
            ids += tok.encode_text(rng.choice(TEXTS) + " ")
    elif kind == "bytes":
        ids = [byte_ids[b] for b in ("".join(TEXTS) * 20).encode("utf-8")]
    elif kind == "garbage":  # invalid UTF-8 all the way: the text keeps ending in U+FFFD
        ids = [byte_ids[rng.choice([0x80, 0xBF, 0xE4, 0xF0])] for _ in range(2000)]
    else:
        ids = [t for i in tok.encode_text(TEXTS[0] * 40) for t in (i, tok.image_patch_id)]
    ids = ids[:2000]
    counter = _CountingTokenizer(tok)
    stream = TextStream(counter, ("</point>x", "never seen stop string"))  # prefixes held
    per_push = []
    for t in ids:
        before = sum(counter.calls)
        stream.push(t)
        per_push.append(sum(counter.calls) - before)
    assert not stream.stopped
    assert max(per_push) <= 40, max(per_push)
    assert max(per_push[-200:]) <= max(per_push[:200]) + 8  # no growth with the length
    stream.finish()
    assert stream.text == tok.decode(ids)


def test_text_stops(olmoe):
    eos = olmoe.eos_token_id
    assert text_stops(olmoe, (EOS_STRING, "</point>"), eos) == ("</point>",)
    assert text_stops(olmoe, ("<|endoftext|>", "x"), None) == ("x",)
    name = olmoe.decode([olmoe.image_patch_id], skip_special_tokens=False)
    assert text_stops(olmoe, (name, "y"), olmoe.image_patch_id) == ("y",)  # the EOS id's name
    assert text_stops(olmoe, (name,), eos) == (name,)

    class NoOption:
        def decode(self, ids):
            return "eos"

    assert text_stops(NoOption(), ("eos", EOS_STRING), 3) == ("eos",)


def test_refuses_empty_stop(olmoe):
    with pytest.raises(UsageError):
        TextStream(olmoe, ("",))


@pytest.mark.parametrize("name", ["qwen2", "olmoe"])
def test_fuzz_against_reference(name, request):
    """Hypothesis draws the ids: byte tokens (any UTF-8 state), text tokens, special ids, and a
    stop string cut from the decoded text."""
    from hypothesis import given
    from hypothesis import strategies as st

    from tests.fuzz import FUZZ, seeded

    tok = request.getfixturevalue(name)
    pool = sorted(set(_byte_ids(tok).values()) | set(tok.special_ids)
                  | set(tok.encode_text("".join(TEXTS))))

    @FUZZ
    @seeded
    @given(ids=st.lists(st.sampled_from(pool), min_size=1, max_size=30),
           cut=st.tuples(st.integers(0, 200), st.integers(1, 6)), use_stop=st.booleans())
    def prop(ids, cut, use_stop):
        full = tok.decode(ids)
        stops = ()
        if use_stop and full:
            i = cut[0] % len(full)
            stops = (full[i:i + cut[1]],)
        check(tok, ids, stops)

    prop()


def test_ids_without_text_do_not_grow_the_window(olmoe):
    """MolmoE's tokenizer spells ids 50285..50303 as nothing, with or without special tokens: a
    run of them costs a bounded decode per token, not one growing with the run."""
    silent = [i for i in range(50285, 50304) if olmoe.decode([i], skip_special_tokens=False) == ""]
    if not silent:
        pytest.skip("this tokenizer has no silent ids")

    class Counting:
        def __init__(self):
            self.ids = 0

        def decode(self, ids, skip_special_tokens=True):
            self.ids += len(ids)
            return olmoe.decode(ids, skip_special_tokens=skip_special_tokens)

    tok = Counting()
    stream = TextStream(tok)
    ids = olmoe.encode("caf\u00e9 ")[:2] + [silent[0]] * 2000 + olmoe.encode("ok")
    for t in ids:
        stream.push(t)
    stream.finish()
    assert stream.text == olmoe.decode(ids)
    assert tok.ids < 20 * len(ids)
