#!/usr/bin/env bash
# The offline end-to-end demo: synthetic VOC-format data -> extract -> train -> eval -> detect.
# Usage: scripts/demo.sh [OUT_DIR]   (make demo; env DEVICE, DEMO_DATA: scripts/gpu_check.sh)
set -euo pipefail
OUT=${1:-runs/demo}
BIN=${BIN:-.venv/bin}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)

if [ -n "${DEMO_DATA:-}" ]; then
    # Premade data and proposals (scripts/gpu_check.sh --prepare: its GPU machine cannot
    # compute selective search, having no opencv-contrib).
    cp -r "$DEMO_DATA/data" "$OUT/data"
    mkdir -p "$OUT/run" && cp -r "$DEMO_DATA/run/proposals" "$OUT/run/"
else
    "$BIN/sppdet" make-synthetic "$OUT/data" --images 160 --seed 0
fi
# DEVICE (e.g. cuda) goes into the run's config, so every later stage runs there too.
"$BIN/sppdet" extract --devkit "$OUT/data" --split train --out "$OUT/run" \
    --config configs/demo.yaml ${DEVICE:+--device "$DEVICE"}
"$BIN/sppdet" train "$OUT/run"
"$BIN/sppdet" train-svm "$OUT/run" --layer pool5   # the paper's "pool5, no fine-tuning" row
# All trained test-time variants in one pass; val_fc7_bb is the paper's full system and
# val_random scores the same proposals at random (the chance level).
"$BIN/sppdet" eval --voc2007 --run "$OUT/run" --devkit "$OUT/data" --split val --ablations \
    --json "$OUT/eval.json"
first=$(head -n 1 "$OUT/data/VOC2007/ImageSets/Main/val.txt")
# Draw what the SVMs call positive (score > 0, R-CNN's test-time threshold).
"$BIN/sppdet" detect "$OUT/data/VOC2007/JPEGImages/$first.jpg" --run "$OUT/run" \
    --out-image "$OUT/detections.png" --score-threshold 0 --json "$OUT/detections.json"

"$BIN/python" - "$OUT" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
r = json.load(open(f"{out}/eval.json"))
chance = r["val_random"]["map"]
print(f"\ndemo mAP (VOC07 11-point, synthetic val, ft fc7 SVM + bbox reg): "
      f"{100 * r['val_fc7_bb']['map']:.1f}  (random scores on the same proposals: {100 * chance:.1f})")
print(f"detections drawn on {out}/detections.png; PR curves in {out}/run/eval/val_fc7_bb/pr_curves.png")
print(f"demo wall time: {time.time() - start:.0f} s")
PY
