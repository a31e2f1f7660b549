#!/usr/bin/env bash
# A variant of a trained run that retrains the stages it does not share, then every ablation
# row on all of val (issue 17: e.g. multi-task fine-tuning, box regressors on fc7). The variant
# is a copy of the base run beside it: the entries named in SHARE are hard links (never written),
# the config is the base's with the changes; `sppdet train` then runs each stage whose output is
# missing (fine-tuning, SVMs, box regression). Resumable: rerun to finish. Usage (repo root):
#   bash experiments/retrain_variant.sh BASE_RUN NEW_RUN SHARE 'section.key=value ...' [EVAL_FLAG ...]
# e.g. bash experiments/retrain_variant.sh runs/voc07_lite0_dedup_1s runs/mt/mt1 \
#          proposals,features 'finetune.bbox_loss_weight=1.0 bbox.method=finetuned'
#      (a 5-scale base whose val maps are not cached: add --no-cache)
# then: python -m experiments.tap_study --protocol ... --row LABEL=BASE_RUN --row LABEL=NEW_RUN
set -euo pipefail
BASE=$1 RUN=$2 SHARE=$3 SETS=$4; shift 4
BIN=${BIN:-.venv/bin}
DEVKIT=${DEVKIT:-../shared/data/VOCdevkit}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VARIANT=$(cd "$(dirname "$0")" && pwd)/variant.py  # by path: usable from another worktree
args=(); for kv in $SETS; do args+=(--set "$kv"); done
"$BIN/python" "$VARIANT" "$BASE" "$RUN" --share "$SHARE" "${args[@]}"
"$BIN/sppdet" train "$RUN" --quiet
[ -f "$RUN/ablations.json" ] || "$BIN/sppdet" eval --voc2007 --run "$RUN" --devkit "$DEVKIT" \
    --split val --ablations --json "$RUN/ablations.json" --fc-dtype float32 "$@"
