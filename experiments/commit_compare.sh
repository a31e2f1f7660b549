#!/usr/bin/env bash
# Runs one 300 -> 300 experiment (extract, train, pool5 SVMs, eval --ablations) at several
# commits side by side, to show what a refactor changed (issue 18's check):
#   bash experiments/commit_compare.sh OUT CONFIG NAME=REV[^REVERT] ...
# Each NAME gets a git worktree at REV (../sppdet-at-NAME, beside this checkout, since the
# configs find the data at ../shared), optionally with commit REVERT reverted, sharing this
# checkout's .venv by hard links; runs go to OUT/NAME, one lane per NAME with one thread.
# Then: python -m experiments.commit_compare --out FILE OUT/NAME.ablations.json ...
# Resumable: rerun the same command (every stage skips what is done).
set -euo pipefail
out=$(realpath -m "$1"); config=$2; shift 2
here=$(git rev-parse --show-toplevel)
lane() {
    local name=${1%%=*} spec=${1#*=}
    local rev=${spec%%^*} revert="" wt="$here/../sppdet-at-$name"
    [ "$spec" != "$rev" ] && revert=${spec#*^}
    if [ ! -d "$wt" ]; then
        git -C "$here" worktree add -f --detach "$wt" "$rev" >/dev/null
        [ -n "$revert" ] && git -C "$wt" revert --no-edit --no-commit "$revert"
        cp -al "$here/.venv" "$wt/.venv"
        for f in "$wt"/.venv/lib/python3*/site-packages/__editable__* "$wt"/.venv/bin/*; do
            if [ -f "$f" ] && [ ! -L "$f" ] && grep -q "$here" "$f"; then
                sed "s#$here#$(realpath "$wt")#g" "$f" > "$f.tmp" && rm "$f" && mv "$f.tmp" "$f"
                chmod +x "$f"
            fi
        done
    fi
    cd "$wt"
    local r=$out/$name b=.venv/bin d=../shared/data/VOCdevkit t="/usr/bin/time -f %e_s_%M_KB"
    echo "$name: $(git rev-parse HEAD)${revert:+ with $revert reverted} $(date -u +%FT%TZ)"
    $t $b/sppdet extract --devkit $d --split train --limit 300 --out "$r" --config "$config"
    $t $b/sppdet train "$r" --quiet
    $t $b/sppdet train-svm "$r" --layer pool5 --quiet
    $t $b/sppdet eval --voc2007 --run "$r" --devkit $d --split val --limit 300 --ablations \
        --json "$r.ablations.json"
}
mkdir -p "$out"
export OMP_NUM_THREADS=1
for spec in "$@"; do (lane "$spec" > "$out/${spec%%=*}.log" 2>&1) & done
wait
