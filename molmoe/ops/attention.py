"""The reference attention ops (contracts in molmoe/ops/__init__.py): prefill / training
`attention_ref` (SDPA with the explicit mask of the contract, `attention_allowed_mask`) and
`decode_attention_ref` against a KV cache. Plain PyTorch; the Triton kernels
(kernels/attention.py, kernels/decode_attention.py) are checked against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_allowed_mask(Sq, Sk, *, causal, image_block_ids=None, key_padding_mask=None,
                           cu_seqlens=None, batch=1, device=None):
    """The (B, Sq, Sk) bool mask of the `attention` contract: which key each query may attend."""
    off = Sk - Sq  # query i sits at key position off + i (bottom-right alignment)
    q_pos = torch.arange(Sq, device=device) + off
    k_pos = torch.arange(Sk, device=device)
    if causal:
        allowed = (k_pos[None, :] <= q_pos[:, None])[None].expand(batch, Sq, Sk)
    else:
        allowed = torch.ones(batch, Sq, Sk, dtype=torch.bool, device=device)
    if causal and image_block_ids is not None:
        # Tokens of one image see each other in both directions (Molmo 2, transformers
        # `blockwise_overlay`: OR-ed onto the causal mask before the padding / sequence ANDs).
        blk_k = image_block_ids.to(device=device, dtype=torch.long)  # (B, Sk)
        blk_q = blk_k[:, off:]  # (B, Sq)
        allowed = allowed | ((blk_q[:, :, None] == blk_k[:, None, :]) & (blk_q[:, :, None] >= 0))
    if cu_seqlens is not None:
        seq_of = torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.long)[1:], k_pos,
                                    right=True)  # (Sk,) index of each token's sequence
        allowed = allowed & (seq_of[off:, None] == seq_of[None, :])[None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :].to(device=device, dtype=torch.bool)
    return allowed


def attention_ref(q, k, v, *, causal, image_block_ids=None, key_padding_mask=None,
                        cu_seqlens=None, scale=None, upcast=False):
    """`attention` in plain PyTorch (SDPA with the explicit mask); `upcast` computes in fp32."""
    B, Hq, Sq, Dh = q.shape
    Sk = k.shape[2]
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    # GQA (kv head j serves query heads [j*g, (j+1)*g)) without copying K/V: SDPA's enable_gqa.
    gqa = Hq != k.shape[1]
    if key_padding_mask is None and cu_seqlens is None and (
            not causal or (Sq == Sk and image_block_ids is None)):
        # No mask to build: plain or causal SDPA (a causal kernel skips the masked blocks).
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa).to(out_dtype)
    allowed = attention_allowed_mask(Sq, Sk, causal=causal, image_block_ids=image_block_ids,
                                     key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                     batch=B, device=q.device)[:, None]  # (B, 1, Sq, Sk)
    # A row with nothing to attend (a left-padding query) would be NaN; give it zeros instead.
    empty_row = ~allowed.any(dim=-1, keepdim=True)  # (B, 1, Sq, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty_row, scale=scale,
                                       enable_gqa=gqa)
    return o.masked_fill(empty_row, 0.0).to(out_dtype)


def decode_attention_ref(q, k_cache, v_cache, *, cache_seqlens=None, key_padding_mask=None,
                               scale=None, upcast=False):
    """`decode_attention` in plain PyTorch; `upcast` computes in fp32 and casts the result back."""
    B, Hq, Sq, Dh = q.shape
    Sk = k_cache.shape[2]
    dev = q.device
    if Sq == 1 and cache_seqlens is not None and key_padding_mask is None:
        # The decode step's case, in as few ops as it allows (it runs in every layer of every
        # step): the one query sees keys [0, length); an empty row is a zero length.
        allowed = (torch.arange(Sk, device=dev) < cache_seqlens.view(B, 1)).view(B, 1, 1, Sk)
        empty_row = (cache_seqlens == 0).view(B, 1, 1, 1)
    else:
        if cache_seqlens is None:
            lengths_B = torch.full((B,), Sk, dtype=torch.long, device=dev)
        else:
            lengths_B = cache_seqlens.to(device=dev, dtype=torch.long)
        # Query i of sequence b sits at key position lengths[b] - Sq + i (bottom-right aligned).
        q_pos_BS = lengths_B[:, None] - Sq + torch.arange(Sq, device=dev)[None, :]
        allowed = torch.arange(Sk, device=dev)[None, None, :] <= q_pos_BS[:, :, None]  # B Sq Sk
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, :].to(torch.bool)
        allowed = allowed[:, None]  # (B, 1, Sq, Sk), broadcast over heads
        empty_row = ~allowed.any(dim=-1, keepdim=True)  # no key to attend (padding query)
    out_dtype = q.dtype
    if upcast:
        q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    # GQA without copying K/V: SDPA maps query head h to kv head h // (Hq / Hkv). A row with
    # no key attends everything (no NaN) and is zeroed after.
    o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=allowed | empty_row,
                                       scale=scale, enable_gqa=Hq != k_cache.shape[1])
    return o.masked_fill(empty_row, 0.0).to(out_dtype)
