#!/usr/bin/env bash
# Train the built-in pointing model (issue 13) from a seed: synthetic data, tokenizer, initial
# checkpoint, `molmoe train` (one CPU rank), then bench/eval_pointing.py on 300 held-out scenes.
#
#   scripts/train_default_model.sh [WORK_DIR] [SEED] [extra molmoe.pointer flags...]
#
# Deterministic from SEED (data: molmoe.synthetic seed SEED; weights: torch seed SEED; data
# order: the trainer's seed SEED), on the same machine and thread count. Defaults and the runs
# behind them: bench/RESULTS.md, "Issue 13: the built-in pointing model".
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/pointer}
SEED=${2:-0}
shift $(( $# > 2 ? 2 : $# ))
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" -m molmoe.pointer --work "$WORK" --seed "$SEED" "$@"
