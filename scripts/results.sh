#!/usr/bin/env bash
# Regenerate the runs and sweeps behind docs/results.md (CPU: about 1.5 hours on 2 cores).
# Outputs go to runs/ and sweeps/; each holds report.md / sweep.md with its tables and plots.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
ds=.venv/bin/deepshrink
mnist=../shared/datasets/mnist
$ds run lenet300-mnist --data-dir $mnist --out runs/lenet300-mnist "$@"
$ds run lenet300-mnist-sparse --data-dir $mnist --out runs/lenet300-mnist-sparse "$@"
$ds run lenet5-mnist --data-dir $mnist --out runs/lenet5-mnist "$@"
$ds run recipes/resnet20-cifar10-cpu.yaml --out runs/resnet20-cifar10-cpu "$@"
$ds run recipes/resnet20-cifar10-24x-cpu.yaml --out runs/resnet20-cifar10-24x-cpu "$@"
dense=runs/resnet20-cifar10-cpu/02-train/checkpoint.pt     # the JPEG-adapted dense model
pruned=runs/resnet20-cifar10-cpu/04-finetune/checkpoint.pt # q=50, retrained
$ds sweep prune-std "$dense" --out sweeps/prune-std --epochs 0
$ds sweep prune-percentile "$dense" --out sweeps/prune-percentile --epochs 1
$ds sweep bits "$pruned" --out sweeps/bits --epochs 0
$ds sweep init "$pruned" --out sweeps/init --epochs 0
