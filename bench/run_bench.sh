#!/usr/bin/env bash
# One bench cell on the embedded model; extra flags pass through (e.g. --eval-cap 872 --out runs/bench-full).
exec iclgd bench --model smollm2-135m --task sst2 --k 32 --eval-cap 64 --data-dir "${ICLGD_DATA_DIR:-../shared/data}" --out runs/bench "$@"
