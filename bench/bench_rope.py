"""RoPE on q and k: the fused Triton kernel vs the reference and torch.compile of the reference,
next to the causal attention that the RoPE precedes.

    python -m bench.bench_rope            # GPU: full grid, bf16; CPU: small, reference only
    python -m bench.bench_rope --quick    # a few shapes

Shapes: MolmoE (16/16 heads x 128) and 7B-D (28/4 x 128), batch 1, prefill S in
{1, 512, 2048, 4096} and decode (batch 8, one new token), q and k as the decoder makes them
(views of the fused qkv projection, transposed to (B, H, S, Dh)), position tables from the
model's own `rope_tables`. RoPE is bound by memory: each row reports GB/s on the bytes that must
move (q and k read and written, the fp32 cos/sin tables read once) and the fraction of this
device's measured copy bandwidth (bench/common.py).

Issue 5 item 3 asks for RoPE standalone or fused into the attention prologue, whichever measures
faster. Fusing can at best save the RoPE kernel's time, so every shape also times the attention
that follows it (SDPA, causal for prefill, one query against an S-long cache for decode) and
each RoPE row carries `fraction_of_attention` = RoPE p50 / attention p50: if that fraction is
small, a standalone kernel costs little; if large, fusing is worth trying.

On CPU only the PyTorch reference paths run, at small sizes, in seconds: the Triton (and
torch.compile) figures need a GPU.
"""
from __future__ import annotations

import pathlib

import torch
import torch.nn.functional as F

from bench.common import (bench_device, bench_parser, format_row, measured_peaks, on_gpu, Record,
                          time_fn, write_results)
from molmoe.ops import apply_rope_ref
from molmoe.model.layers import rope_tables

MODELS = {"molmoe": (16, 16, 10000.0), "7b-d": (28, 4, 1e6)}  # (Hq, Hkv, rope theta), Dh = 128
HEAD_DIM = 128
DECODE_BATCH = 8


def make_case(model, batch, seq, dtype, device):
    """q, k (B, H, S, Dh) as views of one qkv projection output; v (for the attention row);
    the model's own fp32 tables at the last positions of a 4096-long sequence."""
    Hq, Hkv, theta = MODELS[model]
    qkv = torch.randn(batch, seq, (Hq + 2 * Hkv) * HEAD_DIM, device=device, dtype=dtype)
    q, k, v = qkv.split([Hq * HEAD_DIM, Hkv * HEAD_DIM, Hkv * HEAD_DIM], dim=-1)
    q, k, v = (t.view(batch, seq, -1, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
    pos = torch.arange(4096 - seq, 4096, device=device).expand(batch, seq)
    cos, sin = rope_tables(pos, HEAD_DIM, theta)
    return q, k, v, cos, sin


def rope_bytes(q, k, cos):
    # q and k read and written in their dtype, cos and sin read once (fp32)
    return 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * cos.element_size()


def implementations(q, k, cos, sin):
    """name -> zero-argument callable; paths this machine cannot run are left out."""
    impls = {"reference": lambda: apply_rope_ref(q, k, cos, sin)}
    if on_gpu():
        from molmoe.kernels.rope import apply_rope

        impls["triton"] = lambda: apply_rope(q, k, cos, sin)
        try:
            compiled = torch.compile(apply_rope_ref, dynamic=False)
            compiled(q, k, cos, sin)  # compile outside the timing; a failure leaves it out
        except Exception as e:  # noqa: BLE001 - any compile failure only drops this row
            print(f"torch.compile of the reference unavailable: {type(e).__name__}: {e}")
        else:
            impls["torch_compile_ref"] = lambda: compiled(q, k, cos, sin)
    return impls


def attention_after(q, k, v, decode: bool):
    """The attention the RoPE output feeds: causal prefill, or 1 query over the whole cache."""
    if decode:  # the decode case: one new token (q) against an S-long cache (k, v)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main(argv=None) -> pathlib.Path:
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)

    gpu, device, dtype = bench_device()
    # (model, phase, batch, seq): prefill seq = S; decode seq = cache length, RoPE on 1 token
    if gpu:
        seqs = (512, 4096) if args.quick else (1, 512, 2048, 4096)
        grid = [(m, "prefill", 1, s) for m in MODELS for s in seqs]
        grid += [(m, "decode", DECODE_BATCH, s) for m in MODELS for s in seqs if s > 1]
    else:  # reference figures only, small enough to finish in seconds
        seqs = (1, 128) if args.quick else (1, 128, 512)
        grid = [(m, "prefill", 1, s) for m in MODELS for s in seqs]
        grid += [(m, "decode", 2, 512) for m in (("molmoe",) if args.quick else MODELS)]
    notes = [f"dtype {dtype}, head dim {HEAD_DIM}, q/k are transposed views of the qkv output",
             "bytes = q and k read + written, fp32 cos/sin read; bw_fraction = of this device's "
             "measured copy bandwidth",
             "fraction_of_attention = RoPE p50 / p50 of the SDPA attention it precedes (causal "
             "prefill, or decode: one query over the seq-long cache): the most that fusing RoPE "
             "into the attention prologue could save"]
    if not gpu:
        notes.append("CPU run: PyTorch reference paths only at small sizes; the Triton kernel "
                     "and torch.compile figures need a GPU")
        print("No CUDA device: reference figures only, small sizes. Triton figures need a GPU.")

    peaks = measured_peaks()
    records = []
    reps = 20 if gpu else 10
    for model, phase, batch, seq in grid:
        decode = phase == "decode"
        q, k, v, cos, sin = make_case(model, batch, seq, dtype, device)
        rope_q, rope_k, rope_cos, rope_sin = q, k, cos, sin
        if decode:  # RoPE touches the one new token; attention reads the whole cache
            rope_q, rope_k = q[:, :, -1:], k[:, :, -1:]
            rope_cos, rope_sin = cos[:, -1:].contiguous(), sin[:, -1:].contiguous()
        case = {"model": model, "phase": phase, "batch": batch, "seq": seq}
        attn = attention_after(rope_q if decode else q, k, v, decode)
        t_attn = time_fn(attn, reps=reps)
        Hq, Hkv = q.shape[1], k.shape[1]
        attn_flops = 4 * batch * Hq * (1 if decode else seq / 2) * seq * HEAD_DIM
        rec = Record("rope", "attention_sdpa", case, t_attn, flops=attn_flops,
                     bytes=2 * k.numel() * k.element_size() if decode else None)
        records.append(rec)
        print(format_row(rec, peaks))
        nbytes = rope_bytes(rope_q, rope_k, rope_cos)
        for impl, fn in implementations(rope_q, rope_k, rope_cos, rope_sin).items():
            timing = time_fn(fn, reps=reps)
            rec = Record("rope", impl, case, timing, bytes=nbytes,
                         extra={"fraction_of_attention": timing.p50_ms / t_attn.p50_ms,
                                "Hq": Hq, "Hkv": Hkv})
            records.append(rec)
            frac = rec.extra["fraction_of_attention"]
            print(format_row(rec, peaks) + f"  {frac:.1%} of attention")
        del q, k, v, cos, sin
    path = write_results("rope", records, x_key="seq", notes=notes, out_dir=args.out)
    print(f"wrote {path} (and .png)")
    return path


if __name__ == "__main__":
    main()
