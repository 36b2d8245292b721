"""The summary table of a `bench/gpu_check.sh` run: issue 15's targets against the figures the
benchmarks wrote (moe.json, attention.json, decode_attention.json in one folder).

    python -m bench.gpu_summary DIR     # prints the table; exit status 0 whatever it says

Targets (issue 15), each judged on the Triton rows only, with the baselines of the same case
beside them (not judged):
  MoE fwd        >= 450 TFLOP/s at T = 16384 (MolmoE-1B layer, bf16)    vs grouped_mm, megablocks
  MoE fwd+bwd    >= 380 TFLOP/s at T = 16384                            vs grouped_mm, megablocks
  attention fwd  >= 450 TFLOP/s at S = 16384, causal, head dim 128      vs sdpa_flash, flex
  decode attn    >= 85% of the measured copy bandwidth (worst and best shape reported)
A figure that is not in the files is "missing" (no GPU, a part that timed out or failed): it
is never counted as met.
"""
from __future__ import annotations

import json
import pathlib
import sys

MOE_T = 16384
ATTN_S = 16384


def _rows(directory: pathlib.Path, name: str) -> list[dict]:
    path = directory / f"{name}.json"
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("rows", [])


def _find(rows, impl, **case):
    for r in rows:
        if r["impl"] == impl and all(r["case"].get(k) == v for k, v in case.items()):
            return r
    return None


def _status(value, target) -> str:
    if value is None:
        return "missing"
    return "met" if value >= target else "NOT met"


def _fmt(value, unit) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if unit == "%" else f"{value:.0f}"


def table(directory: pathlib.Path) -> list[str]:
    """One line per target: what, measured, target, status, baselines of the same case."""
    entries = []  # (what, value, target, unit, baselines)
    moe = _rows(directory, "moe")
    for ps, target in (("fwd", 450.0), ("fwd+bwd", 380.0)):
        r = _find(moe, "triton", T=MOE_T, **{"pass": ps})
        base = {n: (_find(moe, n, T=MOE_T, **{"pass": ps}) or {}).get("tflops")
                for n in ("grouped_mm", "megablocks")}
        entries.append((f"MoE {ps} T={MOE_T}", r and r.get("tflops"), target, "TFLOP/s", base))
    attn = _rows(directory, "attention")
    for model in ("molmoe", "7b-d"):
        case = dict(model=model, layout="causal", S=ATTN_S, **{"pass": "fwd"})
        r = _find(attn, "triton", **case)
        base = {n: (_find(attn, n, **case) or {}).get("tflops") for n in ("sdpa_flash", "flex")}
        entries.append((f"attention fwd causal S={ATTN_S} {model}", r and r.get("tflops"), 450.0,
                        "TFLOP/s", base))
    dec = [r for r in _rows(directory, "decode_attention")
           if r["impl"] == "triton" and r.get("bw_fraction") is not None]
    for label, pick in (("worst", min), ("best", max)):
        r = pick(dec, key=lambda r: r["bw_fraction"]) if dec else None
        what = f"decode attention {label}" + (
            f" ({r['case']['model']} b{r['case']['batch']} {r['case']['cache_len']})" if r else "")
        entries.append((what, r and r["bw_fraction"], 0.85, "%", {}))
    lines = [f"{'target':<46} {'measured':>9} {'goal':>7}  {'status':<8} baselines"]
    for what, value, target, unit, base in entries:
        goal = f"{100 * target:.0f}%" if unit == "%" else f"{target:.0f}"
        others = ", ".join(f"{n} {_fmt(v, unit)}" for n, v in base.items())
        lines.append(f"{what:<46} {_fmt(value, unit):>9} {goal:>7}  {_status(value, target):<8} "
                     f"{others}")
    lines.append("units: TFLOP/s (useful FLOPs, bench docstrings) or % of measured copy bandwidth")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    directory = pathlib.Path(argv[0] if argv else "bench/out")
    for line in table(directory):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
