#!/usr/bin/env bash
# The SVM-gap study of issue 17: fc7 SVMs of one fine-tuned 300 -> 300 run retrained with other
# svm settings, each evaluated on the same val images (fc7 row, no box regression). Each variant
# is a copy of the base run (hard links: its maps, proposals and fine-tuned model are shared,
# never written) with its own svm section and svm_fc7/. Resumable: rerun to finish.
# Usage (from the repo root):
#   bash experiments/svm_gap.sh BASE_RUN NAME 'svm.key=value ...' [NAME 'svm...' ...]
# e.g. bash experiments/svm_gap.sh runs/ft_d17_frozen pos05 'pos_iou=0.5' neg05 'neg_iou=0.5'
set -euo pipefail
BASE=$1; shift
BIN=${BIN:-.venv/bin}
DEVKIT=${DEVKIT:-../shared/data/VOCdevkit}
LIMIT=${LIMIT:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VARIANT=$(cd "$(dirname "$0")" && pwd)/variant.py  # by path: usable from another worktree
while [ $# -ge 2 ]; do
    name=$1 sets=$2; shift 2
    run=${BASE}__$name
    args=(); for kv in $sets; do args+=(--set "svm.$kv"); done
    "$BIN/python" "$VARIANT" "$BASE" "$run" --share proposals,features,finetune \
        "${args[@]}"
    "$BIN/sppdet" train-svm "$run" --layer fc7 --quiet
    [ -f "$run/fc7.json" ] || "$BIN/sppdet" eval --voc2007 --run "$run" --devkit "$DEVKIT" \
        --split val --limit "$LIMIT" --scorer svm --layer fc7 --no-bbox-reg --name val_fc7 \
        --json "$run/fc7.json"
done
