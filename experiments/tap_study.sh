#!/usr/bin/env bash
# The 300 -> 300 tap study of issue 17 (results/tap_study_voc300.json; about 2.5 h on 2 cores):
# each row extracts the first 300 train / 300 val images, trains (fine-tuning, fc7 SVMs, box
# regressors) and evaluates every ablation row. Rows without conv fine-tuning also train pool5
# SVMs (but d18: 64,000-d); the conv-fine-tuned rows take their pool5 row from the frozen run of
# the same tap (pool5 SVMs never see the fine-tuned trunk). Resumable: rerun to finish.
# Usage (from the repo root):
#   bash experiments/tap_study.sh [RUNS_DIR [ROW...]]   (ROWs given: only those, one lane)
set -euo pipefail
RUNS=${1:-runs/tap}
BIN=${BIN:-.venv/bin}
DEVKIT=${DEVKIT:-../shared/data/VOCdevkit}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

row() {  # row NAME CONFIG [pool5]
    local run=$RUNS/$1 ext="--devkit $DEVKIT --out $RUNS/$1 --config $2 --limit 300"
    "$BIN/sppdet" extract --split train $ext
    "$BIN/sppdet" train "$run" --quiet
    "$BIN/sppdet" extract --split val $ext
    if [ "${3:-}" = pool5 ]; then "$BIN/sppdet" train-svm "$run" --layer pool5 --quiet; fi
    "$BIN/sppdet" eval --voc2007 --run "$run" --devkit "$DEVKIT" --split val --limit 300 \
        --ablations --json "$run/ablations.json"
}

if [ $# -ge 2 ]; then  # the named rows only (frozen rows with their pool5 SVMs)
    shift
    for name; do
        case $name in
            mnv2 | d17 | lite0) row "$name" "configs/tap_${name}_300.yaml" pool5 ;;
            *) row "$name" "configs/tap_${name}_300.yaml" ;;
        esac
    done
    exit 0
fi
# two lanes of one thread each (the rows are independent)
(row mnv2 configs/tap_mnv2_300.yaml pool5; row d17_conv4 configs/tap_d17_conv4_300.yaml
 row lite0 configs/tap_lite0_300.yaml pool5; row d18 configs/tap_d18_300.yaml) &
(row d17 configs/tap_d17_300.yaml pool5; row d17_conv4_lr4 configs/tap_d17_conv4_lr4_300.yaml
 row d17_conv2_lr4 configs/tap_d17_conv2_lr4_300.yaml
 row lite0_conv2_lr4 configs/tap_lite0_conv2_lr4_300.yaml)
wait
"$BIN/python" -m experiments.tap_study --out results/tap_study_voc300.json \
    --row "features[13] (96 ch), conv frozen=$RUNS/mnv2" \
    --row "features[17] dilated (320 ch), conv frozen=$RUNS/d17" \
    --row "features[17] dilated, features[14..17] fine-tuned=$RUNS/d17_conv4,$RUNS/d17" \
    --row "features[17] dilated, features[14..17] fine-tuned, conv lr 1e-4, 3k steps=$RUNS/d17_conv4_lr4,$RUNS/d17" \
    --row "features[17] dilated, features[16..17] fine-tuned, conv lr 1e-4, 3k steps=$RUNS/d17_conv2_lr4,$RUNS/d17" \
    --row "features[18] dilated (1280 ch), conv frozen=$RUNS/d18" \
    --row "EfficientNet-Lite0 dilated (320 ch), conv frozen=$RUNS/lite0" \
    --row "EfficientNet-Lite0 dilated, blocks 14-15 fine-tuned, conv lr 1e-4, 3k steps=$RUNS/lite0_conv2_lr4,$RUNS/lite0"
