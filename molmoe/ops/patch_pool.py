"""The reference 2x2 attention pooling `patch_pool_ref` with pad embeddings (contract in
molmoe/ops/__init__.py; spec §3.2, §3.3)."""
from __future__ import annotations

import math

import torch.nn.functional as F

from molmoe.errors import UsageError


def pad_masks(image_masks, dtype):
    """(all_pad, partial) indicators of the processor mask (spec §3.2: -1 counts as partial)."""
    all_pad = image_masks == 0
    partial = (image_masks < 1) & ~all_pad
    return all_pad.to(dtype), partial.to(dtype)


def patch_pool_ref(feats, image_masks, pad_embed, wq, bq, wk, bk, wv, bv, wo, bo,
                         num_heads, cast_back):
    N, P, C = feats.shape
    g = math.isqrt(P)
    if g * g != P or g % 2:
        raise UsageError(f"patch_pool: {P} patches per crop is not an even square grid")
    if image_masks is not None:
        all_pad, partial = pad_masks(image_masks, feats.dtype)
        added = feats + pad_embed[0] * all_pad[..., None] + pad_embed[1] * partial[..., None]
        feats = added.to(feats.dtype) if cast_back else added
    # (N, g/2, 2, g/2, 2, C) -> (M, 4, C): the 4 members of each cell, cells row-major
    x = feats.reshape(N, g // 2, 2, g // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, C)
    M = x.shape[0]
    query = x.mean(dim=1, keepdim=True)  # (M, 1, C)
    q = F.linear(query, wq, bq)
    k = F.linear(x, wk, bk)
    v = F.linear(x, wv, bv)
    head_dim = q.shape[-1] // num_heads
    # (M, H, S, hd); float32_attention: q, k, v in fp32, output cast back (spec §7.7)
    q, k, v = (t.reshape(M, -1, num_heads, head_dim).transpose(1, 2).float() for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
    o = o.to(x.dtype).transpose(1, 2).reshape(M, num_heads * head_dim)
    return F.linear(o, wo, bo).reshape(N, (g // 2) ** 2, -1)
