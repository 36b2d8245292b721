#!/usr/bin/env bash
# The first thing to run when a GPU is lent (device tool), as ONE command, e.g.
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# It installs molmoe into the machine's own torch (no downloads: nothing is reachable there),
# runs the gpu-marked tests, then `molmoe profile decode` for MolmoE-1B at real shape (random
# weights, bf16): batch 1 / 8 / 32 with CUDA graphs, reference vs Triton vs transformers, and
# time to first token with a 12-crop image. Everything lands in $OUT (8 files at most come
# back): copy the figures into bench/RESULTS.md with device, date, command and commit.
# Budget: the whole script is sized for ~8 minutes; each part has its own timeout, so a slow
# part cannot eat the rest. Never run on a GPU yet (written 2026-11-30 without one).
set -u
OUT=${OUT:-bench/out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "$(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
    | tee -a "$OUT/summary.txt"
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || { log "pip install -e . failed"; exit 1; }
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/summary.txt"

log "gpu-marked tests"
timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 \
    | tee -a "$OUT/summary.txt"

# A 12-crop image: 1344x1008 tiles into 4x3 crops of 336 (+ the global view).
$PY - <<'PY'
from PIL import Image
import numpy as np
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 255, (1008, 1344, 3), dtype=np.uint8)).save("/tmp/crops12.png")
PY

profile() {  # name, timeout, args...
    local name=$1 limit=$2; shift 2
    log "profile $name: $*"
    timeout "$limit" $PY -m molmoe profile decode --model molmoe-1b --dtype bfloat16 \
        --device cuda --out "/tmp/prof_$name" "$@" 2>&1 | tail -40 | tee -a "$OUT/summary.txt"
    cp "/tmp/prof_$name/profile.json" "$OUT/$name.json" 2>/dev/null
}
profile b1 180 --image /tmp/crops12.png --batch 1 --new-tokens 128 --backend both \
    --mode graph --compare transformers
cp /tmp/prof_b1/profile.png "$OUT/b1.png" 2>/dev/null
profile b8 90 --image /tmp/crops12.png --batch 8 --new-tokens 64 --backend triton --mode graph
profile b32 90 --image /tmp/crops12.png --batch 32 --new-tokens 64 --backend triton --mode graph
log "done $(date -u +%FT%TZ)"
