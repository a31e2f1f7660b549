#!/usr/bin/env bash
# make bench: benchmarks whose results go to benchmarks/*.json (with machine and commit), shown
# in docs/speed.md. Speed targets live here, not in timed unit tests; ratios are measured side by
# side in one run. (The devkit-exactness of sppdet eval is a test: tests/test_voc_eval_devkit.py.)
set -euo pipefail
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks
# Batched SPP pooling vs a per-window loop: 2,000 windows on a [256, 43, 57] map, 2 threads.
"$BIN/python" scripts/bench_spp.py --threads 2 --out benchmarks/spp_pool.json
# Stripe tiling of the trunk (sppdet/tiling.py): same maps? how much faster? 20 val images at the
# five scales, tiling off and on alternately, float32 and bf16 conv.
WEIGHTS=../shared/weights/mobilenet_v2_features_imagenet.pth
if [ -d ../shared/data/VOCdevkit ] && [ -f "$WEIGHTS" ]; then
    for dt in float32 bfloat16; do
        "$BIN/python" scripts/check_tiling.py --devkit ../shared/data/VOCdevkit --split val \
            --limit 20 --weights "$WEIGHTS" --conv-dtype "$dt" --name "tiling_check_$dt"
    done
else
    echo "skipping the tiling check: no ../shared VOCdevkit or backbone weights"
fi
# SPP-net 1-scale / 5-scale vs R-CNN mode, same images, proposals and trained stages (issue 7).
# Needs a trained run on the real data: `make voc07-1scale` makes runs/voc07_1s, `make
# voc07-5scale` runs/voc07_5s (either will do: every method uses the run's fc / SVM / box
# stages, whose speed does not depend on the scales they were trained at).
if [ -z "${BENCH_RUN:-}" ]; then
    BENCH_RUN=runs/voc07_1s
    [ -f "$BENCH_RUN/svm_fc7/svm.npz" ] || BENCH_RUN=runs/voc07_5s
fi
if [ -f "$BENCH_RUN/svm_fc7/svm.npz" ] && [ -d ../shared/data/VOCdevkit ]; then
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$BIN/sppdet" bench --devkit ../shared/data/VOCdevkit \
        --split val --limit "${BENCH_LIMIT:-10}" --run "$BENCH_RUN" --name "bench_voc07_val_cpu" --quiet
    # The same, right after, with every method's conv trunk in float32 (the default, --conv-dtype
    # auto, is bf16 on CPUs with AVX512-BF16 / AMX; its mAP cost: docs/fast_path.md).
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$BIN/sppdet" bench --devkit ../shared/data/VOCdevkit \
        --split val --limit "${BENCH_LIMIT:-10}" --run "$BENCH_RUN" \
        --name "bench_voc07_val_cpu_fp32conv" --quiet --conv-dtype float32
else
    echo "skipping sppdet bench: no trained run at $BENCH_RUN (make voc07-1scale) or no ../shared"
fi
