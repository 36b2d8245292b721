"""A static KV cache: preallocated per-layer buffers, filled left to right.

All sequences of a batch share the slot index (the engine left-pads prompts), so one integer
`length` says how many slots are written; `key_mask` marks which written slots are real tokens.
Keys are stored after RoPE (spec §3.5 step 7).
"""
from __future__ import annotations

import math

import torch

from molmoe.config import check_allocation
from molmoe.errors import UsageError


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
        self.length = 0
        self.max_len = max_len

    def reserve(self, attention_mask: torch.Tensor) -> tuple[int, int]:
        """Claim slots for S new tokens (B, S); returns (start, end) of the slots."""
        start, end = self.length, self.length + attention_mask.shape[1]
        if end > self.max_len:
            raise UsageError(f"KV cache full: {end} tokens needed, {self.max_len} allocated")
        self.key_mask[:, start:end] = attention_mask.to(torch.bool)
        return start, end

    def commit(self, end: int) -> None:
        self.length = end

    def update(self, layer: int, start: int, end: int, k, v):
        """Write k, v (B, Hkv, S, Dh) into the slots; return all keys/values so far."""
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
