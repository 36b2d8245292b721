"""The decode loop: prefill a left-padded batch into a static KV cache, then one token at a time.

Lives outside the model (nanochat `engine.py` style): the model only maps (ids, images, cache) to
logits; this module owns the cache, positions, sampling, stopping and streaming.

Positions follow the released code (spec §3.5): prompt positions are cumsum(mask) - 1, each new
token gets the previous position + 1, so a prompt's positions do not depend on its left padding.
Stopping (spec §5.3): at the EOS id (the README's `stop_strings="<|endoftext|>"`), at any other
stop string found in the decoded text (the text is cut before it), or after `max_new_tokens`.
Logits that name no token (NaN/Inf, or all equal: bad weights or config numbers) stop the request
with `GenerationError` instead of decoding noise; the check rides on the loop's one host transfer.

Legend: B batch, S padded prompt length, V vocabulary rows.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from molmoe.errors import MolmoeError, UsageError, is_integral
from molmoe.generation.batching import left_pad_batch
from molmoe.generation.sampling import check_temperature, sample_next

EOS_STRING = "<|endoftext|>"
SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes an unsigned 64-bit seed


class GenerationLengthError(MolmoeError):
    """The prompt plus the requested new tokens do not fit the model's positions."""


# Row status of the logits (Engine._sample): decodable, or why not. All-equal logits across the
# whole vocabulary carry no answer (finite but extreme weights can drive every logit to exactly
# 0); greedy decoding would silently answer token 0 forever.
_LOGITS_OK, _LOGITS_NON_FINITE, _LOGITS_FLAT = 1, 0, 2
_LOGITS_PROBLEM = {
    _LOGITS_NON_FINITE: "are NaN or infinite; the model's weights or config produce NaN/Inf "
                        "(check the checkpoint for non-finite values and the config's numbers)",
    _LOGITS_FLAT: "are all equal across the vocabulary, so they name no token; the model's "
                  "weights or config are degenerate (e.g. extreme weights that overflow or "
                  "saturate a layer)",
}


class GenerationError(MolmoeError):
    """Generation cannot give a meaningful answer (the model's logits are NaN/Inf or all equal)."""


def prompt_allowance(max_positions: int, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside `max_new_tokens` in the model's positions (>= 1)."""
    allowed = max_positions - max_new_tokens
    if allowed < 1:
        raise GenerationLengthError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt (the model has "
            f"max_position_embeddings={max_positions})")
    return allowed


@dataclass(kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 200  # the model card's example
    do_sample: bool = False  # greedy, as the model card
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # seeds a torch.Generator: the same seed gives the same samples
    # The EOS id always stops; the EOS string here only stands for it (decoded text skips special
    # tokens, so it could never match as text). Other strings are matched on the decoded text.
    stop_strings: tuple[str, ...] = (EOS_STRING,)
    eos_token_id: int | None = None  # None: the tokenizer's / generation_config's EOS

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if self.stop_strings is not None and not isinstance(self.stop_strings, (tuple, list)):
            raise UsageError(f"stop_strings must be a string or a list of strings, got "
                             f"{self.stop_strings!r}")
        self.stop_strings = tuple(self.stop_strings or ())
        if not all(isinstance(s, str) for s in self.stop_strings):
            raise UsageError(f"stop_strings must all be strings, got {self.stop_strings!r}")
        if self.eos_token_id is not None and (not is_integral(self.eos_token_id)
                                              or self.eos_token_id < 0):
            raise UsageError(f"eos_token_id must be a token id (an integer >= 0), got "
                             f"{self.eos_token_id!r}")
        if not is_integral(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        check_temperature(self.temperature, self.do_sample)
        if self.top_k is not None and (not is_integral(self.top_k) or self.top_k < 1):
            raise UsageError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(
                self.top_p, numbers.Real) or not 0.0 < self.top_p <= 1.0):  # refuses NaN too
            raise UsageError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_integral(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise UsageError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if any(s == "" for s in self.stop_strings):
            raise UsageError("stop_strings may not contain the empty string")


@dataclass
class Timings:
    prefill_s: float  # batch prefill (vision + prompt), shared by the batch
    decode_s: float  # from the end of prefill until this sequence finished
    new_tokens: int  # tokens this sequence produced (the stopping EOS included)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first (which prefill produced) per decode second."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "new_tokens": self.new_tokens, "tokens_per_s": self.tokens_per_s}


@dataclass
class GenerationResult:
    text: str  # decoded without special tokens, cut before a stop string
    token_ids: list[int]  # generated ids, the stopping EOS not included
    finish_reason: str  # "eos" | "stop_string" | "length"
    timings: Timings


@dataclass
class _Sequence:
    """Per-sequence decode state."""
    ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed: str = ""  # text already passed to on_text
    finish_reason: str | None = None
    new_tokens: int = 0
    finished_at: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # timings must not stop at an asynchronous launch
        torch.cuda.synchronize(device)


class Engine:
    """`Engine(model, tokenizer).generate(processed, GenerationConfig(...), on_text=...)`.

    `tokenizer` needs `decode(ids, skip_special_tokens=...)` and, unless the config or
    `eos_token_id` names it, an `eos_token_id` attribute.
    """

    def __init__(self, model, tokenizer, *, eos_token_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(
            tokenizer, "eos_token_id", None)

    # ------------------------------------------------------------------ helpers

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _eos_string(self, eos: int) -> str | None:
        try:
            return self.tokenizer.decode([eos], skip_special_tokens=False)
        except Exception:  # a tokenizer without that option: fall back to the usual name
            return None

    def _text_stops(self, config: GenerationConfig, eos: int | None) -> tuple[str, ...]:
        special = {EOS_STRING}
        if eos is not None and (name := self._eos_string(eos)):
            special.add(name)
        return tuple(s for s in config.stop_strings if s not in special)

    @staticmethod
    def _cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    @staticmethod
    def _streamable(text: str, stops: tuple[str, ...]) -> str:
        """The part of the (unfinished) text that no later token can change: an incomplete
        UTF-8 character (shown as U+FFFD) and a tail that may begin a stop string are held."""
        text = text.rstrip("\ufffd")
        hold = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return text[: len(text) - hold]

    # ------------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate(self, prompts: dict | list[dict], config: GenerationConfig | None = None, *,
                 on_text: Callable[[int, str], None] | None = None):
        """Generate for one processed prompt (returns one result) or a list (returns a list).

        on_text(i, delta) receives the text of sequence i as it grows; the deltas of a sequence
        concatenate to its final `text`.
        """
        single = isinstance(prompts, dict)
        samples = [prompts] if single else list(prompts)
        config = config or GenerationConfig()
        eos = config.eos_token_id if config.eos_token_id is not None else self.eos_token_id
        stops = self._text_stops(config, eos)
        model = self.model
        device = next(model.parameters()).device
        max_pos = model.config.text.max_position_embeddings

        batch = left_pad_batch(samples)
        self._check_ids(batch, eos, model.config.text)
        for i, n in enumerate(batch.lengths_B):
            if n + config.max_new_tokens > max_pos:
                raise GenerationLengthError(
                    f"prompt {i} has {n} tokens; with max_new_tokens={config.max_new_tokens} that "
                    f"is {n + config.max_new_tokens} positions, beyond the model's "
                    f"max_position_embeddings={max_pos}")
        B, S = batch.input_ids_BS.shape
        to = (lambda t: None if t is None else t.to(device))
        generator = None
        if config.do_sample and config.seed is not None:
            generator = torch.Generator(device=device).manual_seed(config.seed)
        # The last sampled token is never fed back, so S + max_new_tokens - 1 slots suffice.
        cache = model.new_kv_cache(B, S + config.max_new_tokens - 1)

        seqs = [_Sequence() for _ in range(B)]
        _sync(device)
        t0 = time.perf_counter()
        logits_BV = model(to(batch.input_ids_BS), to(batch.images_BTPF), to(batch.image_masks_BTP),
                          to(batch.image_input_idx_BTQ), crop_valid=to(batch.crop_valid_BT),
                          attention_mask=to(batch.attention_mask_BS),
                          position_ids=to(batch.position_ids_BS), kv_cache=cache,
                          logits_to_keep=1)[:, -1]
        step_2B = self._sample(logits_BV, config, generator)
        _sync(device)
        t_prefill = time.perf_counter()
        position_B1 = to(batch.position_ids_BS[:, -1:])
        ones_B1 = torch.ones(B, 1, dtype=torch.bool, device=device)

        for step in range(config.max_new_tokens):
            now = time.perf_counter()
            tokens, status = step_2B.tolist()  # the loop's one host sync per step
            for b, (tok, st) in enumerate(zip(tokens, status)):
                if seqs[b].finish_reason is None:
                    if st != _LOGITS_OK:
                        raise GenerationError(f"sequence {b}: the logits for new token "
                                              f"{step + 1} {_LOGITS_PROBLEM[st]}")
                    self._advance(b, seqs[b], tok, eos, stops, config, on_text, now)
            if all(s.finish_reason is not None for s in seqs) or step + 1 == config.max_new_tokens:
                break
            position_B1 = position_B1 + 1
            logits_BV = model(step_2B[0, :, None], attention_mask=ones_B1,
                              position_ids=position_B1, kv_cache=cache, logits_to_keep=1)[:, -1]
            step_2B = self._sample(logits_BV, config, generator)
            _sync(device)

        prefill_s = t_prefill - t0
        results = [GenerationResult(s.text, s.ids, s.finish_reason,
                                    Timings(prefill_s, max(s.finished_at - t_prefill, 0.0),
                                            s.new_tokens))
                   for s in seqs]
        return results[0] if single else results

    @staticmethod
    def _check_ids(batch, eos, text_config) -> None:
        """Prompt ids must be rows of the embedding, and the EOS id one the LM head can produce
        (else generation never stops): a tokenizer that does not match the model fails here,
        not as an IndexError inside the forward."""
        rows = text_config.embedding_size + text_config.additional_vocab_size
        ids_BS = batch.input_ids_BS
        bad_BS = batch.attention_mask_BS & ((ids_BS < 0) | (ids_BS >= rows))
        if bad_BS.any():
            b, s = (int(i) for i in bad_BS.nonzero()[0])
            raise UsageError(f"prompt {b}: token id {int(ids_BS[b, s])} is not in the model's "
                             f"vocabulary (0..{rows - 1}); does the tokenizer match the model?")
        outputs = text_config.embedding_size  # the LM head's rows
        if eos is not None and (not is_integral(eos) or not 0 <= eos < outputs):
            raise UsageError(f"eos_token_id {eos!r} is not an id the model can generate "
                             f"(0..{outputs - 1}); generation would never stop at it")

    @staticmethod
    def _sample(logits_BV, config: GenerationConfig, generator) -> torch.Tensor:
        """(2, B) int64 on the device: the next tokens and each row's status (_LOGITS_OK, or
        why its logits cannot be decoded: NaN/Inf, or all equal). Stacked so that the loop's one
        `.tolist()` brings both to the host: the check adds no synchronisation."""
        finite_B = torch.isfinite(logits_BV).all(dim=-1)
        flat_B = logits_BV.amax(dim=-1) == logits_BV.amin(dim=-1)
        status_B = torch.where(finite_B, torch.where(flat_B, _LOGITS_FLAT, _LOGITS_OK),
                               _LOGITS_NON_FINITE)
        if config.do_sample:  # multinomial fails on NaN probabilities; the loop reports the row
            logits_BV = logits_BV.masked_fill(~finite_B[:, None], 0.0)
        next_B = sample_next(logits_BV, do_sample=config.do_sample, temperature=config.temperature,
                             top_k=config.top_k, top_p=config.top_p, generator=generator)
        return torch.stack([next_B, status_B.to(next_B.dtype)])

    def _advance(self, b: int, seq: _Sequence, tok: int, eos: int | None,
                 stops: tuple[str, ...], config: GenerationConfig, on_text, now: float) -> None:
        """Take one new token for sequence b: stop, cut, stream."""
        seq.new_tokens += 1
        if eos is not None and tok == eos:
            seq.finish_reason = "eos"
        else:
            seq.ids.append(tok)
            text, hit = self._cut(self._decode(seq.ids), stops)
            seq.text = text
            if hit:
                seq.finish_reason = "stop_string"
            elif seq.new_tokens >= config.max_new_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.finished_at = now
            ready = seq.text
        else:
            ready = self._streamable(seq.text, stops)
        if on_text is not None and len(ready) > len(seq.streamed) and ready.startswith(
                seq.streamed):
            on_text(b, ready[len(seq.streamed):])
            seq.streamed = ready
