#!/usr/bin/env bash
# The first thing to run when a GPU is lent (device tool), as ONE command, e.g.
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# and, on a machine without one, `bash bench/gpu_check.sh --dry` (what tests/test_gpu_check.py
# runs): every step that needs a GPU is skipped with a line saying so, the rest runs.
#
# Steps (issue 15), each with its own timeout so a slow part cannot eat the rest; the worst case
# adds up to ~7.5 minutes, sized for an H100/H200:
#   1. install molmoe into the machine's own torch (no downloads: nothing is reachable there);
#   2. the gpu-marked tests;
#   3. the sm_90 ahead-of-time compile checks (they run on the host CPU: no GPU needed);
#   4. every benchmark in quick mode at the target shapes: MoE at T = 16384, attention at
#      S = 16384 (plus 1024), decode attention, RoPE, patch pooling. Untuned default tiles
#      (--no-autotune where a benchmark tunes: tuning every candidate would not fit the budget);
#      Then image preprocessing (issue 16): Python path, native op and the CUDA path per size.
#   5. the summary table against the targets (bench/gpu_summary.py): MoE fwd 450 / fwd+bwd 380
#      TFLOP/s at T = 16k, attention fwd 450 TFLOP/s at 16k, decode attention >= 85% of the
#      measured bandwidth.
# Output: $OUT/summary.txt (everything printed), $OUT/results.tar.gz (every JSON, PNG and log),
# and the five benchmark plots as $OUT/<bench>.png: 7 files (the device tool returns at most 8).
# Copy the figures into bench/RESULTS.md with device, date, command and commit.
# Never run on a GPU yet (written 2026-11-30 without one).
set -u
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-bench/out/gpu_check}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
log() { echo "== $*" | tee -a "$SUMMARY"; }
skip() { echo "SKIP (dry): $*" | tee -a "$SUMMARY"; }
step() {  # name, timeout (s), command...: run it, log its tail, note a timeout or failure
    local name=$1 limit=$2; shift 2
    log "$name ($limit s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    tail -30 "$WORK/$name.log" | tee -a "$SUMMARY"
    if [ $rc -eq 124 ]; then log "$name: TIMED OUT after $limit s"; elif [ $rc -ne 0 ]; then
        log "$name: exit $rc"; fi
    log "$name: $((SECONDS - t0)) s"
}

log "$(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$( \
    [ $DRY = 1 ] && echo ' (dry run)')"
if [ $DRY = 1 ]; then
    skip "nvidia-smi and installing molmoe into the machine's torch (pip install -e .)"
else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
        | tee -a "$SUMMARY"
    $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
        || { log "pip install -e . failed"; exit 1; }
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$SUMMARY"
# Every later step needs torch and triton from $PY: stop here, saying which python lacks them,
# instead of logging each step as failed and printing an empty table.
$PY -c "import torch, triton" 2>/dev/null || {
    log "$PY ($(command -v "$PY")) cannot import torch and triton: run with the environment that has them (PY=/path/to/python, or activate the venv)"
    exit 2; }

# 2. gpu-marked tests
if [ $DRY = 1 ]; then
    skip "the gpu-marked tests; they would be: $($PY -m pytest -q -m gpu --collect-only \
-p no:cacheprovider tests 2>/dev/null | tail -1)"
else
    step gpu_tests 110 $PY -m pytest -q -m gpu -p no:cacheprovider tests
fi

# 3. sm_90 compile checks (host CPU; the same in both modes, but slow on a small dry-run box)
SM90="tests/test_moe_sm90.py tests/test_kernels_sm90.py tests/test_attention.py"
if [ $DRY = 1 ]; then
    skip "the sm_90 compile checks (pytest $SM90 -m sm90): the CPU test suite runs them"
else
    step sm90 150 $PY -m pytest -q -p no:cacheprovider $SM90 -m sm90
fi

# 4. every benchmark, quick mode, target shapes, figures into $WORK
bench() {  # name, timeout, extra args
    local name=$1 limit=$2; shift 2
    if [ $DRY = 1 ]; then
        skip "bench_$name --quick $*: GPU figures; checked that it starts (--help)"
        $PY -m "bench.bench_$name" --help > /dev/null 2>&1 \
            || log "bench_$name --help FAILED"
    else
        step "bench_$name" "$limit" $PY -m "bench.bench_$name" --quick --out "$WORK" "$@"
    fi
}
bench moe 80 --no-autotune
bench attention 110 --no-autotune
bench decode_attention 30
bench rope 25
bench patch_pool 25
# issue 16: image preprocessing, the CUDA path beside the native op and the Python path
bench preprocess 45 --sizes 640x480,1920x1080,4032x3024

# Optional (PROFILE=1, past the 8-minute budget): `molmoe profile decode` for MolmoE-1B at real
# shape (random weights, bf16), batch 1 with CUDA graphs, reference vs Triton vs transformers,
# time to first token with a 12-crop image.
if [ "${PROFILE:-0}" = 1 ] && [ $DRY = 0 ]; then
    $PY - <<'PYEOF'
from PIL import Image
import numpy as np
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 255, (1008, 1344, 3), dtype=np.uint8)).save("/tmp/crops12.png")
PYEOF
    step profile_b1 180 $PY -m molmoe profile decode --model molmoe-1b --dtype bfloat16 \
        --device cuda --out "$WORK/prof_b1" --image /tmp/crops12.png --batch 1 \
        --new-tokens 128 --backend both --mode graph --compare transformers
elif [ $DRY = 1 ]; then
    skip "PROFILE=1's decode profile (molmoe profile decode, GPU only)"
fi

# 5. the summary table, from whatever figures exist (missing ones say so)
log "targets (issue 15)"
$PY -m bench.gpu_summary "$WORK" | tee -a "$SUMMARY"

for f in moe attention decode_attention rope patch_pool; do
    cp "$WORK/$f.png" "$OUT/$f.png" 2>/dev/null
done
tar -czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null
log "done $(date -u +%FT%TZ): $OUT/summary.txt, results.tar.gz and the plots"
rm -rf "$WORK"
