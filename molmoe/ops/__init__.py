"""The op contracts and their plain-PyTorch references, in one place: the model
(molmoe/model/), the backend switch (molmoe/backends.py, which only chooses) and the Triton
kernels (kernels/<op>.py, whose `<op>_ref` IS the function here) all import them from this
package. Nothing here imports a kernel or the switch.

Op contracts (both backends):

attention(q, k, v, *, causal=True, image_block_ids=None, key_padding_mask=None, cu_seqlens=None,
          scale=None) -> o
    q: (B, Hq, Sq, Dh); k, v: (B, Hkv, Sk, Dh), Hq % Hkv == 0 (GQA: kv head j serves q heads
    [j*g, (j+1)*g)); Sq <= Sk. `causal` is aligned bottom-right: query i sits at key position
    Sk - Sq + i (prefill: Sq == Sk; chunked prefill / decode against a KV cache: Sq < Sk).
    The masks combine as allowed(i, j) = (causal(i, j) OR same_image(i, j)) AND same_seq(i, j)
    AND key_padding_mask[j]:
      image_block_ids: (B, Sk) int over KEY positions (query i reads entry Sk - Sq + i); -1 for
        text, >= 0 for image tokens; same_image(i, j) = block[i] == block[j] >= 0, so the tokens
        of one image attend to each other in both directions (Molmo 2; transformers
        `masking_utils.blockwise_overlay`, OR-ed onto the causal mask). Only matters if causal.
      cu_seqlens: (N+1,) int cumulative lengths of packed sequences (then B == 1 and
        Sq == Sk == cu_seqlens[-1]); no attention across sequences.
      key_padding_mask: (B, Sk) bool, True = attend.
    A query row with no key to attend gets zeros (and zero gradients). Returns (B, Hq, Sq, Dh)
    in q's dtype.

decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, key_padding_mask=None, scale=None) -> o
    A few new tokens per sequence against a KV cache that already holds them. q: (B, Hq, Sq, Dh),
    Sq small (1..~8); k_cache, v_cache: (B, Hkv, Sk, Dh) (GQA as above). cache_seqlens: (B,) int32,
    slots written per sequence (default Sk for all); query i of sequence b sits at key position
    cache_seqlens[b] - Sq + i and attends keys j <= that position (causal, bottom-right aligned per
    sequence). key_padding_mask: (B, Sk) bool, True = attend (left padding). Rows with no key get
    zeros. Returns (B, Hq, Sq, Dh) in q's dtype. Forward only (inference).

moe_ffn(x, router_w, w_gate, w_up, w_down, top_k, renormalize=False) -> (y, aux)
    x: (T, D); router_w: (E, D); w_gate, w_up: (E, F, D); w_down: (E, D, F). fp32 softmax over E,
    top-k (ties to the lower index), optional renormalisation, y = sum_k w_k * expert(x).
    aux: dict with at least "counts" (E,) int; both backends also give "router_logits",
    "topk_idx", "topk_weights" and the training losses "lb_loss" (E * sum_e f_e P_e) and
    "z_loss" (mean_t logsumexp^2), differentiable w.r.t. router_w and x (the Triton decode path,
    inference on <= 8 tokens, leaves the two losses None). Exact ties between router
    probabilities: the Triton router takes the lower expert index; torch.topk promises no order
    (on the CPU it takes the higher one), so the two may pick different experts there.

apply_rope(q, k, cos, sin) -> (q, k)
    q: (B, Hq, S, Dh), k: (B, Hkv, S, Dh), cos/sin: (B, S, Dh) fp32 tables. Rotate-half RoPE in
    fp32 (x*cos + rotate_half(x)*sin, rotate_half([x1, x2]) = [-x2, x1]), cast back to the input
    dtype (spec §3.5 step 6).

patch_pool(feats, image_masks, pad_embed, wq, bq, wk, bk, wv, bv, wo, bo, num_heads,
           cast_back) -> y
    feats: (N, P, C) patch features of N crops on a square g x g grid (P = g*g, g even), CLS
    dropped; image_masks: (N, P) processor mask values or None; pad_embed: (2, C). First the pad
    embeddings (spec §3.2): f += pad_embed[0]*(m == 0) + pad_embed[1]*(m < 1 and m != 0), so -1
    counts as partial; `cast_back` (MolmoE) casts f back to its pre-add dtype (§7.1). Then the
    2x2 pooling (§3.3): cell t = (g/2)*i + j has members (2i, 2j), (2i, 2j+1), (2i+1, 2j),
    (2i+1, 2j+1); query = mean of the 4; q = query Wq^T + bq, k/v from the 4 members; softmax
    over 4 keys per head (scale 1/sqrt(head_dim), q/k/v in fp32), heads concatenated,
    out = o Wo^T + bo: (N, (g/2)^2, E).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from molmoe.ops.attention import attention_allowed_mask, attention_ref, decode_attention_ref
from molmoe.ops.moe import TRANSPARENT_OPS, grouped_experts, moe_ffn_ref
from molmoe.ops.patch_pool import pad_masks, patch_pool_ref
from molmoe.ops.rope import apply_rope_ref, rotate_half

__all__ = ["Ops", "REFERENCE_OPS", "attention_ref", "decode_attention_ref", "moe_ffn_ref",
           "apply_rope_ref", "patch_pool_ref", "attention_allowed_mask", "grouped_experts",
           "TRANSPARENT_OPS", "pad_masks", "rotate_half"]


@dataclass(frozen=True)
class Ops:
    """The hot operations a model calls, one implementation each (`REFERENCE_OPS` here; the
    Triton set from `molmoe.backends.ops_for("triton")`)."""
    attention: Callable
    moe_ffn: Callable
    patch_pool: Callable
    apply_rope: Callable
    decode_attention: Callable


REFERENCE_OPS = Ops(
    attention=attention_ref,
    moe_ffn=moe_ffn_ref,
    patch_pool=patch_pool_ref,
    apply_rope=apply_rope_ref,
    decode_attention=decode_attention_ref,
)
