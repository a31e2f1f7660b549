#!/usr/bin/env bash
# make bench: benchmarks whose results go to benchmarks/*.json (with machine and commit).
# Speed targets live here, not in timed unit tests; ratios are measured side by side in one run.
set -euo pipefail
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks
# Batched SPP pooling vs a per-window loop: 2,000 windows on a [256, 43, 57] map, 2 threads.
"$BIN/python" scripts/bench_spp.py --threads 2 --out benchmarks/spp_pool.json
# Devkit-exactness of sppdet eval on the real VOC2007 val split (needs ../shared).
if [ -d ../shared/data/VOCdevkit ]; then
    "$BIN/python" scripts/check_voc_eval.py --devkit ../shared/data/VOCdevkit --split val \
        --out runs/eval_check --report benchmarks/voc_eval_check.json
else
    echo "skipping the VOC eval check: ../shared/data/VOCdevkit not found"
fi
