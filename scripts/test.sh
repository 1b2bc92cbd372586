#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: tiny random models, a few minutes on 2 CPU
# cores. Tests read the offline datasets from ../shared/data (or $ICLGD_DATA_DIR).
# Slow tests on the real embedded model: bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${ICLGD_VENV:-.venv}/bin/python" -m pytest -q "$@"
