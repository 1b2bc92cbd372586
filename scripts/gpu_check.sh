#!/usr/bin/env bash
# One self-contained GPU check, no network needed (scripts/gpu_check.py says what it does):
# CPU/GPU agreement on a tiny cell, `iclgd bench` and a small `iclgd reproduce` in float32 and
# bfloat16 on SmolLM2-135M's architecture with random weights; one summary in OUT/summary.{json,md}.
# Under 10 minutes on one H200. Without CUDA it runs the CPU fallback at CI size (seconds).
#
#   bash scripts/gpu_check.sh [--out gpu_check] [--size auto|full|ci] [--data-dir DIR] [--eval-cap N]
#
# Python: $PYTHON, else .venv/bin/python, else python3; it needs torch, transformers and iclgd's
# other dependencies installed (iclgd itself is read from src/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_check.py "$@"
