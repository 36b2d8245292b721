"""Prefill / training attention: our Triton `attention` vs SDPA, FlexAttention and flash-attn.

    python -m bench.bench_attention            # GPU: Molmo shapes, bf16, S = 512..16384; CPU: small
    python -m bench.bench_attention --quick    # a few shapes
    python -m bench.bench_attention --no-triton  # GPU: baselines only (no molmoe.kernels.attention)

Shapes (head dim, heads): MolmoE decoder 16 x 128; Molmo-7B-D decoder 28 query / 4 kv heads x 128
(GQA 7); the ViT 16 x 64 over 577 tokens (576 patches + CLS), non-causal, 13 crops as the batch.
Decoder sequence lengths S in {512, 1024, 2048, 4096, 16384} with B = max(1, 8192 // S)
sequences (the same tokens per step up to 8192), forward and forward+backward (dq, dk, dv via
torch.autograd.grad); --quick on a GPU: S = 1024 and 16384 (issue 15's target shape).
Two decoder mask layouts:
  causal  plain causal (Molmo 0924)
  image   causal OR same image block (Molmo 2's block_sequence_ids): 8 text tokens, then images
          of 740 tokens (one 12-crop image's pooled tokens, roughly) as contiguous blocks with 2
          text tokens between them, as many as fit before a >= 32-token text tail (S=512: one
          block of 472); every sequence of the batch has this layout.
Contenders, all on the same q, k, v:
  reference    molmoe.ops.attention_ref (= attention_ref), the dense-mask SDPA path
  sdpa_flash   torch SDPA forced to its flash backend (causal and ViT; it cannot take a mask)
  sdpa_mask    torch SDPA with the explicit boolean mask, efficient (else math) backend (image;
               on the CPU PyTorch picks)
  flex         FlexAttention, compiled, with a block mask built from the SAME mask_mod
               (causal, or causal-or-same-image); block-mask creation is outside the timed region
  flash_attn   flash_attn_func when importable (causal and ViT; no image-block mask)
  triton       molmoe.kernels.attention.attention (issue 5), imported only on a GPU
Figures: TFLOP/s counts only the unmasked FLOPs: 4 * Dh * (allowed query-key pairs) per head and
sequence forward (QK^T and PV), the pair count taken from the mask itself (mask.sum()), and 3.5x
that forward+backward (the backward recomputes QK^T and does 4 more matmuls: 2.5x); MFU = of
this device's measured bf16 matmul rate (bench/common.py). Targets (issue 5), printed at the
end: triton >= sdpa_flash on causal; triton >= 1.3x flex on image blocks; triton forward
>= 450 TFLOP/s at S = 16384, causal (issue 15).
Before timing (GPU), every contender is checked against the fp32 reference at S=1024 on each
layout it runs (o, dq, dk, dv within 2x the bf16 reference's own error + a floor).

On CPU only the PyTorch paths run, fp32, small sizes: reference, SDPA, and compiled FlexAttention
forward (torch 2.13 compiles it for the CPU through inductor's C++ backend, but raises
NotImplementedError for its backward there; the run notes it). The Triton, sdpa_flash,
flash-attn and FlexAttention-backward figures need a GPU.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import pathlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import (bench_device, bench_parser, format_row, measured_peaks, Record, time_fn,
                          write_results)
from molmoe.ops import attention_ref


@dataclass(frozen=True)
class Model:
    Hq: int
    Hkv: int
    Dh: int


MODELS = {"molmoe": Model(16, 16, 128), "7b-d": Model(28, 4, 128), "vit": Model(16, 16, 64)}
SEQ_LENS = (512, 1024, 2048, 4096, 16384)  # 16384: issue 15's 450 TFLOP/s target shape
TARGET_S, TARGET_FWD_TFLOPS = 16384, 450.0  # issue 15: triton forward, Dh 128, causal, 16k
TOKENS_PER_STEP = 8192  # B = max(1, TOKENS_PER_STEP // S) for the decoder shapes
VIT_TOKENS, VIT_CROPS = 577, 13
IMAGE_TOKENS, TEXT_PREFIX, TEXT_BETWEEN, TEXT_TAIL = 740, 8, 2, 32
FWD_BWD_FLOP_FACTOR = 3.5
TARGET_CAUSAL_VS_FLASH = 1.0  # issue 5: at or above SDPA's flash backend, plain causal
TARGET_IMAGE_VS_FLEX = 1.3  # issue 5: >= 1.3x FlexAttention with image blocks
CHECK_SEQ = 1024


# ----------------------------------------------------------------------------- masks


def molmo_block_ids(S: int) -> torch.Tensor:
    """(S,) int32 block ids of the docstring's prompt layout: -1 text, i >= 0 image i."""
    ids = torch.full((S,), -1, dtype=torch.int32)
    pos, block = TEXT_PREFIX, 0
    while pos + TEXT_TAIL < S:
        n = min(IMAGE_TOKENS, S - TEXT_TAIL - pos)
        if n < IMAGE_TOKENS and block > 0:
            break  # no partial image after a full one: the rest is text
        ids[pos:pos + n] = block
        pos, block = pos + n + TEXT_BETWEEN, block + 1
    return ids


def allowed_mask(block_ids_BS: torch.Tensor | None, S: int, causal: bool, device) -> torch.Tensor:
    """(B or 1, S, S) bool: allowed(i, j) = (j <= i if causal else True) or same image block."""
    i = torch.arange(S, device=device)
    allowed = (i[None, :] <= i[:, None]) if causal else torch.ones(S, S, dtype=torch.bool,
                                                                    device=device)
    allowed = allowed[None]
    if block_ids_BS is not None:
        b = block_ids_BS.to(device)
        allowed = allowed | ((b[:, :, None] == b[:, None, :]) & (b[:, :, None] >= 0))
    return allowed


def mask_mod_for(layout: str, block_ids_BS: torch.Tensor | None):
    """FlexAttention mask_mod expressing exactly `allowed_mask` (None: no mask at all)."""
    if layout == "full":
        return None
    if layout == "causal":
        return lambda b, h, q, kv: kv <= q
    blk = block_ids_BS

    def causal_or_same_image(b, h, q, kv):
        return (kv <= q) | ((blk[b, q] == blk[b, kv]) & (blk[b, q] >= 0))

    return causal_or_same_image


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    model: str
    layout: str  # causal | image | full (ViT)
    B: int
    S: int

    @property
    def causal(self) -> bool:
        return self.layout != "full"

    def tensors(self, dtype, device, seed=0):
        m = MODELS[self.model]
        g = torch.Generator(device=device).manual_seed(seed)
        q = torch.randn(self.B, m.Hq, self.S, m.Dh, generator=g, device=device, dtype=dtype)
        k = torch.randn(self.B, m.Hkv, self.S, m.Dh, generator=g, device=device, dtype=dtype)
        v = torch.randn(self.B, m.Hkv, self.S, m.Dh, generator=g, device=device, dtype=dtype)
        blk = (molmo_block_ids(self.S).to(device)[None].expand(self.B, -1).contiguous()
               if self.layout == "image" else None)
        return q, k, v, blk

    def flops_fwd(self, device) -> float:
        m = MODELS[self.model]
        blk = molmo_block_ids(self.S)[None] if self.layout == "image" else None
        pairs = int(allowed_mask(blk, self.S, self.causal, "cpu").sum()) * self.B
        return 4.0 * m.Dh * pairs * m.Hq


def grid(gpu: bool, quick: bool) -> list[Case]:
    if not gpu:  # fp32 on two shared cores: small, seconds
        if quick:
            return [Case("molmoe", lay, 1, 256) for lay in ("causal", "image")]
        return ([Case(m, lay, 1, s) for m in ("molmoe", "7b-d") for lay in ("causal", "image")
                 for s in (256, 512)] + [Case("vit", "full", 1, VIT_TOKENS)])
    seqs = (1024, TARGET_S) if quick else SEQ_LENS  # quick still measures the 16k target
    return ([Case(m, lay, max(1, TOKENS_PER_STEP // s), s) for m in ("molmoe", "7b-d")
             for lay in ("causal", "image") for s in seqs]
            + [Case("vit", "full", VIT_CROPS, VIT_TOKENS)])


# ----------------------------------------------------------------------------- contenders


def reference_supports_image_blocks() -> bool:
    return "image_block_ids" in inspect.signature(attention_ref).parameters


_FLEX = None


def compiled_flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled graph per shape and mask_mod: many in one run. Fail loudly rather than
        # fall back to the eager flex_attention (a dense, materialised-scores path).
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def implementations(case: Case, q, k, v, blk, *, gpu: bool, triton: bool) -> tuple[dict, list]:
    """name -> fn(q, k, v) -> o for this case; and notes on what was left out and why."""
    impls, notes = {}, []
    causal, gqa = case.causal, q.shape[1] != k.shape[1]
    tag = f"{case.model}/{case.layout}"
    if case.layout != "image":
        impls["reference"] = lambda q, k, v: attention_ref(q, k, v, causal=causal)
    elif reference_supports_image_blocks():
        impls["reference"] = lambda q, k, v: attention_ref(q, k, v, causal=True,
                                                                 image_block_ids=blk)
    else:
        notes.append(f"{tag}: attention_ref on this tree takes no image_block_ids "
                     "(issue 5 adds it): reference left out")

    if case.layout == "image":
        mask = allowed_mask(blk, case.S, True, q.device)[:, None]  # (B, 1, S, S)

        def sdpa_mask(q, k, v):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # GPU: the efficient backend (the math one only if it refuses); CPU: PyTorch picks.
            pick = (sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]) if gpu else
                    contextlib.nullcontext())
            with pick:
                # The efficient backend takes no GQA: kv heads are repeated inside the timed fn,
                # as a caller of SDPA with a mask must.
                if gqa:
                    g = q.shape[1] // k.shape[1]
                    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        impls["sdpa_mask"] = sdpa_mask
    elif gpu:
        def sdpa_flash(q, k, v):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        impls["sdpa_flash"] = sdpa_flash
    else:
        impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=gqa)  # CPU: PyTorch picks its backend

    mask_mod = mask_mod_for(case.layout, blk)
    block_mask = None
    if mask_mod is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = create_block_mask(mask_mod, case.B if case.layout == "image" else None,
                                       None, case.S, case.S, device=q.device)
    flex = compiled_flex()
    impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    if gpu and case.layout != "image":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            notes.append(f"{tag}: flash_attn not importable: left out")
        else:
            # flash-attn takes (B, S, H, Dh); the transposes are inside the timed fn, as a
            # caller holding (B, H, S, Dh) tensors would pay them.
            impls["flash_attn"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                causal=causal).transpose(1, 2)
    if triton:
        from molmoe.kernels.attention import attention  # checked in main(), so present here

        impls["triton"] = lambda q, k, v: attention(q, k, v, causal=causal, image_block_ids=blk)
    return impls, notes


def require_triton():
    """Fail at once, by name, if this tree lacks the Triton attention op (issue 5)."""
    try:
        from molmoe.kernels.attention import attention  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"bench_attention: cannot import molmoe.kernels.attention.attention ({e}). The Triton "
            "attention op of issue 5 is missing from this tree (kernels/attention.py). Run on a "
            "tree that has it, or pass --no-triton to time the baselines only.") from e


def fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


# ----------------------------------------------------------------------------- correctness


def check(case: Case, gpu: bool, triton: bool) -> tuple[list[str], dict]:
    """Every contender vs the fp32 reference: o, dq, dk, dv within 2x the bf16 reference's error."""
    q, k, v, blk = case.tensors(torch.bfloat16, "cuda", seed=3)
    impls, notes = implementations(case, q, k, v, blk, gpu=gpu, triton=triton)
    if "reference" not in impls:
        return notes + [f"check {case.model}/{case.layout}: no reference on this tree, "
                        "not checked"], {}
    return check_impls(case, impls, q, k, v)


def check_impls(case: Case, impls: dict, q, k, v) -> tuple[list[str], dict]:
    """(report lines, {name: why} for the contenders that failed or raised: not timed there)."""
    do = torch.randn(q.shape, generator=torch.Generator(q.device).manual_seed(4),
                     device=q.device).to(q.dtype)
    ref = impls["reference"]
    want = fwd_bwd(ref, q.float(), k.float(), v.float(), do.float())
    torch_err = [(a.float() - b).abs().max().item()
                 for a, b in zip(fwd_bwd(ref, q, k, v, do), want)]
    lines, failed = [], {}
    tag = f"{case.model}/{case.layout} S={case.S}"
    for name, fn in impls.items():
        try:
            got = fwd_bwd(fn, q, k, v, do)
        except Exception as e:  # noqa: BLE001 - reported, and the run fails at the end
            failed[name] = f"{tag}: raised {type(e).__name__}: {str(e)[:300]}"
            continue
        for what, a, b, te in zip(("o", "dq", "dk", "dv"), got, want, torch_err):
            err = (a.float() - b).abs().max().item()
            floor = 1e-3 * b.abs().max().item()
            if not err <= 2 * te + floor:
                failed[name] = (f"{tag}: {what} max error {err:.3g} > 2 x bf16 reference error "
                                f"{te:.3g} + {floor:.3g}")
                break
        else:
            lines.append(f"check {name:<11} {tag} ok")
    lines += [f"check {name:<11} FAILED, not timed on layout {case.layout}: {why}"
              for name, why in failed.items()]
    return lines, failed


# ----------------------------------------------------------------------------- targets


def targets(records: list[Record]) -> list[str]:
    by = {(r.impl, r.case["model"], r.case["layout"], r.case["S"], r.case["pass"]): r
          for r in records}
    lines = []
    for (impl, model, layout, S, ps), r in sorted(by.items(), key=lambda kv: kv[0][1:]):
        if impl != "triton" or layout == "full":
            continue
        rival, need = ("sdpa_flash", TARGET_CAUSAL_VS_FLASH) if layout == "causal" else (
            "flex", TARGET_IMAGE_VS_FLEX)
        other = by.get((rival, model, layout, S, ps))
        if other is None:
            lines.append(f"target {model}/{layout} S={S} {ps}: no {rival} figure to compare")
            continue
        speedup = other.timing.p50_ms / r.timing.p50_ms
        lines.append(f"target {model}/{layout} S={S} {ps}: triton {speedup:.2f}x {rival} "
                     f"(>= {need}x): {'met' if speedup >= need else 'NOT met'}")
    for (impl, model, layout, S, ps), r in sorted(by.items(), key=lambda kv: kv[0][1:]):
        if impl == "triton" and layout == "causal" and S == TARGET_S and ps == "fwd" and r.flops:
            tflops = r.flops / (r.timing.p50_ms * 1e-3) / 1e12
            lines.append(f"target {model}/causal S={S} fwd: triton {tflops:.0f} TFLOP/s "
                         f"(>= {TARGET_FWD_TFLOPS:.0f}): "
                         f"{'met' if tflops >= TARGET_FWD_TFLOPS else 'NOT met'}")
    if not lines:
        lines.append("targets: no Triton figures in this run (they need a GPU and "
                     "kernels/attention.py)")
    return lines


# ----------------------------------------------------------------------------- plot


def plot_panels(json_path: pathlib.Path) -> None:
    """Replace common.write_results' single-axes plot (30 lines in one legend) by one panel per
    model/layout: TFLOP/s against S, a line per contender and pass, the measured peak dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    payload = json.loads(json_path.read_text())
    panels: dict[str, dict[str, list]] = {}
    for row in payload["rows"]:
        c = row["case"]
        series = panels.setdefault(f"{c['model']} / {c['layout']}", {})
        series.setdefault(f"{row['impl']} {c['pass']}", []).append((c["S"], row["tflops"]))
    impls = ["reference", "sdpa", "sdpa_flash", "sdpa_mask", "flex", "flash_attn", "triton"]
    colour = {n: f"C{i}" for i, n in enumerate(impls)}  # one colour per contender everywhere
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, series) in zip(axes.flat, sorted(panels.items())):
        for label, pts in sorted(series.items()):
            pts.sort()
            impl, ps = label.split(" ")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    color=colour.get(impl, "k"), linestyle="-" if ps == "fwd" else "--")
        ax.axhline(payload["peaks"]["matmul_tflops"], color="gray", linestyle=":",
                   label="measured matmul peak")
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("S")
        ax.set_ylabel("TFLOP/s (unmasked FLOPs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"attention on {payload['environment']['device']} "
                 f"({payload['environment']['commit']})")
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> pathlib.Path:
    parser = bench_parser(__doc__)
    parser.add_argument("--no-triton", action="store_true", help="GPU: baselines only")
    parser.add_argument("--no-autotune", action="store_true",
                        help="GPU: time the Triton op with its default tiles")
    parser.add_argument("--no-check", action="store_true", help="GPU: skip the correctness check")
    args = parser.parse_args(argv)

    gpu, device, dtype = bench_device()
    triton = gpu and not args.no_triton
    if triton:
        require_triton()
    notes = [f"dtype {dtype}; decoder B = {TOKENS_PER_STEP} // S; image layout: "
             f"{TEXT_PREFIX} text, images of {IMAGE_TOKENS} with {TEXT_BETWEEN} text between, "
             f">= {TEXT_TAIL} text tail",
             "flops = 4 * Dh * allowed (query, key) pairs (counted from the mask) * Hq * B "
             f"forward, {FWD_BWD_FLOP_FACTOR}x forward+backward; mfu = of this device's measured "
             "bf16 matmul rate",
             "flex: compiled, block mask built outside the timed region from the same mask_mod"]
    if not gpu:
        notes.append("CPU run: reference, SDPA and compiled FlexAttention only, fp32, small sizes;"
                     " the Triton, sdpa_flash and flash-attn figures need a GPU")
        notes.append(f"CPU run: S = 512..{TARGET_S} (the {TARGET_FWD_TFLOPS:.0f} TFLOP/s target "
                     f"at S = {TARGET_S}) skipped; they need a GPU")
        print("No CUDA device: PyTorch paths only, small sizes. Triton figures need a GPU.")
    elif args.no_triton:
        notes.append("--no-triton: the Triton attention was not timed")
    failed = set()  # (impl, layout): failed the check, not timed on that layout
    if gpu and not args.no_check:
        for case in (Case("molmoe", "causal", 1, CHECK_SEQ), Case("molmoe", "image", 1, CHECK_SEQ),
                     Case("7b-d", "causal", 1, CHECK_SEQ), Case("7b-d", "image", 1, CHECK_SEQ),
                     Case("vit", "full", 2, VIT_TOKENS)):
            lines, bad = check(case, gpu, triton)
            failed |= {(name, case.layout) for name in bad}
            for line in lines:
                print(line)
                notes.append(line)

    peaks = measured_peaks()
    records, seen = [], set()
    for case in grid(gpu, args.quick):
        q, k, v, blk = case.tensors(dtype, device)
        do = torch.randn_like(q)
        impls, case_notes = implementations(case, q, k, v, blk, gpu=gpu, triton=triton)
        for n in case_notes:
            if n not in seen:
                seen.add(n)
                print(n)
                notes.append(n)
        flops = case.flops_fwd(device)
        if "triton" in impls and not args.no_autotune:
            # Tiles are never chosen on the launch path: tune once per case, before timing.
            from molmoe.kernels.attention import autotune

            kw = dict(causal=case.causal, image_block_ids=blk)
            print(f"triton autotune {case}: fwd {autotune(q, k, v, **kw)}, "
                  f"bwd {autotune(q, k, v, backward=True, **kw)}")
        for name, fn in impls.items():
            if (name, case.layout) in failed:
                continue
            for ps in ("fwd", "fwd+bwd"):
                if ps == "fwd":
                    def run(fn=fn):
                        with torch.no_grad():
                            return fn(q, k, v)
                else:
                    def run(fn=fn):
                        return fwd_bwd(fn, q, k, v, do)
                try:
                    timing = time_fn(run, reps=3 if not gpu else 20)
                except NotImplementedError as e:  # e.g. FlexAttention's backward on the CPU
                    n = f"{name} {ps} on {device}: not supported ({str(e).split('.')[0]})"
                    if n not in seen:
                        seen.add(n)
                        print(n)
                        notes.append(n)
                    continue
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    print(f"{name:<22} {case}: {ps} skipped ({type(e).__name__}: {str(e)[:160]})")
                    continue
                rec = Record("attention", name,
                             {"model": case.model, "layout": case.layout, "S": case.S,
                              "pass": ps}, timing,
                             flops=flops * (1 if ps == "fwd" else FWD_BWD_FLOP_FACTOR),
                             extra={"B": case.B, "dtype": str(dtype),
                                    "heads": MODELS[case.model].__dict__})
                records.append(rec)
                print(format_row(rec, peaks))
        del q, k, v, blk, do
    for line in targets(records):
        print(line)
        notes.append(line)
    path = write_results("attention", records, x_key="S", y="tflops", notes=notes,
                         out_dir=args.out)
    plot_panels(path)
    print(f"wrote {path} (and .png)")
    if failed:
        raise SystemExit("bench_attention: failed the correctness check (not timed there): "
                         + ", ".join(f"{n} on {lay}" for n, lay in sorted(failed)))
    return path


if __name__ == "__main__":
    main()
