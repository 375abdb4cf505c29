#!/usr/bin/env bash
# Regenerate the runs behind docs/results.md (CPU: about 1.5 hours on 2 cores). Outputs go to runs/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
ds=.venv/bin/deepshrink
$ds run lenet300-mnist --data-dir ../shared/datasets/mnist --out runs/lenet300-mnist "$@"
$ds run lenet5-mnist --data-dir ../shared/datasets/mnist --out runs/lenet5-mnist "$@"
$ds run recipes/resnet20-cifar10-cpu.yaml --out runs/resnet20-cifar10-cpu "$@"
$ds run recipes/resnet20-cifar10-24x-cpu.yaml --out runs/resnet20-cifar10-24x-cpu "$@"
