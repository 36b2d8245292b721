"""Shared benchmark plumbing: timing with spread, measured device peaks, records, JSON and plots.

Every figure is reported against what this device measurably does (a large bf16 matmul for the
compute peak, a large device-to-device copy for the bandwidth peak), not against a datasheet.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from molmoe.profiling import git_commit

OUT_DIR = pathlib.Path(__file__).resolve().parent / "out"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def bench_device() -> tuple[bool, str, torch.dtype]:
    """(gpu, device, dtype): bf16 on a GPU; fp32 on the CPU, where only reference paths run."""
    gpu = on_gpu()
    return gpu, ("cuda" if gpu else "cpu"), (torch.bfloat16 if gpu else torch.float32)


def bench_parser(doc: str, quick_help: str = "a few shapes only") -> argparse.ArgumentParser:
    """The options every benchmark takes (--quick, --out); each adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR)
    return parser


def environment() -> dict:
    env = {
        "date": _dt.date.today().isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if on_gpu() else f"CPU ({platform.processor() or platform.machine()})",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


@dataclass
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def spread(self) -> str:
        return f"[{self.p20_ms:.3f}, {self.p80_ms:.3f}]"


def time_fn(fn, *, warmup: int = 3, reps: int = 20, min_seconds: float = 0.0) -> Timing:
    """p50 with p20/p80 of `fn()`; CUDA uses triton.testing.do_bench (L2 flushed), CPU a wall clock."""
    if on_gpu():
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return Timing(p50, p20, p80)
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    # "inclusive": within the samples' range (the default extrapolates past it on few samples,
    # down to a negative p20 when one rep is an outlier)
    q = (statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1
         else samples * 9)
    return Timing(statistics.median(samples), q[1], q[7])


_PEAKS: dict | None = None


def measured_peaks(dtype=torch.bfloat16) -> dict:
    """Measure this device's matmul rate (TFLOP/s) and copy bandwidth (GB/s) once per process."""
    global _PEAKS
    if _PEAKS is not None:
        return _PEAKS
    dev = "cuda" if on_gpu() else "cpu"
    n = 8192 if on_gpu() else 1024
    dt = dtype if on_gpu() else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    t = time_fn(lambda: a @ b)
    tflops = 2 * n**3 / (t.p50_ms * 1e-3) / 1e12
    nbytes = (1 << 30) if on_gpu() else (1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src))
    gbps = 2 * nbytes / (t.p50_ms * 1e-3) / 1e9  # read + write
    _PEAKS = {"matmul_tflops": tflops, "copy_gbps": gbps, "matmul_dtype": str(dt)}
    return _PEAKS


@dataclass
class Record:
    bench: str
    impl: str
    case: dict
    timing: Timing
    flops: float | None = None
    bytes: float | None = None
    extra: dict = field(default_factory=dict)

    def rates(self, peaks: dict) -> dict:
        s = self.timing.p50_ms * 1e-3
        out = {}
        if self.flops:
            out["tflops"] = self.flops / s / 1e12
            out["mfu"] = out["tflops"] / peaks["matmul_tflops"]
        if self.bytes:
            out["gbps"] = self.bytes / s / 1e9
            out["bw_fraction"] = out["gbps"] / peaks["copy_gbps"]
        return out

    def row(self, peaks: dict) -> dict:
        d = asdict(self)
        d["timing"] = asdict(self.timing)
        d.update(self.rates(peaks))
        return d


def format_row(r: Record, peaks: dict) -> str:
    rates = r.rates(peaks)
    parts = [f"{r.impl:<22}", " ".join(f"{k}={v}" for k, v in r.case.items()),
             f"p50={r.timing.p50_ms:.3f}ms {r.timing.spread}"]
    if "tflops" in rates:
        parts.append(f"{rates['tflops']:.1f} TFLOP/s ({rates['mfu']:.0%} of measured)")
    if "gbps" in rates:
        parts.append(f"{rates['gbps']:.0f} GB/s ({rates['bw_fraction']:.0%} of measured)")
    return "  ".join(parts)


def write_results(name: str, records: list[Record], *, x_key: str, y: str = "p50_ms",
                  notes: list[str] | None = None, out_dir: pathlib.Path = OUT_DIR) -> pathlib.Path:
    """Write `<name>.json` (environment, peaks, every row) and `<name>.png` (one line per impl)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peaks = measured_peaks()
    payload = {"environment": environment(), "peaks": peaks, "notes": notes or [],
               "rows": [r.row(peaks) for r in records]}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return path
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple]] = {}
    for row in payload["rows"]:
        label = row["impl"] + "".join(f" {k}={v}" for k, v in row["case"].items() if k != x_key)
        value = row["timing"]["p50_ms"] if y == "p50_ms" else row.get(y)
        if value is not None:
            series.setdefault(label, []).append((row["case"][x_key], value))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel(y)
    ax.set_title(f"{name} on {payload['environment']['device']}")
    ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=120)
    plt.close(fig)
    return path
