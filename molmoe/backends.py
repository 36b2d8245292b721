"""The single switch between the readable reference and the Triton fast path.

Model modules never import kernels. Each asks `ops_for(backend)` for the few hot operations
(attention, MoE feed-forward, patch pooling) and calls them; the state-dict layout is the same for
both backends. The reference implementations here follow the official numerics (spec §3, §7);
the Triton ones live in `molmoe.kernels` and are imported only when asked for.

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

import enum
import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from molmoe.errors import UsageError


class Backend(str, enum.Enum):
    REFERENCE = "reference"
    TRITON = "triton"

    @classmethod
    def parse(cls, value: "str | Backend") -> "Backend":
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(b.value) for b in cls)
            raise UsageError(f"unknown backend {value!r}; supported: {names}") from None


def resolve_device(device: "str | torch.device | None" = None, *,
                   allow_meta: bool = False) -> torch.device:
    """The device to run on, checked against this machine: None -> CUDA when available, else the
    CPU. Only the CPU and existing CUDA devices run (the ops are written for them); "meta" only
    with `allow_meta` (`molmoe.load(device="meta")`: shapes without data, nothing runs)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu" or (allow_meta and dev.type == "meta"):
        return dev
    if dev.type != "cuda":
        raise UsageError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU found"
        raise UsageError(f"device {device!r}: CUDA is not available ({why}); use device 'cpu'")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise UsageError(f"device {device!r}: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return dev


def select_backend(backend: "str | Backend", device: "str | torch.device | None", *,
                   allow_meta: bool = False) -> tuple[Backend, torch.device]:
    """(backend, device) after checking that the backend can run there: Triton kernels launch on
    CUDA devices, or anywhere under its CPU interpreter (TRITON_INTERPRET=1, slow, for tests)."""
    from molmoe.kernels._common import interpreter_enabled  # plain Python, no Triton import

    backend, dev = Backend.parse(backend), resolve_device(device, allow_meta=allow_meta)
    if backend is Backend.TRITON:
        if importlib.util.find_spec("triton") is None:
            raise UsageError("backend 'triton' needs the triton package (pip install triton); "
                             "or use backend 'reference'")
        if dev.type != "cuda" and not interpreter_enabled():
            raise UsageError(f"backend 'triton' needs a CUDA device, not {str(dev)!r}; use backend "
                             f"'reference', or set TRITON_INTERPRET=1 for Triton's (slow) CPU "
                             f"interpreter")
    return backend, dev


@dataclass(frozen=True)
class Ops:
    attention: Callable
    moe_ffn: Callable
    patch_pool: Callable
    apply_rope: Callable
    decode_attention: Callable


# ----------------------------------------------------------------------------- reference ops


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


def reference_attention(q, k, v, *, causal, image_block_ids=None, key_padding_mask=None,
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


def reference_decode_attention(q, k_cache, v_cache, *, cache_seqlens=None, key_padding_mask=None,
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


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def reference_moe_ffn(x, router_w, w_gate, w_up, w_down, top_k, renormalize=False):
    """MolmoE's MoE (spec §3.5 steps 13'-16') in plain PyTorch, with two expert paths:

    * inference (no gradient needed): every assignment sorted by expert and run through
      `F.grouped_mm` -- one grouped GEMM per projection, static shapes, no host sync, so a
      decode step holding it can be compiled or captured; each selected expert's weights are
      read in place (no gather copy). Each token's K rows are weighted and summed (the released
      loop adds them in increasing expert order instead), so results agree to rounding.
    * training (a gradient is needed): the released per-expert loop (`torch.where` per expert:
      data-dependent, host-synchronising), plus the two router losses.
    """
    T, D = x.shape
    E = router_w.shape[0]
    router_logits = F.linear(x, router_w)  # (T, E), model dtype
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    topk_w, topk_idx = torch.topk(probs, top_k, dim=-1)  # (T, K)
    if renormalize:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    topk_w = topk_w.to(x.dtype)
    # Assignments per expert without bincount (whose output size is data-dependent: a sync).
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
        0, topk_idx.reshape(-1), torch.ones_like(topk_idx.reshape(-1)))
    aux = {"counts": counts, "router_logits": router_logits, "topk_idx": topk_idx,
           "topk_weights": topk_w, "lb_loss": None, "z_loss": None}
    training = _needs_grad(x, router_w, w_gate, w_up, w_down)
    if training or not _grouped_mm_ok(x):
        y = _experts_loop(x, w_gate, w_up, w_down, topk_w, topk_idx)
    else:
        y = _experts_grouped(x, w_gate, w_up, w_down, topk_w, topk_idx, counts)
    if not training:
        return y, aux
    # Training losses as Switch Transformer / OLMoE / megablocks define them: load balancing
    # E * sum_e f_e P_e (f_e = share of the T*K assignments on e, no gradient; P_e = mean router
    # probability) and the ST-MoE z-loss mean_t logsumexp(logits_t)^2. Both 0 when T = 0.
    f = counts.to(torch.float32) / max(T * top_k, 1)
    aux["lb_loss"] = E * (f * probs.sum(0) / max(T, 1)).sum()
    aux["z_loss"] = torch.logsumexp(router_logits.float(), dim=-1).square().sum() / max(T, 1)
    return y, aux


def _grouped_mm_ok(x) -> bool:
    """`F.grouped_mm` runs on the CPU in any float dtype; on CUDA its kernels take bf16 only."""
    return x.shape[0] > 0 and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def _experts_loop(x, w_gate, w_up, w_down, topk_w, topk_idx):
    """The released code's loop: experts in increasing index order, index_add_ per expert.

    The stacked weights are split once with `unbind`, not indexed `w[e]` per expert: the
    backward of each `w[e]` (select) allocates and zero-fills a whole (E, F, D) gradient and
    autograd adds them up, 3 * E full-size tensors per layer (at MolmoE's width 192 x 512 MiB
    of memset and adds per layer and step, found by `molmoe profile train`); unbind's backward
    stacks the E slices once. The values are the same."""
    y = torch.zeros_like(x)
    gates, ups, downs = w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)
    for e in range(w_gate.shape[0]):
        token_idx, slot = torch.where(topk_idx == e)
        if token_idx.numel() == 0:
            continue
        h = x[token_idx]
        h = F.linear(F.silu(F.linear(h, gates[e])) * F.linear(h, ups[e]), downs[e])
        y.index_add_(0, token_idx, (h * topk_w[token_idx, slot, None]).to(x.dtype))
    return y


# Up to this many tokens the grouped experts combine by unsorting and summing (fewest ops: the
# decode step); above it by one index_add_ over the sorted rows (least memory traffic: prefill).
UNSORT_MAX_TOKENS = 64


def grouped_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                     w_down: torch.Tensor, topk_w: torch.Tensor, topk_idx: torch.Tensor,
                     counts: torch.Tensor) -> torch.Tensor:
    """Sync-free experts: assignments a = t*K + k sorted (stably) by expert, one grouped GEMM
    per projection over the N = T*K sorted rows (group e = rows of expert e).

    A custom op, opaque to torch.compile: `F.grouped_mm`'s compile-time shape rules are those
    of its CUDA kernels (bf16 only), while its CPU kernel runs any float dtype."""
    T, K = topk_idx.shape
    order_N = torch.argsort(topk_idx.view(-1), stable=True)
    offs_E = torch.cumsum(counts, 0, dtype=torch.int32)  # end of each expert's rows
    token_N = order_N // K
    x_N = x[token_N]
    gate = F.grouped_mm(x_N, w_gate.transpose(1, 2), offs=offs_E)
    up = F.grouped_mm(x_N, w_up.transpose(1, 2), offs=offs_E)
    h_N = F.grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs_E)
    if T <= UNSORT_MAX_TOKENS:  # decode sizes: back to assignment order, weighted K-row sums
        h_TKD = torch.empty_like(h_N).index_put_((order_N,), h_N).view(T, K, -1)
        return (h_TKD * topk_w.unsqueeze(-1)).sum(1).to(x.dtype)
    # prefill sizes: weight the sorted rows and add them into their tokens (one pass over h)
    h_N = (h_N * topk_w.view(-1)[order_N, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_N, h_N)


_experts_grouped = torch.library.custom_op("molmoe::grouped_experts", mutates_args=())(
    grouped_experts)


@_experts_grouped.register_fake
def _(x, w_gate, w_up, w_down, topk_w, topk_idx, counts):
    return torch.empty_like(x)


# Custom ops whose body is plain PyTorch, by qualified name: op counters count their body's
# ops (molmoe.profiling.OpCounter), so wrapping code in an op never hides work.
TRANSPARENT_OPS = {"molmoe::grouped_experts": grouped_experts}


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_apply_rope(q, k, cos, sin):
    # q and k rotated as one tensor (heads side by side): the same arithmetic per element, in
    # half the ops (this runs in every layer of every decode step).
    qk = torch.cat([q, k], dim=1).float()  # (B, Hq + Hkv, S, Dh)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    q_rot, k_rot = (qk * cos + rotate_half(qk) * sin).split([q.shape[1], k.shape[1]], dim=1)
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


def pad_masks(image_masks, dtype):
    """(all_pad, partial) indicators of the processor mask (spec §3.2: -1 counts as partial)."""
    all_pad = image_masks == 0
    partial = (image_masks < 1) & ~all_pad
    return all_pad.to(dtype), partial.to(dtype)


def reference_patch_pool(feats, image_masks, pad_embed, wq, bq, wk, bk, wv, bv, wo, bo,
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


REFERENCE_OPS = Ops(
    attention=reference_attention,
    moe_ffn=reference_moe_ffn,
    patch_pool=reference_patch_pool,
    apply_rope=reference_apply_rope,
    decode_attention=reference_decode_attention,
)


@functools.lru_cache(maxsize=None)
def _triton_ops() -> Ops:
    from molmoe.kernels.attention import attention
    from molmoe.kernels.decode_attention import decode_attention
    from molmoe.kernels.moe import moe_ffn
    from molmoe.kernels.patch_pool import patch_pool
    from molmoe.kernels.rope import apply_rope

    return Ops(attention=attention, moe_ffn=moe_ffn, patch_pool=patch_pool, apply_rope=apply_rope,
               decode_attention=decode_attention)


def ops_for(backend: "str | Backend") -> Ops:
    backend = Backend.parse(backend)
    return REFERENCE_OPS if backend is Backend.REFERENCE else _triton_ops()
