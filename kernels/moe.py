"""MolmoE's sparse mixture-of-experts feed-forward as Triton kernels, forward and backward.

What (spec §3.5 steps 12'-17'): for x (T, D), router_w (E, D), experts w_gate, w_up (E, F, D) and
w_down (E, D, F) -- the loader's stacked layout, contiguous --

    logits = x router_w^T                  (T, E), model dtype (the reference's F.linear)
    p = softmax(logits) in fp32;  (w, idx) = top-K of p, ties to the lower expert index
    w /= sum(w) if renormalize             (off for MolmoE)
    y[t] = sum_k w[t, k] * (silu(x[t] Wg[e]^T) * (x[t] Wu[e]^T)) Wd[e]^T,   e = idx[t, k]

`moe_ffn(...) -> (y, aux)`; aux: counts (E,) int64, router_logits, topk_idx, topk_weights and the
two training losses, per layer and unweighted, as megablocks (OLMoE's trainer) and Switch (K=1)
define them:
    lb_loss = E * sum_e f_e * P_e   f_e = counts_e / (T*K) (no gradient), P_e = mean_t p[t, e]
    z_loss  = mean_t logsumexp(logits[t])^2            (ST-MoE)
transformers' `load_balancing_loss_func` divides counts by T, not T*K: it is K * lb_loss.
Both are differentiable w.r.t. router_w (and x) through the router kernel's backward; the caller
scales and adds them to its loss. `moe_ffn_ref` (= molmoe.ops.moe_ffn_ref, the released
per-expert loop) has the same signature and aux.

How (kernels/moe_routing.py, kernels/moe_gemm.py; launch policy in kernels/moe_tuning.py):
  1. Router kernel: fp32 softmax, top-K by K argmax passes, renormalisation; also writes p and lse
     for the losses. The router GEMM itself (T x D x E, <1% of the FLOPs) stays `F.linear` in the
     model dtype, so the logits -- and hence every expert choice -- are bit-identical to the
     reference's.
  2. Permutation (prefill/training): histogram per chunk, prefix sums, a stable scatter; the T*K
     assignments sorted by expert, each expert padded to BLOCK_M rows; gather and scatter indices
     and the expert of every row tile. Deterministic, no atomics, no host sync (static sizes).
  3. Grouped GEMMs over the sorted rows (x rows gathered in the GEMM, never copied): gate and up
     in one wide dot per step over the interleaved gate|up weight (below), split into gate and
     up in the epilogue, which applies silu(gate)*up;
     the down projection with the routing weight applied in its fp32 epilogue writes z per
     assignment; a combine kernel gathers each token's K rows and sums them in fp32 (slot order:
     deterministic, no atomics).
     Decode path (T <= DECODE_MAX_TOKENS, no gradient needed): no permutation; one program per
     (selected expert, column tile) covers every token that chose that expert, so each selected
     expert's weights are read once (see moe_gemm._tile_rows).
  4. Backward (grouped, same row tiles): g = dy Wd per row; d w = g . h (h = silu(gate)*up from
     the saved pre-activations; per-column-tile partials reduced in order), dh = w g through the
     silu-gate backward, all in one kernel's epilogue; dx rows = dgate Wg + dup Wu, then the same
     per-token combine; dW as grouped GEMMs over each expert's rows, cut into row segments of
     at most `dw_segment_rows` rows (one program per output tile per segment; an expert with
     more rows than a segment is summed from its segments' fp32 partials afterwards, in order:
     no atomics), the longest segments launched first; the router backward turns d w, d p
     (lb loss) and d lse (z loss) into d logits. Inputs that need no gradient (frozen experts)
     skip their kernels.
Where the ideas come from: the sort-pad-grouped-GEMM layout of vLLM's fused_moe
(moe_align_block_size), the separate gather/scatter of scattermoe and megablocks' dMoE (block
sparse, padded per expert), the losses of Switch Transformer (Fedus et al. 2021) and ST-MoE
(z-loss, Zoph et al. 2022) as OLMoE uses them. No code is copied from them.

Hopper: in fp16/bf16 the forward GEMMs (gate_up, down; grouped and decode) read the expert
weights -- and down its sorted h rows -- through tensor descriptors (`tl.make_tensor_descriptor`
over expert e's (F, D) / (D, F) slice: TMA bulk copies) where bases and row strides are 16-byte
aligned (`_use_tma`); gathered x rows stay pointer loads. gate_up reads one interleaved gate|up
weight w_gu (E, 2F, D), row 2f = w_gate[:, f], row 2f+1 = w_up[:, f] (`interleave_gate_up`):
each step is one dot of the x tile with a (2 BLOCK_N, BLOCK_K) weight tile, 128 x 256 at the
128-row default (wgmma n = 256), and the epilogue splits the accumulator's column pairs into
gate and up. Where it comes from: a model loaded with `molmoe.load` (or after
`Molmo.set_backend`) keeps w_gate and w_up as the even and odd rows of one (E, 2F, D) buffer
(`MoEFFN.interleave_`: the same Parameters and values, the state dict on disk unchanged), and
the kernel reads that buffer as it is (`molmoe.ops.moe.interleaved_view`: no copy, no extra
memory; the backward's dx reads the two halves with a row stride of 2D, fp32 from contiguous
copies since its tiles spilled there). Other callers pass two separate tensors (tests, a model
moved with `.to()` since, FSDP's unsharded parameters in training): the forward custom ops then
interleave them once per (w_gate, w_up) pair and weight version and keep the result
(`_gate_up_weight`: a cache keyed on the w_gate tensor's identity through a weak reference,
checked against w_up's identity, both tensors' in-place version counters and data pointers; an
optimizer step or a load re-interleaves, a freed weight drops its entry). That costs one more
(E, 2F, D) copy of the gate and up weights while they live (about 8 GiB for MolmoE-1B in bf16;
in FSDP training a copy per layer whose unsharded parameters stay allocated, rebuilt after each
all-gather writes them); a writer that bypasses the version counter (`w.data.copy_`) is not
seen.
In fp16/bf16 the grouped forward GEMMs (gate_up, down) run persistent: a fixed grid (SMs x the
blocks shared memory allows per SM; `persistent_programs`) strides over the real row tiles
only, their count read on the device from the permutation's last expert (no host sync), so no
program is launched for the padding tiles of the static bound; gate_up's programs then zero the
saved gate / up rows of those tiles (training). MOLMOE_MOE_PERSISTENT=0 launches one program
per tile instead (the fallback; same results bit for bit). Not yet: TMA in the backward
kernels, warp specialization.

Tiles: row tile BLOCK_M is shared by the permutation and the row-tiled kernels and picked from
the expected rows per expert (T*K/E); each kernel kind has its own (BLOCK_N, BLOCK_K, GROUP_M,
warps, stages) from `kernel_configs(kind)`, pruned by shared memory (`prune_configs`), tuned once
per (kind, dtype, D, F, BLOCK_M) by `autotune` (never on the launch path: CUDA-graph capture).
MOLMOE_MOE_CONFIG pins them, e.g. "BLOCK_M=64;gate_up:BLOCK_N=64,BLOCK_K=64,num_warps=4" (entries
split by ';', an optional "kind:" prefix, a bare entry applies to every kind). The interpreter
uses one small fixed config.

Legend: T tokens, D model dim, F expert hidden, E experts, K experts per token, N = T*K
assignments (a = t*K + k), R padded sorted rows (N + E*(BLOCK_M-1), whole tiles).

Limits: fp32/fp16/bf16, x and the expert weights of one dtype; contiguous weights (a copy is made
otherwise); E <= 1024 (one-hot rows in registers in the router/permutation). The dW kernels'
longest program loops over one segment (8 x the mean rows per expert at E = 64); an fp32
workspace of max(2, E/4) segments per weight is allocated whenever N is over one segment. The
decode path has no backward (a call that needs gradients takes the grouped path). Memory kept
for the backward: gate and up (R, F) in the model dtype.
The decode path returns lb_loss / z_loss as None (inference; `aux_losses` computes them).
Exact ties between router probabilities go to the lower expert index (a stable descending sort);
torch.topk promises no order among ties (CPU: higher index first), so the reference on the CPU
can pick another expert where two bf16 logits are equal at the K-th place.
Not yet run on a GPU: the kernels are verified in Triton's interpreter (fp32, fp16); the H100
defaults in moe_tuning.default_config are reasoned from tile sizes, not measured.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
import triton

from molmoe.ops import moe_ffn_ref
from molmoe.ops.moe import interleaved_layout, interleaved_view
from molmoe.kernels._common import (SMEM_LIMIT, check_launch_device, ensure_tma_allocator,
                                    on_interpreter, tma_ok)
from molmoe.kernels.moe_gemm import (_combine_kernel, _down_bwd_kernel, _down_kernel,
                                     _down_persistent_kernel, _dw_down_kernel,
                                     _dw_gate_up_kernel, _dw_reduce_kernel,
                                     _dw_split_reduce_kernel,
                                     _gate_up_bwd_dx_kernel, _gate_up_kernel,
                                     _gate_up_persistent_kernel)
from molmoe.kernels.moe_routing import padded_rows_bound, permute, route, route_backward
from molmoe.kernels.moe_tuning import (DECODE_MAX_TOKENS, KINDS, _smem_bytes, autotune,
                                       block_m_for, choose_path, default_config, kernel_configs,
                                       prune_configs)


__all__ = ["moe_ffn", "moe_ffn_ref", "route", "route_backward", "permute", "padded_rows_bound",
           "moe_experts", "aux_losses", "interleave_gate_up", "block_m_for", "choose_path",
           "kernel_configs", "prune_configs", "default_config", "autotune", "DECODE_MAX_TOKENS",
           "KINDS"]

_DECODE_BLOCK_M = 16  # tl.dot's smallest M


def _combine_tile(on_gpu: bool) -> dict:
    # (tokens, columns) per combine program: 4 x 256 keeps a GPU program at ~1K elements; the
    # interpreter prefers few programs.
    return dict(BLOCK_T=4, BLOCK_D=256) if on_gpu else dict(BLOCK_T=16, BLOCK_D=64)


# ----------------------------------------------------------------------------- launchers


def _launch_kw(cfg, swizzled=True):
    kw = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"])
    if swizzled:  # the dW kernels index (expert, tile) directly: no GROUP_M
        kw["GROUP_M"] = cfg["GROUP_M"]
    return kw


def interleave_gate_up(w_gate, w_up):
    """w_gu (E, 2F, D): row 2f = w_gate[:, f], row 2f+1 = w_up[:, f], contiguous. The layout
    the gate_up kernel reads (its reference: `w_gu.view(E, F, 2, D).unbind(2)` gives back
    (w_gate, w_up))."""
    E, F_, D = w_gate.shape
    return torch.stack((w_gate, w_up), dim=2).reshape(E, 2 * F_, D)


# id(w_gate) -> (weakref to w_gate, weakref to w_up, (versions, data pointers), w_gu). Keyed by
# id, checked by identity (a WeakKeyDictionary would compare tensors with ==); the entry goes
# when w_gate is freed.
_GATE_UP: dict = {}


def _weight_state(w_gate, w_up):
    try:
        return (w_gate._version, w_up._version, w_gate.data_ptr(), w_up.data_ptr())
    except RuntimeError:  # inference tensors track no version: not cached
        return None


def _drop_gate_up(key, ref):
    entry = _GATE_UP.get(key)
    if entry is not None and entry[0] is ref:
        del _GATE_UP[key]


def _gate_up_weight(w_gate, w_up):
    """The interleaved gate|up weight: a view when the weights already are (`interleaved_view`:
    a model loaded with `molmoe.load` or after `set_backend`), else `interleave_gate_up(w_gate,
    w_up)` built once per pair of weight tensors and kept while neither is written in place (see
    the header: where the layout is built and what it costs). Called inside the forward custom
    ops, so torch.compile never traces the cache."""
    view = interleaved_view(w_gate, w_up)
    if view is not None:
        return view
    state = _weight_state(w_gate, w_up)
    hit = _GATE_UP.get(id(w_gate)) if state is not None else None
    if hit is not None and hit[0]() is w_gate and hit[1]() is w_up and hit[2] == state:
        return hit[3]
    with torch.no_grad():
        w_gu = interleave_gate_up(w_gate.detach(), w_up.detach())
    if state is not None:
        key = id(w_gate)
        ref = weakref.ref(w_gate, lambda r, key=key: _drop_gate_up(key, r))
        _GATE_UP[key] = (ref, weakref.ref(w_up), state, w_gu)
    return w_gu


def _use_tma(w_gu, w_down, on_gpu) -> bool:
    """Weights (and the sorted h rows, whose row stride is w_down's) through tensor descriptors
    where their bases and row strides are 16-byte aligned (D and F multiples of 8 in bf16), in
    fp16/bf16. Not fp32: its IEEE dots run as FMAs (no wgmma to feed), and the transposed
    descriptor tiles spilled there on sm_90 (160..4536 B)."""
    tma = w_gu.dtype != torch.float32 and tma_ok(w_gu, w_down)
    if tma and on_gpu:
        ensure_tma_allocator()
    return tma


_PERSISTENT_ENV = "MOLMOE_MOE_PERSISTENT"
_INTERPRETER_PROGRAMS = 3  # few programs, several tiles each: the interpreter runs the loop


def persistent_programs(num_tiles: int, kind: str, cfg: dict, block_m: int, dtype,
                        device) -> int:
    """Programs of a persistent grouped GEMM launch (0: launch one per tile instead, the
    fallback, always taken in fp32; MOLMOE_MOE_PERSISTENT=0 forces it). `num_tiles`: the static
    bound on (row tile, column tile) pairs; the programs stride over the real ones, counted on
    the device. GPU: as many as fit at once, the SM count times the blocks per SM that shared
    memory allows."""
    if os.environ.get(_PERSISTENT_ENV, "1") == "0" or dtype == torch.float32:
        return 0  # fp32 (IEEE dots as FMAs, a correctness path): some kept tiles spilled
    if on_interpreter(device):
        return min(_INTERPRETER_PROGRAMS, num_tiles)
    per_sm = max(1, min(4, SMEM_LIMIT // max(_smem_bytes(cfg, kind, block_m, dtype), 1)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(sms * per_sm, num_tiles)


def _combine(z, y, top_k, on_gpu, saturate=True):
    T, D = y.shape
    tile = _combine_tile(on_gpu)
    _combine_kernel[(triton.cdiv(T, tile["BLOCK_T"]), triton.cdiv(D, tile["BLOCK_D"]))](
        z, y, T, D, y.stride(0), K=top_k, SATURATE=saturate, **tile)


def _experts_fwd(x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign,
                 tile_expert, top_k, block_m, save_pre):
    T, D = x.shape
    F_ = w_gate.shape[1]
    N, R = T * top_k, sorted_assign.shape[0]
    num_m = R // block_m
    on_gpu = not on_interpreter(x.device)
    ieee = x.dtype == torch.float32
    y = x.new_empty(T, D)
    gate = x.new_empty(R if save_pre else 0, F_)
    up = x.new_empty(R if save_pre else 0, F_)
    if T == 0:
        return y, gate, up
    h = x.new_empty(R, F_)
    z = x.new_empty(N, D)  # weighted expert outputs per assignment
    w_gu = _gate_up_weight(w_gate, w_up)
    tma = _use_tma(w_gu, w_down, on_gpu)
    E = w_gate.shape[0]
    g_out, u_out = (gate, up) if save_pre else (h, h)
    cfg = default_config("gate_up", x.dtype, D, F_, block_m, on_gpu)
    tiles = num_m * triton.cdiv(F_, cfg["BLOCK_N"])
    programs = persistent_programs(tiles, "gate_up", cfg, block_m, x.dtype, x.device)
    if programs:
        _gate_up_persistent_kernel[(programs,)](
            x, w_gu, h, g_out, u_out, tile_expert, sorted_assign, expert_start, counts, T, N, D,
            F_, E, num_m, x.stride(0), K=top_k, BLOCK_M=block_m, SAVE_PRE=save_pre, IEEE=ieee,
            TMA=tma, **_launch_kw(cfg))
    else:
        _gate_up_kernel[(tiles,)](
            x, w_gu, h, g_out, u_out, tile_expert, sorted_assign, tile_expert, T, N, D, F_, num_m,
            x.stride(0), K=top_k, K_PAD=1, N_PAD=1, BLOCK_M=block_m, DECODE=False,
            SAVE_PRE=save_pre, IEEE=ieee, TMA=tma, **_launch_kw(cfg))
    cfg = default_config("down", x.dtype, D, F_, block_m, on_gpu)
    tiles = num_m * triton.cdiv(D, cfg["BLOCK_N"])
    programs = persistent_programs(tiles, "down", cfg, block_m, x.dtype, x.device)
    if programs:
        _down_persistent_kernel[(programs,)](
            h, w_down, topk_w, z, tile_expert, sorted_assign, expert_start, counts, T, N, D, F_,
            E, num_m, K=top_k, BLOCK_M=block_m, IEEE=ieee, TMA=tma, **_launch_kw(cfg))
    else:
        _down_kernel[(tiles,)](
            h, w_down, topk_w, z, tile_expert, sorted_assign, tile_expert, T, N, D, F_, num_m,
            K=top_k, K_PAD=1, N_PAD=1, BLOCK_M=block_m, DECODE=False, IEEE=ieee, TMA=tma,
            **_launch_kw(cfg))
    _combine(z, y, top_k, on_gpu)
    return y, gate, up


def _experts_decode(x, w_gate, w_up, w_down, topk_w, topk_idx):
    T, D = x.shape
    K = topk_idx.shape[1]
    F_ = w_gate.shape[1]
    N = T * K
    on_gpu = not on_interpreter(x.device)
    y = x.new_empty(T, D)
    if T == 0:
        return y
    h = x.new_empty(N, F_)  # rows per assignment
    z = x.new_empty(N, D)
    idx = topk_idx.to(torch.int32).reshape(-1)
    w_gu = _gate_up_weight(w_gate, w_up)
    common = dict(K=K, K_PAD=triton.next_power_of_2(K), N_PAD=triton.next_power_of_2(N),
                  BLOCK_M=max(_DECODE_BLOCK_M, triton.next_power_of_2(T)), DECODE=True,
                  IEEE=x.dtype == torch.float32, TMA=_use_tma(w_gu, w_down, on_gpu))
    cfg = default_config("gate_up_decode", x.dtype, D, F_, 0, on_gpu)
    _gate_up_kernel[(N * triton.cdiv(F_, cfg["BLOCK_N"]),)](
        x, w_gu, h, h, h, idx, idx, idx, T, N, D, F_, N, x.stride(0), SAVE_PRE=False,
        **common, **_launch_kw(cfg))
    cfg = default_config("down_decode", x.dtype, D, F_, 0, on_gpu)
    _down_kernel[(N * triton.cdiv(D, cfg["BLOCK_N"]),)](
        h, w_down, topk_w, z, idx, idx, idx, T, N, D, F_, N, **common, **_launch_kw(cfg))
    _combine(z, y, K, on_gpu)
    return y


def _experts_bwd(dy, x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign,
                 tile_expert, gate, up, top_k, block_m, need_dx, need_dw):
    """(dx, dw_gate, dw_up, dw_down, d topk_w); dx / the dW are empty (0,) when not needed
    (frozen experts, a frozen input): their kernels do not run."""
    T, D = x.shape
    E, F_, _ = w_gate.shape
    N, R = T * top_k, sorted_assign.shape[0]
    num_m = R // block_m
    on_gpu = not on_interpreter(x.device)
    ieee = x.dtype == torch.float32
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    # Every element is written below (empty experts' dW included) unless there are no tokens.
    alloc = torch.zeros_like if T == 0 else torch.empty_like
    dx = alloc(x) if need_dx else x.new_empty(0)  # outputs may not alias: one empty each
    dwg, dwu, dwd = ((alloc(w_gate), alloc(w_up), alloc(w_down)) if need_dw
                     else (x.new_empty(0), x.new_empty(0), x.new_empty(0)))
    d_topk_w = alloc(topk_w)  # (T, K) fp32
    if T == 0:
        return dx, dwg, dwu, dwd, d_topk_w
    need_dh = need_dx or need_dw
    dg, du = (x.new_empty(R, F_), x.new_empty(R, F_)) if need_dh else (x, x)  # (x: unused)
    cfg = default_config("down_bwd", x.dtype, D, F_, block_m, on_gpu)
    num_n = triton.cdiv(F_, cfg["BLOCK_N"])
    dw_part = torch.empty(N, num_n, device=x.device, dtype=torch.float32)  # per column tile
    _down_bwd_kernel[(num_m * num_n,)](
        dy, topk_w, w_down, gate, up, dg, du, dw_part, tile_expert, sorted_assign, D, F_, num_m,
        dy.stride(0), K=top_k, BLOCK_M=block_m, NEED_DH=need_dh, IEEE=ieee, **_launch_kw(cfg))
    block_a = 64 if on_gpu else 16
    _dw_reduce_kernel[(triton.cdiv(N, block_a),)](
        dw_part, d_topk_w, N, NUM_PARTS=num_n, BLOCK_A=block_a,
        BLOCK_P=triton.next_power_of_2(num_n))
    if need_dx:
        dxs = x.new_empty(N, D)
        cfg = default_config("dx", x.dtype, D, F_, block_m, on_gpu)
        interleaved = w_gate.stride(1) == 2 * D  # MoEFFN.interleave_'s layout: rows 2D apart
        if interleaved and ieee:  # fp32 tiles spill 8 B reading rows 2D apart (sm_90): copies
            w_gate, w_up, interleaved = w_gate.contiguous(), w_up.contiguous(), False
        _gate_up_bwd_dx_kernel[(num_m * triton.cdiv(D, cfg["BLOCK_N"]),)](
            dg, du, w_gate, w_up, dxs, tile_expert, sorted_assign, D, F_, num_m, K=top_k,
            INTERLEAVED=interleaved,
            BLOCK_M=block_m, IEEE=ieee, **_launch_kw(cfg))
        _combine(dxs, dx, top_k, on_gpu, saturate=False)  # a gradient: inf stays inf
    if need_dw:
        cfg_gu = default_config("dw_gate_up", x.dtype, D, F_, block_m, on_gpu)
        cfg_d = default_config("dw_down", x.dtype, D, F_, block_m, on_gpu)
        seg_rows = dw_segment_rows(N, E, max(cfg_gu["BLOCK_K"], cfg_d["BLOCK_K"]))
        segs, nseg, first_slot, slots = dw_segments(counts, expert_start, N, seg_rows)
        # fp32 partials of the split experts' segments; gate and up at once, then down reuses
        # the gate's (F x D = D x F elements a slot)
        wsg, wsu = ((x.new_empty(slots, F_, D, dtype=torch.float32),
                     x.new_empty(slots, F_, D, dtype=torch.float32)) if slots
                    else (dwg, dwu))  # (no split possible: never written)
        _dw_gate_up_kernel[(triton.cdiv(F_, cfg_gu["BLOCK_M"]) * triton.cdiv(D, cfg_gu["BLOCK_N"]),
                            segs.shape[0])](
            dg, du, x, sorted_assign, segs, dwg, dwu, wsg, wsu, D, F_, x.stride(0), K=top_k,
            BLOCK_M=cfg_gu["BLOCK_M"], IEEE=ieee, **_launch_kw(cfg_gu, swizzled=False))
        if slots:
            _dw_split_reduce(wsg, dwg, nseg, first_slot, on_gpu)
            _dw_split_reduce(wsu, dwu, nseg, first_slot, on_gpu)
            del wsu
        _dw_down_kernel[(triton.cdiv(D, cfg_d["BLOCK_M"]) * triton.cdiv(F_, cfg_d["BLOCK_N"]),
                         segs.shape[0])](
            dy, topk_w, gate, up, sorted_assign, segs, dwd, wsg, D, F_, dy.stride(0),
            K=top_k, BLOCK_M=cfg_d["BLOCK_M"], IEEE=ieee, **_launch_kw(cfg_d, swizzled=False))
        if slots:
            _dw_split_reduce(wsg, dwd, nseg, first_slot, on_gpu)
    return dx, dwg, dwu, dwd, d_topk_w


_DW_SLOT_SHARE = 4  # split-segment workspace: at most E / this many slots per weight
_DW_SPLIT_ENV = "MOLMOE_MOE_DW_SPLIT"  # "0": never split (bench_moe's skewed case compares)


def dw_segment_rows(num_assignments: int, num_experts: int, block_k: int) -> int:
    """Rows per segment of the dW kernels (static shapes only): an expert with more rows is split
    into several segments, each its own programs, summed afterwards, so skewed routing does not
    make a few programs loop over most of the rows. At least 2 x N / slots_max, so that the split
    segments' count never passes slots_max = max(2, E / _DW_SLOT_SHARE) (each split expert has
    more than a segment's rows: its ceil(c / L) segments are fewer than 2 c / L); with E = 64 a
    segment is 8 x the mean rows per expert and the fp32 workspace is 16 slots, half the size of
    the dW it serves in bf16. A multiple of the dW kernels' row step. MOLMOE_MOE_DW_SPLIT=0:
    never split (one segment per expert, the kernels' old schedule)."""
    if os.environ.get(_DW_SPLIT_ENV, "1") == "0":  # one segment per expert (the comparison)
        return max(num_assignments, 1) + block_k
    slots_max = max(2, num_experts // _DW_SLOT_SHARE)
    rows = max(-(-2 * num_assignments // slots_max), 1)
    return -(-rows // block_k) * block_k


def dw_segments(counts, expert_start, num_assignments: int, seg_rows: int):
    """The dW kernels' work list, built on the device with static sizes (no host sync; CUDA
    graphs): expert e's counts[e] sorted rows from expert_start[e] cut into
    nseg[e] = max(1, ceil(counts[e] / seg_rows)) segments (an empty expert keeps one, which
    writes its zeros). Returns (segs (S, 4) int32 rows (expert, first row, rows, slot) with the
    longest segments first (longest-processing-time order: the launch starts them first) and
    unused rows at the end (rows = -1), nseg (E,), first_slot (E,), slots). A segment of an
    expert with one segment has slot -1 (its program writes dW); the segments of a split expert
    take consecutive workspace slots from first_slot[e], `slots` in all (0: no expert can be
    split at these sizes)."""
    E = counts.shape[0]
    counts = counts.to(torch.int64)
    nseg = torch.clamp((counts + seg_rows - 1) // seg_rows, min=1)
    num_segs = E + num_assignments // seg_rows  # sum of nseg <= N / seg_rows + E
    slots = 2 * num_assignments // seg_rows if num_assignments > seg_rows else 0
    ends = torch.cumsum(nseg, 0)
    s = torch.arange(num_segs, device=counts.device)
    e = torch.searchsorted(ends, s, right=True)
    valid = e < E
    e = e.clamp(max=E - 1)
    k = s - (ends[e] - nseg[e])  # the segment's index within its expert
    rows = torch.where(valid, torch.clamp(counts[e] - k * seg_rows, max=seg_rows), -1)
    split = nseg > 1
    first_slot = torch.cumsum(torch.where(split, nseg, 0), 0) - torch.where(split, nseg, 0)
    slot = torch.where(valid & split[e], first_slot[e] + k, -1)
    table = torch.stack([e, expert_start.to(torch.int64)[e] + k * seg_rows, rows, slot], 1)
    order = torch.sort(rows, descending=True, stable=True).indices
    return (table[order].to(torch.int32).contiguous(), nseg.to(torch.int32),
            first_slot.to(torch.int32), slots)


def _dw_split_reduce(ws, dw, nseg, first_slot, on_gpu):
    size = dw[0].numel()
    block = 1024 if on_gpu else 256
    _dw_split_reduce_kernel[(triton.cdiv(size, block), dw.shape[0])](
        ws, dw, nseg, first_slot, size, BLOCK=block)


# ----------------------------------------------------------------------------- torch.library


@torch.library.custom_op("molmoe::moe_route", mutates_args=())
def _route_op(logits: torch.Tensor, top_k: int,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return route(logits, top_k, renormalize)


@_route_op.register_fake
def _(logits, top_k, renormalize):
    T, E = logits.shape
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty(T, top_k, **f32), logits.new_empty(T, top_k, dtype=torch.int32),
            logits.new_empty(T, E, **f32), logits.new_empty(T, **f32))


def _route_setup(ctx, inputs, output):
    logits, top_k, renormalize = inputs
    ctx.save_for_backward(output[2], output[1])  # probs, topk_idx
    ctx.renormalize, ctx.logits_dtype = renormalize, logits.dtype


def _route_backward(ctx, d_topk_w, _d_idx, d_probs, d_lse):
    probs, topk_idx = ctx.saved_tensors
    return _route_bwd_op(probs, topk_idx, d_topk_w, d_probs, d_lse, ctx.renormalize,
                         ctx.logits_dtype), None, None


@torch.library.custom_op("molmoe::moe_route_bwd", mutates_args=())
def _route_bwd_op(probs: torch.Tensor, topk_idx: torch.Tensor, d_topk_w: torch.Tensor | None,
                  d_probs: torch.Tensor | None, d_lse: torch.Tensor | None, renormalize: bool,
                  logits_dtype: torch.dtype) -> torch.Tensor:
    return route_backward(probs, topk_idx, d_topk_w, d_probs, d_lse, renormalize, logits_dtype)


@_route_bwd_op.register_fake
def _(probs, topk_idx, d_topk_w, d_probs, d_lse, renormalize, logits_dtype):
    return probs.new_empty(probs.shape, dtype=logits_dtype)


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


@torch.library.custom_op("molmoe::moe_permute", mutates_args=())
def _permute_op(topk_idx: torch.Tensor, num_experts: int, block_m: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return permute(topk_idx, num_experts, block_m)


@_permute_op.register_fake
def _(topk_idx, num_experts, block_m):
    N = topk_idx.numel()
    R = padded_rows_bound(N, num_experts, block_m)
    i32 = dict(dtype=torch.int32)
    return (topk_idx.new_empty(num_experts, **i32), topk_idx.new_empty(num_experts, **i32),
            topk_idx.new_empty(R, **i32), topk_idx.new_empty(N, **i32),
            topk_idx.new_empty(R // block_m, **i32))


@torch.library.custom_op("molmoe::moe_experts", mutates_args=())
def _experts_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                topk_w: torch.Tensor, counts: torch.Tensor, expert_start: torch.Tensor,
                sorted_assign: torch.Tensor, tile_expert: torch.Tensor, top_k: int, block_m: int,
                save_pre: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _experts_fwd(x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign,
                        tile_expert, top_k, block_m, save_pre)


@_experts_op.register_fake
def _(x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign, tile_expert, top_k,
      block_m, save_pre):
    R, F_ = sorted_assign.shape[0], w_gate.shape[1]
    kept = R if save_pre else 0
    return x.new_empty(x.shape), x.new_empty(kept, F_), x.new_empty(kept, F_)


def _experts_setup(ctx, inputs, output):
    (x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign, tile_expert, top_k,
     block_m, save_pre) = inputs
    _, gate, up = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign,
                          tile_expert, gate, up)
    ctx.top_k, ctx.block_m, ctx.save_pre = top_k, block_m, save_pre


def _experts_backward(ctx, dy, _d_gate, _d_up):
    if not ctx.save_pre:
        raise RuntimeError("moe_experts: forward ran with save_pre=False (inference); "
                           "no pre-activations were kept for a backward")
    need = ctx.needs_input_grad
    need_dx, need_dw = need[0], any(need[1:4])
    dx, dwg, dwu, dwd, d_topk_w = _experts_bwd_op(dy, *ctx.saved_tensors, ctx.top_k, ctx.block_m,
                                                  need_dx, need_dw)
    return (dx if need_dx else None, dwg if need_dw else None, dwu if need_dw else None,
            dwd if need_dw else None, d_topk_w, None, None, None, None, None, None, None)


@torch.library.custom_op("molmoe::moe_experts_bwd", mutates_args=())
def _experts_bwd_op(dy: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                    w_down: torch.Tensor, topk_w: torch.Tensor, counts: torch.Tensor,
                    expert_start: torch.Tensor, sorted_assign: torch.Tensor,
                    tile_expert: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    top_k: int, block_m: int, need_dx: bool,
                    need_dw: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _experts_bwd(dy, x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign,
                        tile_expert, gate, up, top_k, block_m, need_dx, need_dw)


@_experts_bwd_op.register_fake
def _(dy, x, w_gate, w_up, w_down, topk_w, counts, expert_start, sorted_assign, tile_expert, gate,
      up, top_k, block_m, need_dx, need_dw):
    def like(t, needed):
        return t.new_empty(t.shape) if needed else t.new_empty(0)

    return (like(x, need_dx), like(w_gate, need_dw), like(w_up, need_dw), like(w_down, need_dw),
            topk_w.new_empty(topk_w.shape))


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


@torch.library.custom_op("molmoe::moe_experts_decode", mutates_args=())
def _experts_decode_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       w_down: torch.Tensor, topk_w: torch.Tensor,
                       topk_idx: torch.Tensor) -> torch.Tensor:
    return _experts_decode(x, w_gate, w_up, w_down, topk_w, topk_idx)


@_experts_decode_op.register_fake
def _(x, w_gate, w_up, w_down, topk_w, topk_idx):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------- public API


def _check(x, router_w, w_gate, w_up, w_down, top_k):
    if x.dim() != 2 or router_w.dim() != 2 or w_gate.dim() != 3:
        raise ValueError(f"moe_ffn: expected x (T, D), router_w (E, D), w_gate (E, F, D); got "
                         f"{tuple(x.shape)}, {tuple(router_w.shape)}, {tuple(w_gate.shape)}")
    T, D = x.shape
    E, F_, Dg = w_gate.shape
    if router_w.shape != (E, D) or Dg != D or w_up.shape != (E, F_, D) or \
            w_down.shape != (E, D, F_):
        raise ValueError(f"moe_ffn: shapes disagree: x {tuple(x.shape)}, router_w "
                         f"{tuple(router_w.shape)}, w_gate {tuple(w_gate.shape)}, w_up "
                         f"{tuple(w_up.shape)}, w_down {tuple(w_down.shape)} (want router_w "
                         f"(E, D), w_gate/w_up (E, F, D), w_down (E, D, F))")
    if not 1 <= top_k <= E:
        raise ValueError(f"moe_ffn: top_k={top_k} must be in 1..E={E}")
    if E > 1024:
        raise ValueError(f"moe_ffn: {E} experts unsupported (at most 1024)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"moe_ffn: dtype {x.dtype} unsupported (fp32, fp16, bf16)")
    for name, w in (("router_w", router_w), ("w_gate", w_gate), ("w_up", w_up),
                    ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"moe_ffn: {name} is {w.dtype} but x is {x.dtype}")
        if w.device != x.device:
            raise ValueError(f"moe_ffn: {name} on {w.device} but x on {x.device}")
    check_launch_device("moe_ffn", x.device)


def aux_losses(counts_E, probs_TE, lse_T, top_k):
    """Switch/OLMoE load-balancing loss E * sum_e f_e P_e (f from counts, no gradient) and the
    ST-MoE router z-loss mean_t lse_t^2; both 0 for T = 0."""
    T, E = probs_TE.shape
    f_E = counts_E.to(torch.float32) / max(T * top_k, 1)
    p_E = probs_TE.sum(0) / max(T, 1)
    return E * (f_E * p_E).sum(), lse_T.square().sum() / max(T, 1)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def moe_experts(x, w_gate, w_up, w_down, topk_w, topk_idx, *, path=None):
    """The experts part of the op for a given routing: (y, counts int64). topk_w (T, K) fp32,
    topk_idx (T, K) int; `path` None (choose from shapes), 'decode' or 'grouped'."""
    T = x.shape[0]
    E, K = w_gate.shape[0], topk_idx.shape[1]
    path = choose_path(T, _needs_grad(x, w_gate, w_up, w_down, topk_w), path)
    if not interleaved_layout(w_gate, w_up):  # interleaved weights stay as they are
        w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    w_down = w_down.contiguous()
    x = x if x.stride(-1) == 1 else x.contiguous()
    topk_w = topk_w.to(torch.float32).contiguous()  # read flat, by assignment
    if path == "decode":
        y = _experts_decode_op(x, w_gate, w_up, w_down, topk_w, topk_idx)
        # A handful of assignments: a one-hot sum is cheaper than the permutation kernels.
        arange_E = torch.arange(E, device=x.device, dtype=topk_idx.dtype)
        counts = (topk_idx.reshape(-1, 1) == arange_E).sum(0)
        return y, counts
    block_m = block_m_for(T * K, E, not on_interpreter(x.device))
    counts, expert_start, sorted_assign, _assign_row, tile_expert = _permute_op(
        topk_idx, E, block_m)
    y, _gate, _up = _experts_op(x, w_gate, w_up, w_down, topk_w, counts, expert_start,
                                    sorted_assign, tile_expert, K, block_m,
                                    _needs_grad(x, w_gate, w_up, w_down, topk_w))
    return y, counts.long()


def moe_ffn(x, router_w, w_gate, w_up, w_down, top_k, renormalize=False, *, path=None):
    """x (T, D) -> (y (T, D), aux); the contract of molmoe.backends (see the header).

    path: None picks from static shapes (decode for <= DECODE_MAX_TOKENS tokens without
    gradients, else grouped); 'decode' / 'grouped' force one (tests, benchmarks).
    aux: counts (E,) int64, router_logits (T, E), topk_idx (T, K) int64, topk_weights (T, K)
    fp32, router_probs (T, E) fp32, router_lse (T,) fp32, lb_loss, z_loss. On the decode path
    (inference, <= 8 tokens) the two losses are None: computing them would add ~10 small
    kernels to a latency-bound step; `aux_losses(counts, router_probs, router_lse, K)` gives
    them if wanted.
    """
    _check(x, router_w, w_gate, w_up, w_down, top_k)
    logits = F.linear(x, router_w)  # (T, E) model dtype, exactly the reference's
    topk_w, topk_idx, probs, lse = _route_op(logits, int(top_k), bool(renormalize))
    path = choose_path(x.shape[0], _needs_grad(x, router_w, w_gate, w_up, w_down), path)
    y, counts = moe_experts(x, w_gate, w_up, w_down, topk_w, topk_idx, path=path)
    lb_loss = z_loss = None
    if path == "grouped":
        lb_loss, z_loss = aux_losses(counts, probs, lse, top_k)
    return y, {"counts": counts, "router_logits": logits, "topk_idx": topk_idx.long(),
               "topk_weights": topk_w, "router_probs": probs, "router_lse": lse,
               "lb_loss": lb_loss, "z_loss": z_loss}
