"""A static KV cache: preallocated buffers, one view per layer, written in place (gpt-fast).

`KVCache` holds k and v as (L, B, Hkv, Smax, Dh) buffers, allocated once; `cache.layer(i)` is
layer i's (B, Hkv, Smax, Dh) view, which the decoder hands to that layer's `Attention` (the layer
owns its view; nothing threads a layer index through the calls). A forward that uses the cache
describes ONCE where its new tokens go, in a `CacheStep`, and every layer follows it:

    rows        which cache rows (sequences) the forward's B inputs are: a slice of the buffers
    index_BS    the cache slot of each new token (k/v are scattered there, any slot per row)
    attend      "cache": queries read the cache (decode, chunked prefill), masked by
                seqlens_B (keys [0, seqlens_B[b]) are valid, the new tokens' causal order
                bottom-right aligned) and key_mask_BSk (left padding); "local": a prompt that
                starts at slot 0 attends to its own new keys only (no cache read).

Two ways of using it:
  * slot mode (molmoe.generation.step, the engine): every cache row is one sequence, stored from
    slot 0 without padding, so a token's slot IS its position. Sequences of any lengths share the
    buffers; the decode step writes token b at slot positions_B[b] and reads keys <= that slot.
    Shapes never change from step to step: the step can be compiled or captured in a CUDA graph.
  * shared-index mode (`model(ids, kv_cache=cache)`, left-padded batches): all rows append at
    the same slot `cache.length`; `key_mask` marks which written slots are real tokens.

Keys are stored after RoPE (spec §3.5 step 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from molmoe.config import check_allocation
from molmoe.errors import UsageError


@dataclass
class CacheStep:
    """Where one forward's new tokens go in the cache, and what its queries attend (see above).
    Built once per forward, read by every layer."""
    rows: slice | None  # None: all rows of the cache
    index_BS: torch.Tensor  # int64 cache slot of each new token
    attend: str  # "cache" | "local"
    seqlens_B: torch.Tensor | None = None  # int32, valid keys per row after the write
    key_mask_BSk: torch.Tensor | None = None  # bool (B, Smax), True = a real token (left padding)
    end: int | None = None  # shared-index mode: slots written after this forward
    index_BHSD: torch.Tensor | None = None  # index_BS expanded for the scatter (set on first use)

    @classmethod
    def covering(cls, cache: "KVCache", rows: int, index_BS: torch.Tensor, **kw) -> "CacheStep":
        """A step over cache rows [0, rows): `rows=None` when that is the whole cache (no
        slicing in every layer), and the scatter index expanded once for all layers."""
        B, S = index_BS.shape
        index = index_BS[:, None, :, None].expand(B, cache.n_kv_heads, S, cache.head_dim)
        return cls(rows=None if rows == cache.batch else slice(0, rows), index_BS=index_BS,
                   index_BHSD=index, **kw)


class LayerKV:
    """One layer's view of the cache: k, v (B, Hkv, Smax, Dh)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def write(self, step: CacheStep, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor):
        """Scatter the new keys/values into their slots; return this forward's rows of the
        cache (views, no copy)."""
        k_rows, v_rows = (self.k, self.v) if step.rows is None else (self.k[step.rows],
                                                                     self.v[step.rows])
        index = step.index_BHSD
        if index is None:
            B, H, S, Dh = k_BHSD.shape
            index = step.index_BS[:, None, :, None].expand(B, H, S, Dh)
        k_rows.scatter_(2, index, k_BHSD.to(k_rows.dtype))
        v_rows.scatter_(2, index, v_BHSD.to(v_rows.dtype))
        return k_rows, v_rows


class KVCache:
    def __init__(self, *, n_layers: int, batch: int, n_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # (L, B, Hkv, Smax, Dh)
        # Refused before allocating when it cannot fit: max_len comes from the request
        # (prompt + max_new_tokens), bounded only by the model's positions (up to 2**24).
        need = 2 * math.prod(shape) * dtype.itemsize + batch * max_len
        check_allocation(need, device, dtype,
                         f"a KV cache of {batch} x {max_len} positions ({n_layers} layers)")
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # shared-index mode: slots written so far
        self.batch, self.max_len = batch, max_len
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.layers = [LayerKV(self.k[i], self.v[i]) for i in range(n_layers)]

    def layer(self, i: int) -> LayerKV:
        return self.layers[i]

    # ------------------------------------------------------------- shared-index mode

    def shared_step(self, attention_mask_BS: torch.Tensor) -> CacheStep:
        """The step of a forward that appends S tokens (B, S) to every row at `length`."""
        B, S = attention_mask_BS.shape
        start, end = self.length, self.length + S
        if end > self.max_len:
            raise UsageError(f"KV cache full: {end} tokens needed, {self.max_len} allocated")
        if B > self.batch:
            raise UsageError(f"KV cache has {self.batch} rows, the batch has {B}")
        self.key_mask[:B, start:end] = attention_mask_BS.to(torch.bool)
        device = self.k.device
        index_BS = torch.arange(start, end, device=device).expand(B, S)
        seqlens_B = torch.full((B,), end, dtype=torch.int32, device=device)
        attend = "local" if start == 0 else "cache"
        return CacheStep(rows=slice(0, B), index_BS=index_BS, attend=attend, seqlens_B=seqlens_B,
                         key_mask_BSk=self.key_mask[:B], end=end)

    def commit(self, step: CacheStep) -> None:
        if step.end is not None:
            self.length = step.end
