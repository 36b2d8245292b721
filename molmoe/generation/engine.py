"""The decode loop with continuous batching over a slot KV cache (nanochat `engine.py` style).

The model only maps inputs to logits; this module owns the cache, the rows, positions, sampling,
stopping and streaming. One sequence per cache row, stored from slot 0 without padding
(molmoe.model.kv_cache, slot mode), so prompts of any lengths share the cache:

    submit(prompt, config) -> Request      checked at once (a bad request is refused alone)
    step()                                 admit waiting requests into free rows (each prompt is
                                           prefilled alone, eagerly: vision, connector, prompt),
                                           then ONE decode step for every running row (the
                                           captured / compiled `decode_step` over the first
                                           `bucket` rows), sample, stop, stream
    cancel(request)                        frees its row at once
    generate(prompts, config)              submit all, step until done (the batch API)

A finished or cancelled request frees its row at once; the next waiting request takes it before
the next step. Rows are handed out lowest first, so the step covers the fewest rows.

Why slots, not pages: a slot cache keeps every sequence contiguous, which is what the decode
kernel (`cache_seqlens` over contiguous rows) and the CUDA-graph step read without an indirection;
its cost is memory reserved up to `max_len` per row. For MolmoE (128 KiB of bf16 K/V per token)
8 rows x 4,096 slots are 4 GiB, small beside the weights on one GPU; a paged cache pays a
page-table gather in every layer of every step to save memory this runtime does not need.

Positions follow the released code (spec §3.5): a prompt's tokens have positions 0..S-1 and each
new token the next one. Stopping (spec §5.3): at the EOS id (the README's
`stop_strings="<|endoftext|>"`), at any other stop string found in the decoded text (the text is
cut before it), or after `max_new_tokens`. Logits that name no token (NaN/Inf, or all equal: bad
weights or config numbers) end that request with `GenerationError`; the check rides on the step's
one host transfer. Seeded sampling draws from the request's own generator, so a request samples
the same tokens whatever else is in the batch.

Legend: B batch rows of the step, V vocabulary rows.
"""
from __future__ import annotations

import collections
import itertools
import numbers
import time
from dataclasses import dataclass
from typing import Callable

import torch

from molmoe.config import InsufficientMemoryError
from molmoe.errors import MolmoeError, UsageError, is_integral
from molmoe.generation.detok import EOS_STRING, TextStream, text_stops
from molmoe.generation.eos import engine_eos
from molmoe.generation.sampling import check_temperature, sample_next
from molmoe.generation.step import DecodeRunner, check_mode, not_capturable, prefill

SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes an unsigned 64-bit seed


class GenerationLengthError(MolmoeError):
    """The prompt plus the requested new tokens do not fit the model's positions or the cache."""


# Row status of the logits (Engine._choose): decodable, or why not. All-equal logits across the
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
    seed: int | None = None  # seeds the request's torch.Generator: same seed, same samples
    # The EOS id always stops; the EOS string here only stands for it (decoded text skips special
    # tokens, so it could never match as text). Other strings are matched on the decoded text.
    stop_strings: tuple[str, ...] = (EOS_STRING,)
    eos_token_id: int | None = None  # None: the engine's (generation_config's / tokenizer's)

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
    prefill_s: float  # this request's prefill (vision + prompt) up to its first token
    decode_s: float  # from its first token until it finished
    new_tokens: int  # tokens it produced (the stopping EOS included)

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
    finish_reason: str  # "eos" | "stop_string" | "length" | "cancelled" | "error"
    timings: Timings


class Request:
    """One prompt in the engine: from `submit` until finished (then `result` is set)."""

    def __init__(self, rid: int, inputs: dict, config: GenerationConfig, eos: int | None,
                 stream: TextStream, on_text, device: torch.device, label: str | None = None):
        self.id = rid
        self.label = label or f"request {rid}"  # how errors name it
        self.inputs, self.config, self.eos, self.stream, self.on_text = (inputs, config, eos,
                                                                          stream, on_text)
        self.generator = None
        if config.do_sample and config.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.prompt_len = int(inputs["input_ids"].shape[0])
        self.row: int | None = None
        self.position = 0  # the cache slot (= position) of the next token fed back
        self.token = 0  # the last sampled token (fed back at the next step)
        self.new_tokens = 0
        self.finish_reason: str | None = None
        self.stop: str | None = None  # why it ends, set by the step before it finishes
        self.error: Exception | None = None
        self.result: GenerationResult | None = None
        self.t_start = self.t_first = self.t_done = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def slots_needed(self) -> int:
        # The last sampled token is never fed back: prompt + max_new_tokens - 1 slots.
        return self.prompt_len + self.config.max_new_tokens - 1


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """`Engine(model, tokenizer).generate(processed, GenerationConfig(...), on_text=...)`, or
    `submit` / `step` / `cancel` for requests that come and go (continuous batching).

    max_batch: cache rows (default: the number of prompts of the `generate` call, at most 64).
    max_len: slots per row; None sizes the cache to the requests at hand whenever the engine
    is idle, an int fixes it (requests that do not fit are refused at `submit`).
    mode: how the decode step runs, "eager", "compile" (torch.compile, fullgraph) or "graph"
    (CUDA graphs); None = "graph" on CUDA where the step can be captured, else "eager".
    `tokenizer` needs `decode(ids, skip_special_tokens=...)` and, unless `eos_token_id` or the
    model's generation_config names it, an `eos_token_id` attribute.
    """

    DEFAULT_MAX_BATCH = 64

    def __init__(self, model, tokenizer, *, eos_token_id: int | None = None,
                 max_batch: int | None = None, max_len: int | None = None,
                 mode: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id = engine_eos(model, tokenizer, eos_token_id)
        self.device = next(model.parameters()).device
        if mode is None:  # CUDA graphs where the step can be captured
            capture = self.device.type == "cuda" and not not_capturable(model, self.device)
            mode = "graph" if capture else "eager"
        check_mode(mode, model, self.device)
        for name, value in (("max_batch", max_batch), ("max_len", max_len)):
            if value is not None and (not is_integral(value) or value < 1):
                raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
        max_pos = model.config.text.max_position_embeddings
        if max_len is not None and max_len > max_pos:
            raise UsageError(f"max_len={max_len} is beyond the model's {max_pos} positions")
        self.mode, self.max_batch, self.max_len = mode, max_batch, max_len
        self._ids = itertools.count()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = []
        self._runner: DecodeRunner | None = None
        self._reduced = False  # the cache is smaller than wanted: memory refused more

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: dict, config: GenerationConfig | None = None, *,
               on_text: Callable[[str], None] | None = None, label: str | None = None) -> Request:
        """Queue one processed prompt (the processor's unbatched output). Checked now: a bad
        request raises here and nothing else changes. on_text(delta) streams its text; `label`
        names it in errors (default "request <id>")."""
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise UsageError(f"config must be a GenerationConfig, got {type(config).__name__}")
        eos = config.eos_token_id if config.eos_token_id is not None else self.eos_token_id
        inputs = self._check_prompt(prompt, eos)
        n, text = inputs["input_ids"].shape[0], self.model.config.text
        if n + config.max_new_tokens > text.max_position_embeddings:
            raise GenerationLengthError(
                f"the prompt has {n} tokens; with max_new_tokens={config.max_new_tokens} that "
                f"is {n + config.max_new_tokens} positions, beyond the model's "
                f"max_position_embeddings={text.max_position_embeddings}")
        if self.max_len is not None and n + config.max_new_tokens - 1 > self.max_len:
            raise GenerationLengthError(
                f"the prompt has {n} tokens; with max_new_tokens={config.max_new_tokens} it "
                f"needs {n + config.max_new_tokens - 1} cache slots, the engine has "
                f"max_len={self.max_len}")
        stream = TextStream(self.tokenizer, text_stops(self.tokenizer, config.stop_strings, eos))
        request = Request(next(self._ids), inputs, config, eos, stream, on_text, self.device,
                          label)
        self._waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now; its row is free for the next one. No-op once it finished."""
        if request.finished:
            return
        if request in self._waiting:
            self._waiting.remove(request)
        self._finish(request, "cancelled", time.perf_counter())

    @property
    def running(self) -> list[Request]:
        return [r for r in self._rows if r is not None]

    def has_work(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._rows)

    # ------------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit what fits, then one decode step for every running row. Returns the requests
        that finished during this call."""
        done: list[Request] = []
        self._admit(done)
        rows = [i for i, r in enumerate(self._rows) if r is not None]
        if not rows:
            return done
        self._bind()
        B = self._runner.bucket(rows[-1] + 1)
        tokens = [0] * B
        positions = [0] * B  # unused rows: a harmless token at slot 0 of a free row
        for i in rows:
            tokens[i], positions[i] = self._rows[i].token, self._rows[i].position
        tokens_B = torch.tensor(tokens, device=self.device)
        positions_B = torch.tensor(positions, device=self.device)
        logits_BV = self._runner(tokens_B, positions_B)
        picks = self._choose(logits_BV, self._rows[:B]).tolist()  # the step's one host sync
        now = time.perf_counter()
        # Every row's state moves first; callbacks run after, so one that raises or cancels
        # another request cannot leave a row half-advanced.
        advanced = []
        for i in rows:
            request = self._rows[i]
            request.position += 1
            advanced.append((request, self._advance(request, picks[0][i], picks[1][i])))
        for request, delta in advanced:
            self._deliver(request, delta, now, done)
        return done

    def _admit(self, done: list[Request]) -> None:
        while self._waiting:
            request = self._waiting[0]
            try:
                if not self._ensure_cache(request):
                    return  # waits for a row, or for the engine to be idle to resize the cache
            except (InsufficientMemoryError, torch.OutOfMemoryError) as e:
                self._waiting.popleft()  # not even one row of its size fits: it fails alone
                e.args = (f"{request.label}: {e}",) + e.args[1:]
                # without the traceback, whose frames would keep a half-made cache alive
                request.error = e.with_traceback(None)
                self._finish(request, "error", time.perf_counter())
                done.append(request)
                continue
            self._waiting.popleft()
            row = self._rows.index(None)
            request.row, self._rows[row] = row, request
            request.t_start = time.perf_counter()
            self._bind()
            try:
                logits_V = prefill(self.model, request.inputs, row)
                pick = self._choose(logits_V[None], [request]).tolist()
            except Exception as e:  # this request fails alone; the batch goes on
                request.error = e
                self._finish(request, "error", time.perf_counter())
                done.append(request)
                continue
            request.position = request.prompt_len
            request.t_first = time.perf_counter()
            delta = self._advance(request, pick[0][0], pick[1][0])
            self._deliver(request, delta, request.t_first, done)

    def _ensure_cache(self, request: Request) -> bool:
        """A free row whose slots fit the request. When the engine is idle, the cache is sized
        for everything waiting (rows and slots rounded up to powers of two unless fixed, so a
        compiled step meets few shapes) and reallocated only if the current one is too small.
        An allocation that does not fit memory is retried with half the rows, then with the
        head request's slots alone; raises if even that does not fit."""
        cache = self._runner.cache if self._runner is not None else None
        if any(r is not None for r in self._rows):  # busy: a free row of enough slots, or wait
            return request.slots_needed <= cache.max_len and None in self._rows
        want_rows = self.max_batch or min(_pow2(len(self._waiting)), self.DEFAULT_MAX_BATCH)
        need = max(r.slots_needed for r in self._waiting)
        max_pos = self.model.config.text.max_position_embeddings
        want_slots = self.max_len or min(_pow2(need), max_pos)
        if cache is not None and self._reduced and request.slots_needed <= cache.max_len:
            pass  # memory gave a smaller cache than wanted: keep it while the head fits
        elif cache is None or cache.batch < want_rows or cache.max_len < need:
            least = self.max_len or min(_pow2(request.slots_needed), max_pos)
            self._allocate(want_rows, want_slots, least)
        self._rows = [None] * self._runner.cache.batch
        return True

    def _allocate(self, rows: int, slots: int, least_slots: int) -> None:
        """Allocate rows x slots; refused (memory), retry with the head request's slots, then
        with half the rows each time. `_reduced` remembers a cache smaller than wanted."""
        self._runner = None
        self.model.decoder.bind_cache(None)  # drop the old buffers before allocating
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._reduced = False
        while True:
            try:
                self.model.new_kv_cache(rows, slots)
                break
            except (InsufficientMemoryError, torch.OutOfMemoryError):
                self._reduced = True
                if slots > least_slots:
                    slots = least_slots
                elif rows > 1:
                    rows //= 2
                else:
                    self._reduced = False  # no cache at all now
                    raise
        self._runner = DecodeRunner(self.model, self.mode)

    def _bind(self) -> None:
        """The model's layers read this engine's cache (someone may have bound another one to
        the same model since: a plain `model.new_kv_cache`, a second engine)."""
        if self.model.decoder.cache is not self._runner.cache:
            self.model.decoder.bind_cache(self._runner.cache)

    @staticmethod
    def _choose(logits_BV: torch.Tensor, requests: list[Request | None]) -> torch.Tensor:
        """(2, B) int64 on the device: each row's next token and the status of its logits
        (_LOGITS_OK, or why they cannot be decoded: NaN/Inf, or all equal). Greedy rows take
        one batched argmax; sampling rows draw with their own settings and generator."""
        finite_B = torch.isfinite(logits_BV).all(dim=-1)
        flat_B = logits_BV.amax(dim=-1) == logits_BV.amin(dim=-1)
        status_B = torch.where(finite_B, torch.where(flat_B, _LOGITS_FLAT, _LOGITS_OK),
                               _LOGITS_NON_FINITE)
        next_B = torch.argmax(logits_BV, dim=-1)
        for b, request in enumerate(requests):
            if request is None or not request.config.do_sample:
                continue
            c = request.config
            # multinomial fails on NaN probabilities; the status reports the row instead
            row = logits_BV[b:b + 1].masked_fill(~finite_B[b:b + 1, None], 0.0)
            next_B[b] = sample_next(row, do_sample=True, temperature=c.temperature,
                                    top_k=c.top_k, top_p=c.top_p, generator=request.generator)[0]
        return torch.stack([next_B, status_B.to(next_B.dtype)])

    def _advance(self, request: Request, token: int, status: int) -> str:
        """Take one new token: check it, stop, detokenize. Returns the text delta to stream;
        `request.stop` says why it ends (the row is freed by `_deliver`)."""
        if status != _LOGITS_OK:
            request.error = GenerationError(f"{request.label}: the logits for new token "
                                            f"{request.new_tokens + 1} {_LOGITS_PROBLEM[status]}")
            request.stop = "error"
            return ""
        request.new_tokens += 1
        request.token = token
        if request.eos is not None and token == request.eos:
            request.stop = "eos"
            return ""
        delta = request.stream.push(token)
        if request.stream.stopped:
            request.stop = "stop_string"
        elif request.new_tokens >= request.config.max_new_tokens:
            request.stop = "length"
        return delta

    def _deliver(self, request: Request, delta: str, now: float, done: list[Request]) -> None:
        """Stream the delta and finish the request if it stops. A callback that raises fails
        its own request (the error is in `request.error`), no other."""
        if request.finished:  # cancelled by an earlier callback of this step
            return
        if not self._emit(request, delta):
            request.stop = "error"
        if request.finished:  # its own callback cancelled it
            return
        if request.stop is not None:
            self._finish(request, request.stop, now)
            done.append(request)

    @staticmethod
    def _emit(request: Request, delta: str) -> bool:
        if not delta or request.on_text is None or request.error is not None:
            return True
        try:
            request.on_text(delta)
        except Exception as e:  # the caller's callback: its failure is this request's
            request.error = e
            return False
        return True

    def _finish(self, request: Request, reason: str, now: float) -> None:
        request.finish_reason, request.t_done = reason, now
        if request.row is not None:
            if reason == "error" and self._runner is not None:
                # A failed request may have left NaN/Inf keys/values; the reference attention
                # multiplies masked values by zero weights (NaN * 0 = NaN), so a shorter
                # sequence reusing the row would read them. Errors are rare: clear the row.
                self._runner.cache.k[:, request.row].zero_()
                self._runner.cache.v[:, request.row].zero_()
            self._rows[request.row] = None
            request.row = None
        if reason != "error" and not self._emit(request, request.stream.finish()):
            request.finish_reason = "error"
        first = request.t_first or now
        timings = Timings(max(first - request.t_start, 0.0), max(now - first, 0.0),
                          request.new_tokens)
        # ids: all generated ids but the EOS (with a stop string: up to the one completing it)
        request.result = GenerationResult(request.stream.text, list(request.stream.ids),
                                          request.finish_reason, timings)

    # ------------------------------------------------------------------ batch API

    def generate(self, prompts: dict | list[dict], config: GenerationConfig | None = None, *,
                 on_text: Callable[[int, str], None] | None = None):
        """Generate for one processed prompt (returns one result) or a list (returns a list).

        on_text(i, delta) receives the text of prompt i as it grows; the deltas of a prompt
        concatenate to its final `text`. Every prompt is checked before any runs.
        """
        single = isinstance(prompts, dict)
        samples = [prompts] if single else list(prompts)
        if not samples:
            raise UsageError("no prompts to generate from")
        if self.has_work():
            raise UsageError("generate() needs an idle engine (requests are running)")
        requests = []
        try:
            for i, sample in enumerate(samples):
                callback = None if on_text is None else (lambda d, i=i: on_text(i, d))
                try:
                    requests.append(self.submit(sample, config, on_text=callback,
                                                label=f"sequence {i}"))
                except MolmoeError as e:
                    e.args = (f"prompt {i}: {e}",) + e.args[1:]
                    raise
            while self.has_work():
                for request in self.step():
                    if request.error is not None:
                        raise request.error
        finally:
            for request in requests:
                self.cancel(request)
        results = [r.result for r in requests]
        return results[0] if single else results

    # ------------------------------------------------------------------ checks

    def _check_prompt(self, prompt, eos) -> dict:
        """The prompt's tensors on the device, after checking what the model would otherwise
        fail on deep inside: ids outside the embedding, image tensors of the wrong shapes, and
        an EOS id the LM head cannot produce (generation would never stop)."""
        if not isinstance(prompt, dict) or "input_ids" not in prompt:
            raise UsageError("a prompt must be a processor output dict with 'input_ids'")
        text, vision = self.model.config.text, self.model.config.vision
        ids = torch.as_tensor(prompt["input_ids"])
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point:
            raise UsageError(f"input_ids must be a non-empty 1-D sequence of ids, got shape "
                             f"{tuple(ids.shape)} {ids.dtype}")
        rows = text.embedding_size + text.additional_vocab_size
        bad = (ids < 0) | (ids >= rows)
        if bad.any():
            raise UsageError(f"token id {int(ids[bad][0])} is not in the model's vocabulary "
                             f"(0..{rows - 1}); does the tokenizer match the model?")
        if eos is not None and (not is_integral(eos) or not 0 <= eos < text.embedding_size):
            raise UsageError(f"eos_token_id {eos!r} is not an id the model can generate "
                             f"(0..{text.embedding_size - 1}); generation would never stop at it")
        out = {"input_ids": ids.to(self.device, torch.int64)}
        if prompt.get("images") is None:
            return out
        images = torch.as_tensor(prompt["images"])
        P, Fdim = vision.num_patches, vision.patch_dim
        if images.dim() != 3 or tuple(images.shape[1:]) != (P, Fdim):
            raise UsageError(f"images has shape {tuple(images.shape)}, expected (crops, {P}, "
                             f"{Fdim})")
        if prompt.get("image_input_idx") is None:
            raise UsageError("images given without image_input_idx")
        idx = torch.as_tensor(prompt["image_input_idx"])
        T, Q = images.shape[0], vision.tokens_per_crop
        if tuple(idx.shape) != (T, Q):
            raise UsageError(f"image_input_idx has shape {tuple(idx.shape)}, expected ({T}, {Q})")
        if (idx >= ids.shape[0]).any():
            raise UsageError(f"image_input_idx points past the prompt ({ids.shape[0]} tokens)")
        if not torch.isfinite(images).all():
            raise UsageError("images hold NaN or infinite values (the processor gives finite "
                             "pixels; -1 marks padding)")
        out["images"] = images.to(self.device, torch.float32)
        out["image_input_idx"] = idx.to(self.device)
        masks = prompt.get("image_masks")
        if masks is not None:
            masks = torch.as_tensor(masks)
            if tuple(masks.shape) != (T, P):
                raise UsageError(f"image_masks has shape {tuple(masks.shape)}, expected "
                                 f"({T}, {P})")
        else:  # no mask given: the crop is all image (what a 1.0 mask says)
            masks = torch.ones(T, P)
        out["image_masks"] = masks.to(self.device, torch.float32)
        return out
