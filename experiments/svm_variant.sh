#!/usr/bin/env bash
# fc7 SVMs of one trained full-data run retrained with other settings, then every ablation row
# on all of val (the SVM-prior study of issue 17; experiments/svm_gap.sh is the 300-image,
# fc7-only form). The variant is a copy of the base run beside it (hard links: proposals, maps,
# fine-tuned head and box regressors are shared, never written) with its own config changes,
# svm_fc7/ and eval/. Resumable: rerun to finish. Usage (from the repo root):
#   bash experiments/svm_variant.sh BASE_RUN NEW_RUN 'section.key=value ...' [EVAL_FLAG ...]
# e.g. bash experiments/svm_variant.sh runs/voc07_lite0_1s runs/svmfix/asvm10 \
#          'svm.prior=classifier svm.prior_scaling=10.0'
#      (a 5-scale base whose val maps are not cached: add --no-cache)
# then: python -m experiments.tap_study --protocol ... --row LABEL=BASE_RUN --row LABEL=NEW_RUN
set -euo pipefail
BASE=$1 RUN=$2 SETS=$3; shift 3
BIN=${BIN:-.venv/bin}
DEVKIT=${DEVKIT:-../shared/data/VOCdevkit}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VARIANT=$(cd "$(dirname "$0")" && pwd)/variant.py  # by path: usable from another worktree
args=(); for kv in $SETS; do args+=(--set "$kv"); done
"$BIN/python" "$VARIANT" "$BASE" "$RUN" --share proposals,features,finetune,bbox "${args[@]}"
"$BIN/sppdet" train-svm "$RUN" --layer fc7 --quiet
[ -f "$RUN/ablations.json" ] || "$BIN/sppdet" eval --voc2007 --run "$RUN" --devkit "$DEVKIT" \
    --split val --ablations --json "$RUN/ablations.json" --fc-dtype float32 "$@"
