#!/usr/bin/env bash
# Run-to-run noise of a 300 -> 300 experiment: the same run fine-tuned again with other
# finetune.seed values (sampling, dropout and init), each evaluated on every ablation row. Each
# seed is a copy of the base run (hard links: proposals, maps, box regressors and pool5 SVMs,
# which do not depend on the fine-tuning, are shared, never written) with its own finetune/,
# svm_fc7/ and eval/. Resumable: rerun to finish. Usage (from the repo root):
#   bash experiments/seed_noise.sh BASE_RUN SEED...
# then: python -m experiments.commit_compare --out F BASE.ablations.json BASE__seedN.ablations.json ...
set -euo pipefail
BASE=$1; shift
BIN=${BIN:-.venv/bin}
DEVKIT=${DEVKIT:-../shared/data/VOCdevkit}
LIMIT=${LIMIT:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VARIANT=$(cd "$(dirname "$0")" && pwd)/variant.py  # by path: usable from another worktree
for seed in "$@"; do
    run=${BASE}__seed$seed
    "$BIN/python" "$VARIANT" "$BASE" "$run" \
        --share proposals,features,bbox,svm_pool5 --set "finetune.seed=$seed"
    "$BIN/sppdet" train "$run" --quiet
    [ -f "$run.ablations.json" ] || "$BIN/sppdet" eval --voc2007 --run "$run" --devkit "$DEVKIT" \
        --split val --limit "$LIMIT" --ablations --json "$run.ablations.json"
done
