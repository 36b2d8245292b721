"""MoE feed-forward layer: Triton `moe_ffn` vs the reference loop, torch._grouped_mm, megablocks.

    python -m bench.bench_moe              # GPU: MolmoE-1B layer, bf16, T = 1 .. 16384; CPU: small
    python -m bench.bench_moe --quick      # a few token counts (GPU: T = 4 and the 16384 target)
    python -m bench.bench_moe --no-triton  # GPU: baselines only (a tree without molmoe.kernels.moe)

Shapes: one MolmoE-1B MoE layer, D=2048, F=1024, E=64 experts, top-8 (spec §3.5), tokens T in
{1, 4, 16, 128, 1024, 4096, 16384}; forward (under no_grad) and forward+backward (gradients for x,
the router and the three expert weights, through torch.autograd.grad so no .grad accumulation is
timed). Contenders, all on the SAME weights and tokens:
  reference    molmoe.ops.moe_ffn_ref (= moe_ffn_ref): the per-expert Python loop
  grouped_mm   bench/moe_baselines.py: sort by expert + torch._grouped_mm (stock PyTorch)
  megablocks   megablocks' dMoE (GLU, grouped GEMMs) when importable, weights copied in
  triton       molmoe.kernels.moe.moe_ffn (issue 4), imported only on a GPU

Routing: a seeded random router whose logits have a per-token spread of ~2 and a per-expert bias
(the tokens share a mean direction, as real hidden states do), so the load is uneven the way a
trained router's is (max/mean expert load ~1.8 at T=4096, no empty experts); each row records the
load it drew. Weights: N(0, 1/fan_in), outputs O(1).

Figures, each against what this device measures (bench/common.py), not a datasheet:
  TFLOP/s counts only the useful expert FLOPs, 2*T*K*3*D*F forward (gate, up, down; no router, no
  padding, no activation) and 3x that for forward+backward; MFU = of the measured bf16 matmul rate.
  GB/s (forward rows) counts the bytes that must be read: the weights of the DISTINCT experts the
  drawn routing selects, 3*D*F*itemsize each (router weight and activations left out: < 3% at
  T <= 4); bw_fraction = of the measured copy bandwidth. Decode (T <= 4) is judged on bandwidth,
  T >= 4096 on the matmul rate; targets (issue 4) are printed with the figures at the end.
Before timing, every contender is checked on the GPU against the reference at one size (forward
and all five gradients, error <= 2x the bf16 reference's own error against fp32 + a floor), on
tokens whose top-k is unambiguous (k-th vs (k+1)-th logit gap > 0.1; a near-tie may legitimately
route differently in bf16).

On CPU only the PyTorch paths run (reference and grouped_mm, fp32), on a small layer, in seconds;
Triton, megablocks and every MolmoE-size figure need a GPU.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import (bench_device, bench_parser, format_row, measured_peaks, Record, time_fn,
                          write_results)
from bench.moe_baselines import grouped_mm_moe_ffn, megablocks_dmoe, megablocks_grads_in_our_layout
from molmoe.ops import moe_ffn_ref


@dataclass(frozen=True)
class Layer:
    name: str
    D: int  # model width
    F: int  # expert width
    E: int  # experts
    K: int  # top-k


MOLMOE_1B = Layer("molmoe-1b", D=2048, F=1024, E=64, K=8)
CPU_SMALL = Layer("cpu-small", D=256, F=128, E=16, K=4)  # fp32 MolmoE weights are 1.6 GB
TOKENS = (1, 4, 16, 128, 1024, 4096, 16384)
ROUTER_LOGIT_STD = 2.0  # per-token spread of the router logits
ROUTER_MEAN_SHARE = 0.02  # |shared mean direction|^2 / D: per-expert bias, hence uneven load
CHECK_TOKENS = 256
CHECK_MARGIN = 0.1  # logit gap that bf16 rounding (~0.03 at |logit| ~ 6) cannot close

TARGET_DECODE_BW = 0.80  # issue 4: decode (T <= 4) at >= 80% of measured bandwidth
TARGET_PREFILL_MFU = 0.55  # issue 4: T >= 4096 at >= 55% of the measured bf16 matmul rate


# ----------------------------------------------------------------------------- inputs


def make_weights(layer: Layer, dtype, device, seed=0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    D, Fd, E = layer.D, layer.F, layer.E
    return {
        "router_w": randn(E, D, std=ROUTER_LOGIT_STD / math.sqrt(D)),
        "w_gate": randn(E, Fd, D, std=1 / math.sqrt(D)),
        "w_up": randn(E, Fd, D, std=1 / math.sqrt(D)),
        "w_down": randn(E, D, Fd, std=1 / math.sqrt(Fd)),
        # shared by all tokens: the router's per-expert bias comes from it
        "mean_dir": randn(D, std=math.sqrt(ROUTER_MEAN_SHARE)).float(),
    }


def make_tokens(T: int, weights: dict, dtype, seed) -> torch.Tensor:
    mean_dir = weights["mean_dir"]
    g = torch.Generator(device=mean_dir.device).manual_seed(seed)
    return (torch.randn(T, mean_dir.shape[0], generator=g, device=mean_dir.device)
            + mean_dir).to(dtype)


def unambiguous_tokens(T, weights, K, dtype, seed) -> torch.Tensor:
    """T tokens whose k-th and (k+1)-th router logits are CHECK_MARGIN apart (see docstring)."""
    cand = make_tokens(8 * T, weights, dtype, seed)
    top = F.linear(cand.float(), weights["router_w"].float()).topk(K + 1, dim=-1).values
    keep = cand[(top[:, K - 1] - top[:, K]) > CHECK_MARGIN][:T]
    if keep.shape[0] < T:
        raise RuntimeError(f"only {keep.shape[0]} of {8 * T} tokens have an unambiguous top-{K}")
    return keep


def routing_stats(x, weights, K) -> dict:
    """What the drawn routing selects (the reference's router): distinct experts and balance."""
    _, idx = torch.topk(torch.softmax(F.linear(x, weights["router_w"]), -1, dtype=torch.float32), K)
    counts = torch.bincount(idx.flatten(), minlength=weights["router_w"].shape[0]).float()
    return {"experts_hit": int((counts > 0).sum()),
            "load_max_over_mean": round(float(counts.max() / counts.mean()), 3),
            "experts_empty": int((counts == 0).sum())}


# ----------------------------------------------------------------------------- contenders

WEIGHT_NAMES = ("router_w", "w_gate", "w_up", "w_down")


@dataclass
class Contender:
    name: str
    forward: Callable  # x_TD -> y_TD
    leaves: dict  # our weight name -> the tensor that receives its gradient
    to_ours: dict = field(default_factory=dict)  # name -> map of that gradient to our layout

    def grads(self, x, g):
        """(y, {"x": dx, "router_w": ..., ...}) in our layout, via autograd.grad (no .grad)."""
        x = x.detach().requires_grad_()
        y = self.forward(x)
        names = ["x", *self.leaves]
        gs = torch.autograd.grad(y, [x, *self.leaves.values()], g)
        return y, {n: self.to_ours.get(n, lambda t: t)(t) for n, t in zip(names, gs)}


def functional(name, fn, weights, K):
    leaves = {n: weights[n].detach().requires_grad_() for n in WEIGHT_NAMES}
    return Contender(name, lambda x: fn(x, *leaves.values(), K)[0], leaves)


def contenders(layer: Layer, weights: dict, *, gpu: bool, triton: bool) -> tuple[dict, list]:
    """name -> Contender, and notes on what was left out and why."""
    K = layer.K
    out = {"reference": functional("reference", moe_ffn_ref, weights, K)}
    notes = []
    if hasattr(torch, "_grouped_mm"):
        out["grouped_mm"] = functional("grouped_mm", grouped_mm_moe_ffn, weights, K)
    else:
        notes.append(f"torch {torch.__version__} has no torch._grouped_mm: grouped_mm left out")
    if not gpu:
        notes.append("CPU run: reference and grouped_mm only, fp32, small layer; the Triton, "
                     "megablocks and MolmoE-size figures need a GPU")
        return out, notes
    try:
        module, fn = megablocks_dmoe(*(weights[n] for n in WEIGHT_NAMES), K)
    except (ImportError, AssertionError) as e:  # megablocks asserts grouped_gemm is there
        notes.append(f"megablocks left out: {type(e).__name__}: {e}")
    else:
        params, maps = megablocks_grads_in_our_layout(module, layer.E, layer.F, layer.D)
        out["megablocks"] = Contender("megablocks", fn, params, maps)
    if triton:
        from molmoe.kernels.moe import moe_ffn  # checked in main(), so present here

        out["triton"] = functional("triton", moe_ffn, weights, K)
    else:
        notes.append("--no-triton: the Triton moe_ffn was not timed")
    return out, notes


def require_triton():
    """Fail at once, by name, if this tree lacks the Triton MoE op (issue 4)."""
    try:
        from molmoe.kernels.moe import moe_ffn  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"bench_moe: cannot import molmoe.kernels.moe.moe_ffn ({e}). The Triton MoE op of "
            "issue 4 is missing from this tree (kernels/moe.py). Run on a tree that has it, or "
            "pass --no-triton to time the baselines only.") from e


# ----------------------------------------------------------------------------- correctness


def check(cands: dict, layer: Layer, weights: dict, dtype) -> tuple[list[str], dict]:
    """Every contender vs the reference at one size: forward and gradients (see docstring).

    Returns (report lines, {name: why} for the contenders that failed or raised): those are not
    timed, and main() exits non-zero once the figures of the others are written.
    """
    x = unambiguous_tokens(CHECK_TOKENS, weights, layer.K, dtype, seed=7)
    gy = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(8),
                     device=x.device).to(dtype)
    w32 = {n: weights[n].float() for n in WEIGHT_NAMES}
    ref32 = functional("reference_fp32", moe_ffn_ref, w32, layer.K)
    y32, g32 = ref32.grads(x.float(), gy.float())
    y_lp, g_lp = cands["reference"].grads(x, gy)
    lines, failed = [], {}
    for name, c in cands.items():
        try:
            y, gr = c.grads(x, gy)
        except Exception as e:  # noqa: BLE001 - reported, and the run fails at the end
            failed[name] = f"raised {type(e).__name__}: {str(e)[:300]}"
            continue
        for what, a, a_lp, a32 in [("y", y, y_lp, y32)] + [
                (n, gr[n], g_lp[n], g32[n]) for n in g32]:
            err = (a.float() - a32).abs().max().item()
            torch_err = (a_lp.float() - a32).abs().max().item()
            floor = 1e-3 * a32.abs().max().item()  # a quarter of a bf16 ulp of the largest value
            if not err <= 2 * torch_err + floor:
                failed[name] = (f"{what} max error {err:.3g} > 2 x bf16 reference error "
                                f"{torch_err:.3g} + {floor:.3g}")
                break
        else:
            lines.append(f"check {name:<11} ok (T={CHECK_TOKENS}: y and d x/router/gate/up/down "
                         f"within 2x the bf16 reference's error vs fp32)")
    lines += [f"check {name:<11} FAILED, not timed: {why}" for name, why in failed.items()]
    return lines, failed


# ----------------------------------------------------------------------------- targets


def targets(records: list[Record], peaks: dict) -> list[str]:
    """The issue-4 targets next to the figures this run measured."""
    by = {(r.impl, r.case["T"], r.case["pass"]): r for r in records}
    lines = []
    for (impl, T, ps), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if impl != "triton":
            continue
        rates = r.rates(peaks)
        if T <= 4 and ps == "fwd":
            frac = rates["bw_fraction"]
            met = "met" if frac >= TARGET_DECODE_BW else "NOT met"
            lines.append(f"target decode T={T}: triton at {frac:.0%} of measured bandwidth "
                         f"(>= {TARGET_DECODE_BW:.0%}): {met}")
        if T >= 4096:
            mfu = rates["mfu"]
            rivals = {n: by[(n, T, ps)].timing.p50_ms for n in ("grouped_mm", "megablocks")
                      if (n, T, ps) in by}
            faster = all(r.timing.p50_ms < t for t in rivals.values())
            vs = ", ".join(f"{n} {t:.3f} ms" for n, t in rivals.items()) or "no rival timed"
            ok = mfu >= TARGET_PREFILL_MFU and faster and "megablocks" in rivals
            lines.append(f"target T={T} {ps}: triton {r.timing.p50_ms:.3f} ms, {mfu:.0%} MFU "
                         f"(>= {TARGET_PREFILL_MFU:.0%}) and faster than {vs}: "
                         f"{'met' if ok else 'NOT met'}"
                         + ("" if "megablocks" in rivals else " (megablocks not timed)"))
    if not lines:
        lines.append("targets: no Triton figures in this run (they need a GPU and kernels/moe.py)")
    return lines


# ----------------------------------------------------------------------------- main


SKEW_T, SKEW_SHARE = 16384, 0.5


def skew_records(triton_c, layer, weights, dtype, peaks, notes) -> list:
    """Skewed routing at T = 16k: every token pushed along expert 0's router row until expert 0
    is among the top K of SKEW_SHARE of the tokens. fwd+bwd of the Triton op with the dW
    kernels' row split (the default) and without it (MOLMOE_MOE_DW_SPLIT=0), interleaved in
    one run."""
    import os

    base = make_tokens(SKEW_T, weights, dtype, seed=77).float()
    push = weights["router_w"][0].float()
    push = push / push.norm()
    for step in range(40):  # raise the push until expert 0 holds SKEW_SHARE of the tokens
        x = (base + 0.5 * step * push).to(dtype)
        idx = torch.topk(F.linear(x, weights["router_w"]), layer.K).indices
        if (idx == 0).any(-1).float().mean() >= SKEW_SHARE:
            break
    stats = routing_stats(x, weights, layer.K)
    gy = torch.randn_like(x)
    line = f"skewed routing T={SKEW_T}: {stats}, expert 0 on >= {SKEW_SHARE:.0%} of the tokens"
    print(line)
    notes.append(line)
    flops = 3 * 2 * SKEW_T * layer.K * 3 * layer.D * layer.F
    out = []
    for split in ("1", "0", "1", "0"):  # interleaved: drift hits both
        os.environ["MOLMOE_MOE_DW_SPLIT"] = split
        timing = time_fn(lambda: triton_c.grads(x, gy), reps=20)
        rec = Record("moe", f"triton-skew-split{split}", {"T": SKEW_T, "pass": "fwd+bwd"},
                     timing, flops=flops, extra={"layer": layer.__dict__, "dtype": str(dtype),
                                                 **stats})
        out.append(rec)
        print(format_row(rec, peaks))
    os.environ.pop("MOLMOE_MOE_DW_SPLIT", None)
    return out


def main(argv=None) -> pathlib.Path:
    parser = bench_parser(__doc__, "a few token counts only")
    parser.add_argument("--no-triton", action="store_true", help="GPU: baselines only")
    parser.add_argument("--no-check", action="store_true", help="GPU: skip the correctness check")
    parser.add_argument("--no-autotune", action="store_true",
                        help="GPU: time the Triton op with its default tiles")
    args = parser.parse_args(argv)

    gpu, device, dtype = bench_device()
    if gpu and not args.no_triton:
        require_triton()
    layer = MOLMOE_1B if gpu else CPU_SMALL
    if gpu:
        tokens = (4, 16384) if args.quick else TOKENS  # quick keeps issue 15's T = 16k target
    else:
        tokens = (1, 16) if args.quick else (1, 4, 16, 128)
        print("No CUDA device: reference and grouped_mm only, small layer. Triton, megablocks "
              "and MolmoE-size figures need a GPU.")

    weights = make_weights(layer, dtype, device)
    cands, notes = contenders(layer, weights, gpu=gpu, triton=gpu and not args.no_triton)
    notes = [f"layer {layer}, dtype {dtype}, routing: logit std {ROUTER_LOGIT_STD}, shared mean "
             f"share {ROUTER_MEAN_SHARE} (seeded)",
             "flops = useful expert FLOPs only: 2*T*K*3*D*F forward, 3x that forward+backward",
             "bytes (fwd rows) = weights of the distinct experts selected by the drawn routing, "
             "3*D*F*itemsize each; bw_fraction / mfu = of this device's measured copy bandwidth / "
             "bf16 matmul rate"] + notes
    for n in notes[3:]:
        print(n)
    failed = {}
    if gpu and not args.no_check:
        lines, failed = check(cands, layer, weights, dtype)
        for line in lines:
            print(line)
            notes.append(line)
        for name in failed:
            del cands[name]

    peaks = measured_peaks()
    records = []
    itemsize = torch.finfo(dtype).bits // 8
    for T in tokens:
        x = make_tokens(T, weights, dtype, seed=1000 + T)
        gy = torch.randn_like(x)
        stats = routing_stats(x, weights, layer.K)
        fwd_flops = 2 * T * layer.K * 3 * layer.D * layer.F
        weight_bytes = stats["experts_hit"] * 3 * layer.D * layer.F * itemsize
        print(f"T={T}: {stats}")
        if "triton" in cands and not args.no_autotune:
            # Tile choice is never made on the launch path: tune once per shape, before timing.
            from molmoe.kernels.moe import autotune

            tuned = autotune(x, *(weights[n] for n in WEIGHT_NAMES), layer.K)
            print(f"triton autotune T={T}: {tuned}")
        for name, c in cands.items():
            for ps in ("fwd", "fwd+bwd"):
                if ps == "fwd":
                    def fn(c=c):
                        with torch.no_grad():
                            return c.forward(x)
                else:
                    def fn(c=c):
                        return c.grads(x, gy)
                try:
                    timing = time_fn(fn, reps=5 if not gpu else 20)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    print(f"{name:<22} T={T} {ps}: skipped ({type(e).__name__}: {str(e)[:120]})")
                    continue
                rec = Record("moe", name, {"T": T, "pass": ps}, timing,
                             flops=fwd_flops * (1 if ps == "fwd" else 3),
                             bytes=weight_bytes if ps == "fwd" else None,
                             extra={"layer": layer.__dict__, "dtype": str(dtype), **stats})
                records.append(rec)
                print(format_row(rec, peaks))
        del x, gy
    if "triton" in cands and gpu:
        records += skew_records(cands["triton"], layer, weights, dtype, peaks, notes)
    for line in targets(records, peaks):
        print(line)
        notes.append(line)
    path = write_results("moe", records, x_key="T", y="p50_ms", notes=notes, out_dir=args.out)
    print(f"wrote {path} (and .png)")
    if failed:
        raise SystemExit(f"bench_moe: {', '.join(failed)} failed the correctness check (see above)")
    return path


if __name__ == "__main__":
    main()
