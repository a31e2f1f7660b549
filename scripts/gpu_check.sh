#!/usr/bin/env bash
# Issue 7, deliverable 4: the whole pipeline on a GPU, in one call of the device tool (a GPU
# machine is lent to some sessions only, 15 minutes of device time in all; see docs/reproducing.md).
#
# Here, first (CPU, a minute): pack what the GPU machine cannot reach (../shared does not
# travel; its python has torch but not our pins, pycocotools or opencv-contrib):
#   .venv/bin/python scripts/pack_bench.py --run runs/voc07_1s \
#       --devkit ../shared/data/VOCdevkit --split val --limit 10 --out bench_pack
#   bash scripts/gpu_check.sh --prepare        # synthetic data + its proposals, made on the CPU
# Then on the device:  run(command="bash scripts/gpu_check.sh", carry=["bench_pack"],
#                          timeout_s=480)
# It writes to $OUT (the device tool's folder; runs/gpu_check here): the test log, the synthetic
# pipeline's eval.json and detections, and benchmarks/bench_voc07_val_cuda.json's twin.
set -uo pipefail
PACK=bench_pack
if [ "${1:-}" = "--prepare" ]; then
    set -e
    BIN=${BIN:-.venv/bin}
    rm -rf "$PACK/synth"
    "$BIN/sppdet" make-synthetic "$PACK/synth/data" --images 160 --seed 0  # as scripts/demo.sh
    for split in train val; do  # default ProposalConfig = configs/demo.yaml's
        "$BIN/sppdet" proposals --devkit "$PACK/synth/data" --split "$split" --out "$PACK/synth/run"
    done
    du -sh "$PACK"
    exit 0
fi
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}  # dry run here: PATH=$PWD/.venv/bin:$PATH DEVICE=cpu BENCH_LIMIT=1 bash scripts/gpu_check.sh
BENCH_LIMIT=${BENCH_LIMIT:-10}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "== $* ($(date +%T))"; }
step "machine"
nvidia-smi -L || echo "no nvidia-smi"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
step "install (no deps: the image has torch, numpy, scipy, sklearn, cv2, numba, click, tqdm)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
SPPDET="$(dirname "$(command -v python3)")/sppdet"
step "tests (those needing pycocotools / opencv-contrib / selectivesearch fail there: not ours)"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -15
step "synthetic pipeline on $DEVICE: scripts/demo.sh (extract -> train -> eval -> detect)"
BIN=$(dirname "$(command -v python3)") DEVICE=$DEVICE DEMO_DATA=$PACK/synth \
    bash scripts/demo.sh runs/gpu_demo
echo "synthetic pipeline rc=$?"
cp runs/gpu_demo/eval.json "$OUT/demo_eval.json"
cp runs/gpu_demo/detections.png runs/gpu_demo/detections.json "$OUT/"
step "bench: VOC07 val, the packed run, $DEVICE"
# float32 convs use TF32 on CUDA; float16 is the autocast path (bf16 on a CPU dry run).
half=float16 && [ "$DEVICE" = cpu ] && half=bfloat16
# R-CNN mode's windows per conv pass: 8 is the fastest measured on the 2-core CPU (small batches
# stay in cache, benchmarks/rcnn_batch_*_fp32.json); a GPU wants large batches. 64 is a guess,
# not a measurement: sweep --rcnn-batch there before calling the ratio final.
rcnn_batch=${RCNN_BATCH:-64} && [ "$DEVICE" = cpu ] && rcnn_batch=${RCNN_BATCH:-8}
rm -rf "$PACK/run/proposals"  # imported from $PACK/proposals.npz for this --limit
for dtype in float32 "$half"; do
    "$SPPDET" bench --devkit "$PACK/VOCdevkit" --split val --limit "$BENCH_LIMIT" \
        --run "$PACK/run" --device "$DEVICE" --conv-dtype "$dtype" --quiet \
        --rcnn-batch "$rcnn_batch" \
        --name "bench_voc07_val_${DEVICE}_$dtype" --out-dir "$OUT"
done
step "done"
