#!/usr/bin/env bash
# Issue 17's SVM-gap question "do the fc7 SVMs lose because fine-tuning has seen their training
# images?", measured on 300 -> 300 (the tap study's frozen d17 row at the full recipe's 10
# passes over the images, configs/svm_unseen_300.yaml):
#   seen:   fine-tune on train images 1-300, fc7 SVMs on the same 300 (the recipe's way)
#   unseen: the same fine-tuned net, fc7 SVMs on train images 301-600, which it never saw
# both scored on the first 300 val images (fc7 SVM rows; the softmax rows are the same net's).
# If features of the fine-tuning images are more separable than those of new images, the
# unseen SVMs generalise better with the same number of images. The two training halves are
# ImageSets files of a devkit made here (links to ../shared, nothing copied). Resumable: rerun.
# Usage (from the repo root): bash experiments/svm_unseen.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/svm_unseen}
BIN=${BIN:-.venv/bin}
VOC=$(cd "${DEVKIT:-../shared/data/VOCdevkit}/VOC2007" && pwd)
CFG=configs/svm_unseen_300.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

dev=$RUNS/devkit/VOC2007
if [ ! -f "$dev/ImageSets/Main/val.txt" ]; then
    mkdir -p "$dev/ImageSets/Main"
    ln -sfn "$VOC/JPEGImages" "$dev/JPEGImages"
    ln -sfn "$VOC/Annotations" "$dev/Annotations"
    sed -n 1,300p "$VOC/ImageSets/Main/train.txt" > "$dev/ImageSets/Main/train_seen.txt"
    sed -n 301,600p "$VOC/ImageSets/Main/train.txt" > "$dev/ImageSets/Main/train_unseen.txt"
    sed -n 1,300p "$VOC/ImageSets/Main/val.txt" > "$dev/ImageSets/Main/val.txt.tmp"
    mv "$dev/ImageSets/Main/val.txt.tmp" "$dev/ImageSets/Main/val.txt"
fi
D=$RUNS/devkit
seen=$RUNS/seen unseen=$RUNS/unseen
"$BIN/sppdet" extract --devkit "$D" --split train_seen --train-split train_seen --out "$seen" \
    --config "$CFG"
"$BIN/sppdet" extract --devkit "$D" --split val --out "$seen" --config "$CFG"
"$BIN/sppdet" train "$seen" --quiet
"$BIN/python" -m experiments.variant "$seen" "$unseen" --share proposals,features,finetune \
    --set data.train_split=train_unseen
"$BIN/sppdet" extract --devkit "$D" --split train_unseen --out "$unseen" --config "$CFG"
"$BIN/sppdet" train-svm "$unseen" --layer fc7 --quiet
# seen: every row (also the frozen d17 row of the tap study, rerun here); unseen: its fc7 row
[ -f "$seen/ablations.json" ] || "$BIN/sppdet" eval --voc2007 --run "$seen" --devkit "$D" \
    --split val --ablations --json "$seen/ablations.json"
[ -f "$unseen/fc7.json" ] || "$BIN/sppdet" eval --voc2007 --run "$unseen" --devkit "$D" \
    --split val --scorer svm --layer fc7 --no-bbox-reg --name val_fc7 --json "$unseen/fc7.json"
"$BIN/python" -m experiments.tap_study --out results/svm_unseen_voc300.json \
    --protocol "VOC2007 train images 1-300 (fine-tuning, 1,500 steps) -> first 300 val images, 1 scale (688); fc7 SVMs trained on train images 1-300 (seen by fine-tuning) or 301-600 (unseen)" \
    --row "fc7 SVMs on the fine-tuning images (train 1-300)=$seen" \
    --row "fc7 SVMs on images fine-tuning never saw (train 301-600)=$unseen"
