"""Incremental detokenization, stop strings and streaming for one generated sequence.

Decoding a sequence's ids again at every new token costs O(n) per token (O(n^2) per answer),
and so does searching the stop strings in the whole text. `TextStream` keeps the per-token cost
bounded by the length of the last few tokens, with the window vLLM and TGI use
(`detokenize_incrementally`, prefix_offset/read_offset): the ids from a boundary a few tokens
back (the prefix) are decoded up to the last committed token (once, at the commit) and up to
the new one (every token); the difference is the new text. It is committed only when it does
not end in U+FFFD: a byte-level token can end in the middle of a UTF-8 character, which decodes
as U+FFFD until the rest of its bytes arrive. Decoding from a context token (not from the new token alone) keeps decoders
that treat the first token specially (SentencePiece's leading space) right.

The semantics are those of decoding every id at every step (the reference the tests compare
with): `text` is `tokenizer.decode(ids, skip_special_tokens=True)` cut before the earliest stop
string; a stop string is looked for after each token, and the stream stops at the first token
whose text holds one. The deltas `push` returns hold nothing a later token could change: a
trailing U+FFFD (an incomplete character) and a tail that could begin a stop string are held
back until they are settled or `finish` flushes them. The deltas concatenate to `text`.

Bounds: a window commits at the first token whose text does not end in U+FFFD. Text that keeps
ending in U+FFFD (invalid bytes: a model emitting lone UTF-8 continuation bytes) is committed
by a second rule once the window holds more than `_MAX_PENDING` tokens: a split before the last
token is kept when decoding the two sides apart gives the text decoding them together gives and
the last token has text of its own (then no later byte can join the bytes before the split).
Special tokens that decoding skips never enter the window. The stop-string search looks only at
the new text plus the `max(len(stop)) - 1` characters before it.
"""
from __future__ import annotations

from molmoe.errors import UsageError

# The EOS string of Molmo's tokenizers (the README's `stop_strings="<|endoftext|>"`).
EOS_STRING = "<|endoftext|>"
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 character decodes to
# Tokens a window may hold past its last commit before the split rule is tried. UTF-8 leaves a
# character incomplete for at most 3 bytes (so at most 3 tokens); more means invalid bytes.
_MAX_PENDING = 4


def text_stops(tokenizer, stop_strings, eos_id: int | None) -> tuple[str, ...]:
    """The stop strings to look for in the decoded text: `stop_strings` without those that
    stand for the EOS id. `EOS_STRING` and the EOS id's own token string name the EOS token,
    which the engine stops at by id; decoded text skips special tokens, so as text they could
    never match."""
    special = {EOS_STRING}
    if eos_id is not None:
        try:
            name = tokenizer.decode([eos_id], skip_special_tokens=False)
        except Exception:  # noqa: BLE001  any tokenizer failure: the usual name stands for it
            name = None
        if name:
            special.add(name)
    return tuple(s for s in stop_strings if s not in special)


class TextStream:
    """The text of one generated sequence, built token by token.

    `push(token_id) -> str` takes the next generated id (the engine keeps the stopping EOS id
    out) and returns the text that became safe to stream; `finish() -> str` flushes what was held
    (an incomplete character, a possible stop-string start) and returns that last delta.
    `text` is the text so far (the full decode, cut before a stop string), `stopped` says a stop
    string ended it, `finished` that `finish` was called, `ids` holds every pushed id (up to
    and including the one that completed a stop string). After a stop string, or after
    `finish`, `push` raises UsageError. `tokenizer` needs `decode(ids, skip_special_tokens=...)`.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        stops = tuple(stops)
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise UsageError(f"stop strings must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.stopped = False
        self.finished = False
        self._keep = max((len(s) for s in stops), default=1) - 1  # a stop's chars before new text
        self._skipped: dict[int, bool] = {}  # id -> decoding skips it (a special token)
        # Committed text: settled, never changed by a later token. Kept as parts; joined on demand.
        self._parts: list[str] = []
        self._parts_len = 0
        self._joined = ""  # "".join(self._parts) when _joined_n == len(self._parts)
        self._joined_n = 0
        self._tail = ""  # the last _keep committed characters
        # The window: ids from the prefix boundary on (skipped specials left out); _win[:_read]
        # is committed, its text in context is _prefix_text; the text after it is _pending.
        self._win: list[int] = []
        self._read = 0
        self._prefix_text = ""
        self._pending = ""
        self._streamed = 0  # characters of `text` returned as deltas
        self._final: str | None = None  # the text once stopped or finished

    # ------------------------------------------------------------------ public

    @property
    def text(self) -> str:
        """The text so far: the full decode of `ids`, cut before a stop string. Joins the
        committed parts, O(len(text)): read it at the end, not per token."""
        if self._final is not None:
            return self._final
        return self._committed() + self._pending

    def push(self, token_id: int) -> str:
        """Take one generated id; return the new text that no later token can change."""
        if self.stopped or self.finished:
            raise UsageError("TextStream: push after the stream "
                             + ("stopped at a stop string" if self.stopped else "was finished"))
        token_id = int(token_id)
        self.ids.append(token_id)
        if self._is_skipped(token_id):  # decoding drops it: the text does not change
            return ""
        committed_before = self._parts_len
        tail_before = self._tail
        added = self._advance(token_id)
        # Everything this push can change or stream lies in `region`, which starts `base`
        # characters into the text: the previous tail (a stop string may begin there), the newly
        # committed text, the pending text.
        region = tail_before + added + self._pending
        base = committed_before - len(tail_before)
        hit = self._find_stop(region)
        if hit is not None:
            self.stopped = True
            end = base + hit
            self._final = (self._committed() + self._pending)[:end]
            return self._emit(region, base, end)
        # Held: a trailing U+FFFD of the pending text (an incomplete character) and the longest
        # tail that is a proper prefix of a stop string.
        incomplete = len(self._pending) - len(self._pending.rstrip(_REPLACEMENT))
        ready_end = base + len(region) - incomplete
        ready_end -= self._stop_prefix_len(region[: ready_end - base])
        return self._emit(region, base, ready_end)

    def finish(self) -> str:
        """End the stream: the text held back (an incomplete character, a possible stop-string
        start) becomes final; returns it. Calling it again returns ""."""
        if self._final is None:
            self._final = self._committed() + self._pending
        self.finished = True
        delta = self._final[self._streamed:]
        self._streamed = len(self._final)
        return delta

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _is_skipped(self, token_id: int) -> bool:
        """An id that decodes to no text alone (a special token that decoding drops, or an id
        spelled as nothing). Byte-level decoders give such ids no bytes in any context, so
        leaving them out of the window changes no text."""
        skipped = self._skipped.get(token_id)
        if skipped is None:
            try:
                # No text of its own (a special token, or an id the tokenizer spells as nothing,
                # such as MolmoE's unused rows 50285..50303): byte-level decoding gives it no
                # bytes, so leaving it out of the window changes no text, and a run of them
                # cannot grow the window.
                skipped = self._decode([token_id]) == ""
            except Exception:  # noqa: BLE001  cannot decode it alone: keep it in the window
                skipped = False
            self._skipped[token_id] = skipped
        return skipped

    def _advance(self, token_id: int) -> str:
        """Add the id to the window, commit what is settled; return the committed text."""
        self._win.append(token_id)
        window = self._decode(self._win)
        if len(window) > len(self._prefix_text) and not window.endswith(_REPLACEMENT):
            self._pending = ""
            return self._commit(len(self._win), window)
        self._pending = window[len(self._prefix_text):]
        if len(self._win) - self._read > _MAX_PENDING:
            split = len(self._win) - 1
            before = self._decode(self._win[:split])
            last = self._decode(self._win[split:])
            if last and before + last == window and len(before) >= len(self._prefix_text):
                self._pending = last
                return self._commit(split, before)
        return ""

    def _commit(self, upto: int, text_upto: str) -> str:
        """Commit the window's ids before `upto` (`text_upto` is their decoded text); the ids
        committed before them stay as the next window's context."""
        added = text_upto[len(self._prefix_text):]
        self._parts.append(added)
        self._parts_len += len(added)
        self._tail = (self._tail + added)[-self._keep:] if self._keep else ""
        self._win = self._win[self._read:]
        self._read = upto - self._read
        self._prefix_text = self._decode(self._win[: self._read])
        if self._pending:  # the pending text's context moved: decode it in the new one
            self._pending = self._decode(self._win)[len(self._prefix_text):]
        return added

    def _committed(self) -> str:
        if self._joined_n != len(self._parts):
            self._joined = "".join(self._parts)
            self._joined_n = len(self._parts)
        return self._joined

    def _find_stop(self, region: str) -> int | None:
        hits = [i for i in (region.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return hold

    def _emit(self, region: str, base: int, end: int) -> str:
        if end <= self._streamed:
            return ""
        delta = region[self._streamed - base: end - base]
        self._streamed = end
        return delta
