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
for seed in "$@"; do
    run=${BASE}__seed$seed
    if [ ! -f "$run/config.yaml" ]; then
        rm -rf "$run.tmp" && mkdir -p "$run.tmp"
        for d in proposals features bbox svm_pool5; do cp -al "$BASE/$d" "$run.tmp/$d"; done
        "$BIN/python" - "$BASE/config.yaml" "$run.tmp/config.yaml" "$seed" <<'PY'
import sys, yaml
src, dst, seed = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["finetune"]["seed"] = int(seed)
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
        mv "$run.tmp" "$run"
    fi
    "$BIN/sppdet" train "$run" --quiet
    [ -f "$run.ablations.json" ] || "$BIN/sppdet" eval --voc2007 --run "$run" --devkit "$DEVKIT" \
        --split val --limit "$LIMIT" --ablations --json "$run.ablations.json"
done
