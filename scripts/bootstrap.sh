#!/usr/bin/env bash
# Create .venv and install molmoe with its test and bench extras, idempotently.
#
# torch is installed first and pinned: on a CPU machine `torch==2.13.0` resolves to the local CPU
# wheel; any other spec would pull the newest CUDA build (gigabytes). On a GPU machine set
# MOLMOE_TORCH_SPEC, e.g. MOLMOE_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC2086
.venv/bin/pip install -q --disable-pip-version-check ${MOLMOE_TORCH_SPEC:-torch==2.13.0}
# Without build isolation, so setup.py sees the torch installed above and builds csrc/ (the
# native image preprocessing op). With no working C++ compiler the install still succeeds: setup.py
# says the op was not built, and molmoe falls back to the Python path with a warning.
.venv/bin/pip install -q --disable-pip-version-check "setuptools>=68" wheel
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench]"
