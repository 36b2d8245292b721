"""bench/gpu_check.sh, the one command a lent GPU runs: its dry mode runs to completion here and
says what it skipped; its summary table judges the figures against issue 15's targets."""
import json
import os
import pathlib
import subprocess
import sys

from bench.gpu_summary import table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_completes_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PY=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for part in ("pip install -e .", "gpu-marked tests", "sm_90 compile checks", "bench_moe",
                 "bench_attention", "bench_decode_attention", "bench_rope", "bench_patch_pool",
                 "bench_preprocess"):
        assert any(ln.startswith("SKIP (dry):") and part in ln for ln in text.splitlines()), part
    assert "FAILED" not in text  # every benchmark at least starts (--help)
    assert "MoE fwd T=16384" in text and "missing" in text  # the table, nothing measured
    assert (out / "summary.txt").read_text().strip().endswith("and the plots")
    assert (out / "results.tar.gz").exists()
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


def test_a_python_without_torch_stops_it_with_the_reason(tmp_path):
    # Run with a python that cannot import torch (the machine's bare python3 instead of the
    # venv's), it says so and exits 2 at once instead of logging every step as failed.
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY="/bin/false")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot import torch and triton" in proc.stdout
    assert "bench_moe" not in proc.stdout


def _write(directory, name, rows):
    (directory / f"{name}.json").write_text(json.dumps({"rows": rows}))


def test_summary_table_judges_the_targets(tmp_path):
    _write(tmp_path, "moe", [
        {"impl": "triton", "case": {"T": 16384, "pass": "fwd"}, "tflops": 460.0},
        {"impl": "grouped_mm", "case": {"T": 16384, "pass": "fwd"}, "tflops": 300.0},
        {"impl": "triton", "case": {"T": 16384, "pass": "fwd+bwd"}, "tflops": 300.0},
        {"impl": "triton", "case": {"T": 4, "pass": "fwd"}, "tflops": 1.0}])
    _write(tmp_path, "attention", [
        {"impl": "triton", "case": {"model": "molmoe", "layout": "causal", "S": 16384,
                                    "pass": "fwd"}, "tflops": 449.0}])
    _write(tmp_path, "decode_attention", [
        {"impl": "triton", "case": {"model": "7b-d", "batch": 1, "cache_len": 4096},
         "bw_fraction": 0.5},
        {"impl": "triton", "case": {"model": "molmoe", "batch": 16, "cache_len": 4096},
         "bw_fraction": 0.9},
        {"impl": "reference", "case": {"model": "molmoe", "batch": 16, "cache_len": 4096},
         "bw_fraction": 0.99}])
    row = next(ln for ln in table(tmp_path) if ln.startswith("MoE fwd T=16384"))
    assert "460" in row and " met" in row and "grouped_mm 300" in row
    assert "NOT met" in next(ln for ln in table(tmp_path) if ln.startswith("MoE fwd+bwd"))
    assert "NOT met" in next(ln for ln in table(tmp_path) if "S=16384 molmoe" in ln)
    assert "missing" in next(ln for ln in table(tmp_path) if "S=16384 7b-d" in ln)
    worst = next(ln for ln in table(tmp_path) if ln.startswith("decode attention worst"))
    best = next(ln for ln in table(tmp_path) if ln.startswith("decode attention best"))
    assert "7b-d b1 4096" in worst and "50%" in worst and "NOT met" in worst
    assert "molmoe b16 4096" in best and "90%" in best and " met" in best  # triton rows only
