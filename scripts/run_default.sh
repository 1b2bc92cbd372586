#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: SmolLM2-135M on SST-2
# (seed 2, k = 32, the full 872-example validation split), ZSL and ICL. Data comes from the
# Hugging Face Hub when reachable, else from ../shared/data (or $ICLGD_DATA_DIR).
# Extra arguments are passed to `iclgd run`, e.g. --settings zsl,icl,gd,lcgd,lingd --eval-cap 100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/iclgd run --model smollm2-135m --task sst2 --seed 2 --k 32 --settings zsl,icl "$@"
