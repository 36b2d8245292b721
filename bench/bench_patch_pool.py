"""2x2 attention pooling (spec §3.3): the fused Triton path vs the reference module.

    python -m bench.bench_patch_pool            # GPU: full grid, bf16; CPU: small, reference only
    python -m bench.bench_patch_pool --quick    # a few shapes

Shapes: Molmo's connector, 24x24 patches per crop, 2048 channels in, 1024 out, 16 heads x 64,
crops in {1, 4, 13, 26, 52} (13 = one image at the default 12-crop budget plus its global view).
The module is `molmoe.model.vision.AttentionPool2x2` with the real sizes, run once with the
reference op and once with the Triton op; processor-like masks (a padded band, partial values,
the -1 row on the last crop), so the pad-embedding path is always exercised.

Rows, forward ("fwd") and forward + backward ("fwd+bwd", w.r.t. features, pad_embed and all
weights): `reference` (the module as the model runs it), `torch_compile_ref` (torch.compile of the
reference op), `triton` (the fused op), and two that say where the fused op's time goes:
`triton_attend_only` (the Triton kernel alone on precomputed projections) and `gemm_floor` (only
the four projection GEMMs, which the fused path still runs through cuBLAS: no implementation
that keeps them as GEMMs can beat it). Each row reports TFLOP/s (projections + 4-key attention)
with the fraction of this device's measured bf16 matmul rate, GB/s on the bytes that must move
(features, weights, masks in; output out; backward: also the feature and weight gradients) with
the fraction of the measured copy bandwidth, and `speedup_vs_reference` (issue 5's H100 target:
triton >= 3x the reference module, fwd).

On CPU only the reference runs, at small sizes, in seconds: the Triton figures need a GPU.
"""
from __future__ import annotations

import math
import pathlib

import torch
import torch.nn.functional as F

from bench.common import (bench_device, bench_parser, format_row, measured_peaks, on_gpu, Record,
                          time_fn, write_results)
from molmoe.ops import REFERENCE_OPS, patch_pool_ref
from molmoe.config import VisionConfig
from molmoe.model.vision import AttentionPool2x2

VISION = VisionConfig()  # the released sizes: 24x24 grid, C = 2048, E = 1024, 16 heads
TARGET_SPEEDUP = 3.0


def make_case(crops, dtype, device, seed=0):
    """The pooling module with random weights, features (N, P, C), masks (N, P), pad_embed."""
    torch.manual_seed(seed)
    module = AttentionPool2x2(VISION).to(device, dtype)
    C, P = VISION.feature_dim, VISION.num_patches
    feats = torch.randn(crops, P, C, device=device, dtype=dtype)
    masks = torch.ones(crops, P, device=device)
    masks[:, -P // 6:] = 0.0  # a padded bottom band
    masks[:, -P // 6 - 24: -P // 6] = 0.4  # a partly padded row
    masks[-1] = -1.0  # the processor's legacy -1 row on the last crop (spec §4.5)
    pad_embed = torch.randn(2, C, device=device, dtype=dtype)
    return module, feats, masks, pad_embed


def costs(impl, crops, itemsize, backward):
    """(flops, bytes that must move) of one row. The whole op: projections + 4-key attention;
    features, weights, masks in, output out (backward: features and weights read again, their
    gradients written, the output gradient read; flops x3). `triton_attend_only` counts only
    the kernel's part (projected q/k/v in, o out), `gemm_floor` only the GEMMs."""
    C, E, P = VISION.feature_dim, VISION.emb_dim, VISION.num_patches
    M = crops * P // 4
    gemm_flops = 2 * M * C * E + 2 * 2 * crops * P * C * E + 2 * M * E * E
    attend_flops = 16 * M * E  # 4 scores and a 4-term weighted sum of D-vectors per (cell, head)
    weights = (3 * C * E + E * E + 4 * E) * itemsize
    if impl == "triton_attend_only":
        flops = attend_flops
        nbytes = (2 * M * E + 2 * crops * P * E) * itemsize + crops * P * 8
        # backward: q/k/v and do read, dq/dk/dv written
        nbytes += (3 * M * E + 4 * crops * P * E) * itemsize if backward else 0
    elif impl == "gemm_floor":
        flops = gemm_flops
        nbytes = (crops * P * C + M * C + 2 * M * E + 2 * crops * P * E) * itemsize + weights
    else:
        flops = gemm_flops + attend_flops
        nbytes = crops * P * C * itemsize + weights + crops * P * 4 + M * E * itemsize
        if backward:
            nbytes += 2 * crops * P * C * itemsize + 2 * weights + M * E * itemsize
    return flops * (3 if backward else 1), nbytes


def implementations(module, feats, masks, pad_embed, backward):
    """name -> zero-argument callable (fwd+bwd: forward, then the gradients of every input that
    has one); paths this machine cannot run are left out."""
    H = VISION.num_heads
    cast_back = True  # MolmoE's setting; with one dtype throughout it changes nothing
    m = module
    weights = (m.wq.weight, m.wq.bias, m.wk.weight, m.wk.bias, m.wv.weight, m.wv.bias,
               m.wo.weight, m.wo.bias)
    impls = {}  # name -> (forward callable, the tensors a backward differentiates)
    module_inputs = [feats, pad_embed, *weights]

    def with_ops(ops):
        def fn():
            module.ops = ops
            return module(feats, masks, pad_embed, cast_back)
        return fn

    impls["reference"] = (with_ops(REFERENCE_OPS), module_inputs)
    if on_gpu():
        import dataclasses

        from molmoe.kernels.patch_pool import patch_pool, patch_pool_attend

        impls["triton"] = (with_ops(dataclasses.replace(REFERENCE_OPS, patch_pool=patch_pool)),
                           module_inputs)
        try:
            compiled = torch.compile(patch_pool_ref, dynamic=False)
            compiled(feats, masks, pad_embed, *weights, H, cast_back)  # compile outside timing
        except Exception as e:  # noqa: BLE001 - any compile failure only drops this row
            print(f"torch.compile of the reference unavailable: {type(e).__name__}: {e}")
        else:
            impls["torch_compile_ref"] = (
                lambda: compiled(feats, masks, pad_embed, *weights, H, cast_back), module_inputs)
        # Where the fused op's time goes: its Triton kernel alone on precomputed projections ...
        N, P, C = feats.shape
        g = math.isqrt(P)
        with torch.no_grad():
            q_in = feats.reshape(N, g // 2, 2, g // 2, 2, C).mean(dim=(2, 4)).reshape(N, -1, C)
            raw = [F.linear(q_in, m.wq.weight), F.linear(feats, m.wk.weight),
                   F.linear(feats, m.wv.weight)]
            coef = torch.stack([(masks == 0), (masks < 1) & (masks != 0)], -1).float()
            pad_u = torch.randn(3, 2, m.wq.weight.shape[0], device=feats.device)
            bias = torch.stack([m.wq.bias, m.wk.bias, m.wv.bias])
        raw = [t.requires_grad_(backward) for t in raw]
        impls["triton_attend_only"] = (lambda: patch_pool_attend(*raw, coef, pad_u, bias, H), raw)
        if not backward:  # ... and the four projection GEMMs alone (the floor of this design)
            o = torch.randn_like(raw[0])

            def gemm_floor():
                return (F.linear(q_in, m.wq.weight), F.linear(feats, m.wk.weight),
                        F.linear(feats, m.wv.weight), F.linear(o, m.wo.weight))

            impls["gemm_floor"] = (gemm_floor, [])
    if not backward:
        return {name: fn for name, (fn, _) in impls.items()}

    def fwd_bwd(fn, inputs):
        def run():
            out = fn()
            return torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
        return run

    return {name: fwd_bwd(fn, inputs) for name, (fn, inputs) in impls.items()}


def main(argv=None) -> pathlib.Path:
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)

    gpu, device, dtype = bench_device()
    if gpu:
        grid = [(n, mode) for mode in ("fwd", "fwd+bwd")
                for n in ((1, 13) if args.quick else (1, 4, 13, 26, 52))]
    else:  # reference figures only, small enough to finish in seconds
        grid = [(1, "fwd")] if args.quick else [(1, "fwd"), (2, "fwd"), (1, "fwd+bwd")]
    notes = [f"dtype {dtype}; 24x24 patches per crop, C={VISION.feature_dim}, "
             f"E={VISION.emb_dim}, {VISION.num_heads} heads; processor-like masks",
             "flops = projections + 4-key attention; bytes = features, weights, masks in, output "
             "out (fwd+bwd: also feature/weight gradients); triton_attend_only and gemm_floor "
             "count only their part (see bench_patch_pool.costs); fractions of this device's "
             "measured matmul rate and copy bandwidth",
             f"speedup_vs_reference = reference p50 / row p50; issue 5 target for the H100: "
             f"triton >= {TARGET_SPEEDUP:g}x (fwd)",
             "gemm_floor = the four projection GEMMs alone: the least any path that keeps the "
             "projections as GEMMs can take"]
    if not gpu:
        notes.append("CPU run: the PyTorch reference only, at small sizes; the Triton kernel "
                     "figures need a GPU")
        print("No CUDA device: reference figures only, small sizes. Triton figures need a GPU.")

    peaks = measured_peaks()
    records = []
    for crops, mode in grid:
        backward = mode == "fwd+bwd"
        module, feats, masks, pad_embed = make_case(crops, dtype, device)
        if backward:
            feats.requires_grad_(True)
            pad_embed.requires_grad_(True)
        else:
            module.requires_grad_(False)
        case = {"crops": crops, "mode": mode}
        ref_ms = None
        with torch.set_grad_enabled(backward):  # also for torch.compile's warm-up call
            impls = implementations(module, feats, masks, pad_embed, backward)
        for impl, fn in impls.items():
            with torch.set_grad_enabled(backward):
                try:
                    timing = time_fn(fn, reps=20 if gpu else 5)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    print(f"{impl:<22} crops={crops} {mode}: skipped ({type(e).__name__}: {e})")
                    continue
            ref_ms = timing.p50_ms if impl == "reference" else ref_ms
            extra = {"speedup_vs_reference": ref_ms / timing.p50_ms} if ref_ms else {}
            nflops, nbytes = costs(impl, crops, feats.element_size(), backward)
            rec = Record("patch_pool", impl, case, timing, flops=nflops, bytes=nbytes, extra=extra)
            records.append(rec)
            line = format_row(rec, peaks)
            if impl != "reference" and ref_ms:
                line += f"  {extra['speedup_vs_reference']:.2f}x reference"
                if impl == "triton" and not backward:
                    ok = extra["speedup_vs_reference"] >= TARGET_SPEEDUP
                    line += f" (target {TARGET_SPEEDUP:g}x: {'met' if ok else 'NOT met'})"
            print(line)
        del module, feats, masks, pad_embed
    path = write_results("patch_pool", records, x_key="crops", notes=notes, out_dir=args.out)
    print(f"wrote {path} (and .png)")
    return path


if __name__ == "__main__":
    main()
