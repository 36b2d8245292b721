"""Decode attention against the KV cache: our flash-decoding kernel vs SDPA and flash-attn.

    python -m bench.bench_decode_attention            # GPU: full grid, bf16; CPU: small, reference
    python -m bench.bench_decode_attention --quick    # a few shapes
    python -m bench.bench_decode_attention --sweep    # GPU: time every tile config first

Molmo decode shapes (one new token, head dim 128): MolmoE 16/16 heads, 7B-D 28/4, 72B 64/8;
batch 1..32, cache 1k..16k. Decode is bound by reading K and V, so each row reports GB/s on the
KV bytes read (2 * B * Hkv * cache_len * Dh * itemsize) and the fraction of this device's
measured copy bandwidth (bench/common.py). Sequences are left-padded by 1/8 of the cache (the
engine's layout), so every implementation gets the padding mask.

On CPU only the PyTorch paths run, at small sizes, in seconds: Triton figures need a GPU.
"""
from __future__ import annotations

import pathlib

import torch
import torch.nn.functional as F

from bench.common import (bench_device, bench_parser, format_row, measured_peaks, on_gpu, Record,
                          time_fn, write_results)
from molmoe.ops import decode_attention_ref

MODELS = {"molmoe": (16, 16), "7b-d": (28, 4), "72b": (64, 8)}  # (Hq, Hkv), Dh = 128
HEAD_DIM = 128


def make_case(model, batch, cache_len, dtype, device):
    Hq, Hkv = MODELS[model]
    q = torch.randn(batch, Hq, 1, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(batch, Hkv, cache_len, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    kpm = torch.ones(batch, cache_len, dtype=torch.bool, device=device)
    kpm[:, : cache_len // 8] = False  # left padding
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
    return q, k, v, kpm, seqlens


def implementations(q, k, v, kpm, seqlens):
    """name -> zero-argument callable; missing libraries or unsupported paths are left out."""
    impls = {"reference": lambda: decode_attention_ref(q, k, v, key_padding_mask=kpm)}
    mask = kpm[:, None, None, :]  # (B, 1, 1, Sk): one query, no causal part

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    impls["sdpa"] = sdpa  # PyTorch picks its backend (memory-efficient or math) for a mask
    if on_gpu():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_math():
            with sdpa_kernel(SDPBackend.MATH):
                return sdpa()

        impls["sdpa_math"] = sdpa_math
        from molmoe.kernels.decode_attention import decode_attention

        impls["triton"] = lambda: decode_attention(q, k, v, cache_seqlens=seqlens,
                                                   key_padding_mask=kpm)
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError:
            pass
        else:
            # flash-attn wants (B, S, H, Dh) and has no key mask: left padding cannot be
            # expressed, so it attends every slot (same bytes read; an upper bound on speed).
            q_f, k_f, v_f = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            impls["flash_attn_kvcache"] = lambda: flash_attn_with_kvcache(
                q_f, k_f, v_f, cache_seqlens=seqlens, causal=True)
    return impls


def main(argv=None) -> pathlib.Path:
    parser = bench_parser(__doc__)
    parser.add_argument("--sweep", action="store_true", help="GPU: autotune tile configs first")
    args = parser.parse_args(argv)

    gpu, device, dtype = bench_device()
    if gpu and not args.quick:
        grid = [(m, b, s) for m in MODELS for b in (1, 4, 8, 16, 32) for s in (1024, 4096, 16384)]
    elif gpu:
        grid = [(m, b, s) for m in MODELS for b in (1, 16) for s in (4096,)]
    else:  # reference figures only, small enough to finish in seconds
        grid = ([("molmoe", 1, 512), ("7b-d", 1, 512)] if args.quick else
                [(m, 1, s) for m in MODELS for s in (1024, 2048)])
    notes = [f"dtype {dtype}, one new token, head dim {HEAD_DIM}, 1/8 left padding",
             "bytes = K and V bytes read; bw_fraction = of this device's measured copy bandwidth"]
    if not gpu:
        notes.append("CPU run: PyTorch reference paths only at small sizes; the Triton kernel "
                     "figures need a GPU")
        print("No CUDA device: reference figures only, small sizes. Triton figures need a GPU.")

    peaks = measured_peaks()
    records = []
    for model, batch, cache_len in grid:
        q, k, v, kpm, seqlens = make_case(model, batch, cache_len, dtype, device)
        if gpu and args.sweep:
            from molmoe.kernels.decode_attention import autotune

            print(f"tuned {model} B={batch} S={cache_len}:",
                  autotune(q, k, v, cache_seqlens=seqlens, key_padding_mask=kpm))
        kv_bytes = 2 * k.numel() * k.element_size()
        for impl, fn in implementations(q, k, v, kpm, seqlens).items():
            try:
                timing = time_fn(fn, reps=10 if not gpu else 20)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. math path out of memory
                print(f"{impl:<22} {model} B={batch} S={cache_len}: skipped ({type(e).__name__})")
                continue
            rec = Record("decode_attention", impl,
                         {"model": model, "batch": batch, "cache_len": cache_len}, timing,
                         bytes=kv_bytes)
            records.append(rec)
            print(format_row(rec, peaks))
        del q, k, v, kpm, seqlens
    path = write_results("decode_attention", records, x_key="cache_len", y="gbps",
                         notes=notes, out_dir=args.out)
    print(f"wrote {path} (and .png)")
    return path


if __name__ == "__main__":
    main()
