"""The decode step and the prompt prefill over a slot KV cache (molmoe.model.kv_cache).

The model owns no loop. Generation runs two functions over the static cache buffers bound to the
model's layers (`model.new_kv_cache(rows, slots)`), one sequence per cache row, stored from slot 0
without padding, so a token's cache slot is its position:

    prefill(model, inputs, row) -> logits_V        eager: vision encoder, connector, prompt; writes
                                                   the prompt's keys/values to slots [0, S) of row
                                                   (`prefill_embeds`: the decoder part alone)
    decode_step(model, tokens_B, positions_B)      one new token for each of rows 0..B-1, written
        -> logits_BV                               at slot positions_B[b]; attention reads the
                                                   whole row, masked by its length positions_B+1

`decode_step` has static shapes for a given B, no host synchronisation and no Python branch on
tensor values, in both backends, so it can be compiled (`torch.compile(fullgraph=True)`) and
captured in a CUDA graph. `DecodeRunner` runs it eagerly, compiled, or as one CUDA graph per
batch-size bucket (rows 0..bucket-1; a row nobody uses computes a harmless token at slot 0).

Legend: B batch rows, S prompt tokens, V vocabulary rows.
"""
from __future__ import annotations

import contextlib

import torch

from molmoe.errors import UsageError
from molmoe.model.kv_cache import CacheStep
from molmoe.model.layers import rope_tables

MODES = ("eager", "compile", "graph")


def _autocast(model, device: torch.device):
    dtype = model.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def decode_step(model, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) of the next token of cache rows 0..B-1; see the module docstring.

    tokens_B, positions_B: int64 (B,) on the model's device. positions_B[b] < the cache's slots
    (not checked here: checking would read the tensor on the host; the engine admits only
    requests that fit)."""
    text = model.config.text
    B = tokens_B.shape[0]
    with _autocast(model, tokens_B.device):
        h = model.decoder.embed(tokens_B[:, None])
        positions_B1 = positions_B[:, None]
        cos, sin = rope_tables(positions_B1, text.head_dim, text.rope_theta)
        step = CacheStep.covering(model.decoder.cache, B, positions_B1, attend="cache",
                                  seqlens_B=(positions_B + 1).to(torch.int32))
        return model.decoder(h, cos, sin, None, step)[:, 0]


def prefill(model, inputs: dict, row: int) -> torch.Tensor:
    """Run one processed prompt (unbatched processor output: input_ids (S,), optional images,
    image_masks, image_input_idx on the model's device) into cache row `row`; logits (V,) of
    its next token."""
    ids_S = inputs["input_ids"]
    images = inputs.get("images")
    masks = inputs.get("image_masks")
    with _autocast(model, ids_S.device):
        h_1SD = model.embed(ids_S[None], None if images is None else images[None],
                            None if masks is None else masks[None],
                            None if images is None else inputs["image_input_idx"][None],
                            # every crop given is a real one (batch padding is what is not)
                            None if images is None else torch.ones(
                                1, images.shape[0], dtype=torch.bool, device=images.device))
    return prefill_embeds(model, h_1SD, row)


def prefill_embeds(model, h_1SD: torch.Tensor, row: int) -> torch.Tensor:
    """The decoder part of `prefill`: input embeddings (1, S, D), image features already added
    (`model.embed`), into cache row `row`; logits (V,) of the next token."""
    cache = model.decoder.cache
    if cache is None:
        raise UsageError("no KV cache is bound: call model.new_kv_cache(rows, slots) first")
    S = h_1SD.shape[1]
    if not 0 <= row < cache.batch:
        raise UsageError(f"cache row {row} does not exist (the cache has {cache.batch} rows)")
    if S > cache.max_len:
        raise UsageError(f"a prompt of {S} tokens does not fit the cache's {cache.max_len} slots")
    text = model.config.text
    if S > text.max_position_embeddings:
        raise UsageError(f"a prompt of {S} tokens is beyond the model's "
                         f"{text.max_position_embeddings} positions")
    with _autocast(model, h_1SD.device):
        positions_1S = torch.arange(S, device=h_1SD.device)[None]
        cos, sin = rope_tables(positions_1S, text.head_dim, text.rope_theta)
        step = CacheStep(rows=slice(row, row + 1), index_BS=positions_1S, attend="local")
        return model.decoder(h_1SD, cos, sin, None, step, logits_to_keep=1)[0, -1]


def not_capturable(model, device: torch.device) -> str | None:
    """Why the step cannot be compiled or captured on `device`, or None. The one case: the
    reference MoE on CUDA in a dtype other than bf16 (F.grouped_mm's CUDA kernels take bf16
    only, so it falls back to the released per-expert loop, which reads routing on the host)."""
    from molmoe.backends import Backend

    weights = model.decoder.blocks[0].ffn
    if (device.type == "cuda" and model.backend is Backend.REFERENCE and hasattr(weights, "w_gate")
            and (weights.w_gate.dtype != torch.bfloat16 or model.autocast_dtype is not None)):
        return ("the reference MoE is sync-free on CUDA only with bf16 weights (dtype "
                "'bfloat16'); use backend 'triton', dtype 'bfloat16', or decode mode 'eager'")
    return None


def check_mode(mode: str, model, device: torch.device) -> None:
    """Refuse a decode mode that cannot run here: unknown, "graph" off CUDA, or a step that
    cannot be compiled or captured on `device` (`not_capturable`)."""
    if mode not in MODES:
        raise UsageError(f"unknown decode mode {mode!r}; supported: {', '.join(MODES)}")
    if mode == "graph" and device.type != "cuda":
        raise UsageError("decode mode 'graph' captures CUDA graphs: it needs a CUDA device")
    if mode != "eager" and (why := not_capturable(model, device)):
        raise UsageError(f"decode mode {mode!r}: {why}")


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes the step is compiled / captured for: powers of two, then max_batch."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeRunner:
    """Runs `decode_step` for the first `bucket` cache rows: eagerly, compiled with
    `torch.compile(fullgraph=True)` ("reduce-overhead" on CUDA), or ("graph", CUDA only) as one
    captured CUDA graph per bucket (Triton tiles tuned, then warm-up runs, before capture)."""

    def __init__(self, model, mode: str = "eager"):
        cache = model.decoder.cache
        if cache is None:
            raise UsageError("no KV cache is bound: call model.new_kv_cache(rows, slots) first")
        check_mode(mode, model, cache.k.device)
        self.model, self.mode, self.cache = model, mode, cache
        self.device = cache.k.device
        self.buckets = batch_buckets(cache.batch)
        self._graphs: dict[int, tuple] = {}
        self._compiled = None
        if mode == "compile":
            # The cache buffers keep their addresses: CUDA graphs of "reduce-overhead" read
            # them in place instead of copying them in at every replay.
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
            kind = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._compiled = torch.compile(decode_step, fullgraph=True, dynamic=None, mode=kind)

    def bucket(self, rows: int) -> int:
        for b in self.buckets:
            if b >= rows:
                return b
        raise UsageError(f"{rows} rows do not fit the cache's {self.cache.batch}")

    def __call__(self, tokens_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
        if self.mode == "eager":
            return decode_step(self.model, tokens_B, positions_B)
        if self.mode == "compile":
            return self._compiled(self.model, tokens_B, positions_B)
        return self._replay(tokens_B, positions_B)

    def _replay(self, tokens_B, positions_B):
        B = tokens_B.shape[0]
        if B not in self._graphs:
            self._graphs[B] = self._capture(tokens_B, positions_B)
        graph, tok, pos, out = self._graphs[B]
        tok.copy_(tokens_B)
        pos.copy_(positions_B)
        graph.replay()
        return out

    def _tune(self, B: int) -> None:
        """Triton backend: time the decode-attention and MoE tiles on this bucket's shapes
        before capture (their tuning never runs on the launch path, so a graph captured
        untuned would keep the default tiles). Best effort: a failure warns and the defaults
        stay."""
        from molmoe.backends import Backend

        if self.model.backend is not Backend.TRITON:
            return
        import warnings

        from molmoe.kernels import decode_attention as attention_kernels
        from molmoe.kernels import moe_tuning

        text, cache = self.model.config.text, self.cache
        try:
            q = torch.randn(B, text.n_heads, 1, text.head_dim, device=self.device,
                            dtype=cache.k.dtype)
            lengths = torch.full((B,), cache.max_len, dtype=torch.int32, device=self.device)
            attention_kernels.autotune(q, cache.k[0, :B], cache.v[0, :B], cache_seqlens=lengths)
            ffn = self.model.decoder.blocks[0].ffn
            if text.moe is not None:
                x = torch.randn(B, text.d_model, device=self.device, dtype=ffn.w_gate.dtype)
                kinds = (("gate_up_decode", "down_decode") if B <= moe_tuning.DECODE_MAX_TOKENS
                         else ("gate_up", "down"))
                moe_tuning.autotune(x, ffn.router.weight, ffn.w_gate, ffn.w_up, ffn.w_down,
                                    text.moe.top_k, text.moe.renormalize, kinds=kinds)
        except Exception as e:  # noqa: BLE001  tuning is an optimisation; the defaults run
            warnings.warn(f"decode step: Triton tuning for batch {B} failed ({e}); capturing "
                          f"with the default tiles", RuntimeWarning, stacklevel=2)

    def _capture(self, tokens_B, positions_B):
        """Capture the step for B rows, from the real inputs of its first call. Warm-up runs
        come first (on a side stream, as CUDA graphs require): they tune and compile every
        kernel, so nothing is timed or compiled during capture. They are the real step, run
        again: a step is idempotent (it rewrites the same keys/values into the same slots)."""
        tok, pos = tokens_B.clone(), positions_B.clone()
        self._tune(tok.shape[0])
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                decode_step(self.model, tok, pos)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_step(self.model, tok, pos)
        return graph, tok, pos, out
