#!/usr/bin/env bash
# The runs behind the headline table (README.md, docs/results.md): each headline recipe with its seeds,
# one after another, then the table rewritten from them. No GPU needed. On the project's idle 2-core CPU,
# each run using both cores (torch's default threads; 2026-12-06 and 07): digits seconds each,
# lenet300-mnist-100x about 15 minutes, lenet5-mnist-130x about an hour, resnet20-cifar10-25x about
# 1.3 hours, resnet56-cifar10-ecsq about 2.8 (all 13 runs: about 11 hours; --device cuda is faster).
# A stopped run continues after its last finished epoch (--resume).
# Usage: bash scripts/headline_runs.sh [RUNS_DIR=runs/headlines]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
out=${1:-runs/headlines}
mnist=../shared/datasets/mnist
runs=()
run() {  # NAME SEED [extra arguments]
    local name=$1 seed=$2
    shift 2
    .venv/bin/deepshrink run "$name" --seed "$seed" --out "$out/$name-s$seed" --resume "$@"
    runs+=("$out/$name-s$seed")
}
for seed in 0 1 2; do run demo-digits $seed; run digits-60x $seed; done
for seed in 0 1 2; do run lenet300-mnist-100x $seed --data-dir $mnist; done
# runs of over 30 minutes: 2 seeds each
for seed in 0 1; do run lenet5-mnist-130x $seed --data-dir $mnist; done
for seed in 0 1; do run resnet20-cifar10-25x $seed; done
for seed in 0 1; do run resnet56-cifar10-ecsq $seed; done
.venv/bin/python scripts/headlines.py "${runs[@]}" --tables
