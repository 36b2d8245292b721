"""Baselines for the MoE benchmark: a `torch._grouped_mm` MoE layer and megablocks' dMoE.

Both compute the op of `molmoe.ops.moe_ffn_ref` (the `moe_ffn` contract):

    x_TD, router_w_ED, w_gate_EFD, w_up_EFD, w_down_EDF, top_k -> y_TD
    y = sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)), e = the k-th expert of the token

Legend: T tokens, D model width, F expert width, E experts, K top-k, N = T*K token-expert slots.

`grouped_mm_moe_ffn` is a library-free MoE of the kind one writes with stock PyTorch:
  router (fp32 softmax, top-k, as the reference) -> stable sort of the N slots by expert ->
  gather the rows -> torch._grouped_mm for gate and up -> silu(gate) * up -> torch._grouped_mm for
  down -> unsort and a weighted sum over the K slots of each token.
`torch._grouped_mm(a_ND, b_EDF, offs=offs_E)` (torch 2.13; a private op, so pinned here): a 2-D
`a` against a 3-D `b`; group g is rows offs[g-1]:offs[g] of `a` times b[g]; `offs` is int32, the
cumulative END offsets (length E, empty groups repeat the previous value, offs[-1] = N). On CUDA:
bf16 only (the check in torch's meta registration), every stride but the unit one a multiple of
16 bytes (bf16: D and F multiples of 8; MolmoE's 2048 and 1024 are), autograd for both operands.
On the CPU it runs too (fp32, fp16, bf16, with autograd, and the same 16-byte stride rule: fp32
widths must be multiples of 4; tests/test_moe_baselines.py checks it against the reference).
Rows past offs[-1] are left unwritten, hence offs[-1] = N always.
`grouped_mm_loop` is the same contract as a plain loop over groups, for torch builds without the
op and as the test's independent check of the offsets convention.

`megablocks_dmoe` builds megablocks' dropless MoE (`megablocks.layers.dmoe.dMoE`, GLU experts,
grouped GEMMs) holding the SAME weights. Its layout (megablocks/layers/glu.py, arguments.py):
router `router.layer.weight` (E, D); experts `experts.mlp.w1` (gate) and `v1` (up) are (E*F, D),
`w2` (down) is (E*F, D) = w_down_EDF transposed per expert; the GLU is act(x w1^T) * (x v1^T).
Its router takes the softmax in the model dtype (bf16), not in fp32, so near-ties in the top-k
may route differently from the reference; the benchmark's correctness check uses tokens whose
top-k is unambiguous. megablocks needs CUDA and the `grouped_gemm` extension; import errors are
passed on to the caller, which leaves megablocks out and says why.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def grouped_mm_loop(a_ND: torch.Tensor, b_EKM: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(a, b, offs=offs)` for 2-D a and 3-D b, as a loop over the groups (any
    widths; reads offs on the host, so it synchronises on CUDA)."""
    offs_E = offs
    if offs_E.dtype != torch.int32 or offs_E.dim() != 1 or offs_E.shape[0] != b_EKM.shape[0]:
        raise ValueError(f"offs must be int32 of shape ({b_EKM.shape[0]},), got "
                         f"{offs_E.dtype} {tuple(offs_E.shape)}")
    out = a_ND.new_zeros(a_ND.shape[0], b_EKM.shape[-1])
    ends = offs_E.tolist()
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            out[start:end] = a_ND[start:end] @ b_EKM[g]
        start = end
    return out


def default_grouped_mm() -> Callable:
    """torch._grouped_mm where this torch has it, else the loop (same contract, slow)."""
    return getattr(torch, "_grouped_mm", None) or grouped_mm_loop


def route(x_TD, router_w_ED, top_k, renormalize=False):
    """The reference's router: logits in the model dtype, fp32 softmax, top-k (ties to the lower
    index, torch.topk), optional renormalisation, weights cast to the model dtype."""
    logits_TE = F.linear(x_TD, router_w_ED)
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    topk_w_TK, topk_idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        topk_w_TK = topk_w_TK / topk_w_TK.sum(dim=-1, keepdim=True)
    return logits_TE, topk_w_TK.to(x_TD.dtype), topk_idx_TK


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int):
    """Slots sorted by expert: (order_N, token_N, counts_E, offs_E).

    order_N[i] is the flat slot (t*K + k) at sorted position i; the sort is stable, so within an
    expert tokens keep their order (deterministic). counts come from a scatter-add rather than
    torch.bincount, which synchronises with the host on CUDA.
    """
    K = topk_idx_TK.shape[1]
    flat_N = topk_idx_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    token_N = order_N // K
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=flat_N.device)
    counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N, dtype=torch.int32))
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)  # cumulative END offsets
    return order_N, token_N, counts_E, offs_E


def grouped_mm_moe_ffn(x_TD, router_w_ED, w_gate_EFD, w_up_EFD, w_down_EDF, top_k,
                       renormalize=False, *, gmm: Callable | None = None):
    """The `moe_ffn` contract with sort + grouped GEMMs; `gmm` defaults to torch._grouped_mm."""
    gmm = gmm or default_grouped_mm()
    T, D = x_TD.shape
    E = router_w_ED.shape[0]
    logits_TE, topk_w_TK, topk_idx_TK = route(x_TD, router_w_ED, top_k, renormalize)
    order_N, token_N, counts_E, offs_E = sort_by_expert(topk_idx_TK, E)
    xs_ND = x_TD[token_N]  # rows grouped by expert
    # b operands as (E, D, F) / (E, F, D) views: transposes of the loader's layout, no copies.
    gate_NF = gmm(xs_ND, w_gate_EFD.transpose(-2, -1), offs=offs_E)
    up_NF = gmm(xs_ND, w_up_EFD.transpose(-2, -1), offs=offs_E)
    h_NF = F.silu(gate_NF) * up_NF
    out_ND = gmm(h_NF, w_down_EDF.transpose(-2, -1), offs=offs_E)
    # Unsort to slot order (t, k), weight, and sum the K contributions of each token: a
    # deterministic reduction (fp32 accumulation inside torch.sum), no atomics.
    slots_ND = torch.empty_like(out_ND).index_copy_(0, order_N, out_ND)
    y_TD = (slots_ND.view(T, top_k, D) * topk_w_TK[..., None]).sum(dim=1)
    return y_TD, {"counts": counts_E, "router_logits": logits_TE, "topk_idx": topk_idx_TK}


def megablocks_dmoe(router_w_ED, w_gate_EFD, w_up_EFD, w_down_EDF, top_k):
    """megablocks' dMoE with copies of these weights; returns (module, fn) with fn(x_TD) -> y_TD.

    Raises ImportError (or megablocks' own assertion) when megablocks or grouped_gemm is missing.
    """
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    E, Fdim, D = w_gate_EFD.shape
    dtype = w_gate_EFD.dtype
    args = Arguments(
        hidden_size=D, ffn_hidden_size=Fdim, moe_num_experts=E, moe_top_k=top_k,
        mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu,
        bias=False, return_bias=False,
        moe_normalize_expert_weights=None,  # MolmoE: no renormalisation
        moe_loss_weight=0.0,  # no load-balancing loss bookkeeping inside the timed region
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
        device=w_gate_EFD.device,
    )
    layer = dMoE(args)
    with torch.no_grad():
        layer.router.layer.weight.copy_(router_w_ED)
        layer.experts.mlp.w1.copy_(w_gate_EFD.reshape(E * Fdim, D))
        layer.experts.mlp.v1.copy_(w_up_EFD.reshape(E * Fdim, D))
        layer.experts.mlp.w2.copy_(w_down_EDF.transpose(1, 2).reshape(E * Fdim, D))

    def fn(x_TD):
        out = layer(x_TD.view(x_TD.shape[0], 1, D))  # megablocks wants (seq, batch, hidden)
        out = out[0] if isinstance(out, tuple) else out
        return out.view(x_TD.shape[0], D)

    return layer, fn


def megablocks_grads_in_our_layout(layer, E, Fdim, D):
    """megablocks' parameter gradients mapped back to (router_w, w_gate, w_up, w_down) layout."""
    mlp = layer.experts.mlp
    return {
        "router_w": layer.router.layer.weight,
        "w_gate": mlp.w1, "w_up": mlp.v1, "w_down": mlp.w2,
    }, {
        "w_gate": lambda g: g.view(E, Fdim, D),
        "w_up": lambda g: g.view(E, Fdim, D),
        "w_down": lambda g: g.view(E, Fdim, D).transpose(1, 2),
        "router_w": lambda g: g,
    }
