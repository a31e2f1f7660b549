#!/usr/bin/env bash
# make repro-1scale / repro-5scale: issue 6's check. Reruns the committed VOC07 experiment on a
# clean clone of HEAD and compares its mAP, variant by variant, with results/<name>_*.json.
#
#   bash experiments/repro.sh voc07_mnv2_1scale voc07-1scale
#
# The clone goes beside this checkout (REPRO_DIR, default ../sppdet-repro-<name>) because the
# configs find the data at ../shared relative to the working directory. A clone, not this tree:
# uncommitted edits cannot leak in, and the rerun's recorded commit is clean. Interrupted? Run
# the same command again: the clone is reused when it is at HEAD and its stages resume.
# Writes results/reproductions/<name>.json; exits 1 if any variant differs by > 0.5 points.
set -euo pipefail
name=$1
target=$2
head=$(git rev-parse HEAD)
dir=${REPRO_DIR:-../sppdet-repro-$name}
if [ -e "$dir" ]; then
    at=$(git -C "$dir" rev-parse HEAD 2>/dev/null || echo none)
    if [ "$at" != "$head" ]; then
        echo "$dir exists at commit $at, not HEAD $head: remove it or set REPRO_DIR" >&2
        exit 2
    fi
else
    git clone -q "$(git rev-parse --show-toplevel)" "$dir"
fi
mkdir -p "$dir/runs"
(cd "$dir" && make venv && make "$target") 2>&1 | tee -a "$dir/runs/repro_$name.log"
mkdir -p results/reproductions
"${BIN:-.venv/bin}/python" -m experiments.repro_check --name "$name" --rerun "$dir/results" \
    --out "results/reproductions/$name.json"
