"""The reference MoE feed-forward `moe_ffn_ref` (contract in molmoe/ops/__init__.py): the released
per-expert loop for training, sync-free grouped GEMMs (`grouped_experts`) for inference. Plain
PyTorch; kernels/moe.py is checked against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def moe_ffn_ref(x, router_w, w_gate, w_up, w_down, top_k, renormalize=False):
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


def interleaved_layout(w_gate, w_up) -> bool:
    """Whether w_gate / w_up have the shapes, strides and offsets of the even / odd rows of one
    (E, 2F, D) buffer: metadata only, so it also answers for the fake tensors torch.compile
    traces with (`interleaved_view` checks the storage too)."""
    E, F_, D = w_gate.shape
    return (w_up.shape == w_gate.shape and w_up.dtype == w_gate.dtype
            and w_up.device == w_gate.device
            and w_gate.stride() == (2 * F_ * D, 2 * D, 1) and w_up.stride() == w_gate.stride()
            and w_up.storage_offset() == w_gate.storage_offset() + D)


def interleaved_view(w_gate, w_up):
    """w_gu (E, 2F, D) without a copy when w_gate / w_up are the even / odd rows of one such
    buffer (what `MoEFFN.interleave_` makes of a model's weights), else None. Real tensors only
    (it compares storages)."""
    if not interleaved_layout(w_gate, w_up):
        return None
    if w_gate.untyped_storage().data_ptr() != w_up.untyped_storage().data_ptr():
        return None
    E, F_, D = w_gate.shape
    return w_gate.as_strided((E, 2 * F_, D), (2 * F_ * D, D, 1))
