"""The reference rotate-half RoPE `apply_rope_ref` (contract in molmoe/ops/__init__.py)."""
from __future__ import annotations

import torch


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(q, k, cos, sin):
    # q and k rotated as one tensor (heads side by side): the same arithmetic per element, in
    # half the ops (this runs in every layer of every decode step).
    qk = torch.cat([q, k], dim=1).float()  # (B, Hq + Hkv, S, Dh)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    q_rot, k_rot = (qk * cos + rotate_half(qk) * sin).split([q.shape[1], k.shape[1]], dim=1)
    return q_rot.to(q.dtype), k_rot.to(k.dtype)
