#!/usr/bin/env bash
# Regenerate the runs and sweeps behind docs/results.md. No GPU needed: about 3 hours on an idle
# 2-core CPU for the runs (resnet20-cifar10-24x alone: 65 minutes, its sweeps 37) and the 1-epoch sweeps below, plus
# the ResNet-20 validation-split run (resnet20-cifar10-gradual-cpu: 5 epochs of 15,000 JPEG images;
# 65 minutes on 2026-11-29 with one thread at nice 10 on the 2-core machine shared with six other
# jobs; about 11 minutes with one thread when idle) and its sweeps with retraining (one epoch of
# 15,000 images per point: prune-percentile's 4 points took 12 minutes with one thread on the nearly
# idle machine, so the 16 points below are about 50 minutes).
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
# past the paper on both axes (validation split, 2-px shifts, coder auto): minutes each with one thread
$ds run lenet300-mnist-40x --data-dir $mnist --out runs/lenet300-mnist-40x "$@"
$ds run lenet5-mnist-39x --data-dir $mnist --out runs/lenet5-mnist-39x "$@"
# the same with dependent quantization (each repeats its base recipe's training: about 75 and 30 minutes)
$ds run lenet300-mnist-dq --data-dir $mnist --out runs/lenet300-mnist-dq "$@"
$ds run lenet5-mnist-dq --data-dir $mnist --out runs/lenet5-mnist-dq "$@"
$ds run lenet5-mnist-100x --data-dir $mnist --out runs/lenet5-mnist-100x "$@"
# the same pruning with ECSQ + quantization-aware retraining (repeats lenet5-mnist-100x's training)
$ds run lenet5-mnist-130x --data-dir $mnist --out runs/lenet5-mnist-130x "$@"
# ECSQ + quantization-aware retraining (repeats lenet300-mnist-sparse's training: about 75 minutes)
$ds run lenet300-mnist-100x --data-dir $mnist --out runs/lenet300-mnist-100x "$@"
# ResNet-20 with full 45,000-image epochs (22 of them): 65 minutes on the idle 2-core machine
$ds run resnet20-cifar10-24x --out runs/resnet20-cifar10-24x "$@"
# the lab's weight-sharing tables at full length and the rate sweep, from that run's q=50 checkpoint
# (one 45,000-image epoch of centroid training per point: about 3.2 minutes each, 37 minutes in all)
cifar=../shared/datasets/cifar10-jpeg
fpruned=runs/resnet20-cifar10-24x/04-finetune/checkpoint.pt
$ds sweep bits "$fpruned" --out sweeps/r20-bits-full --data-dir $cifar --epochs 1 --lr 0.001
$ds sweep init "$fpruned" --out sweeps/r20-init-full --data-dir $cifar --epochs 1 --lr 0.001
$ds sweep rate "$fpruned" --out sweeps/r20-50-v3 --data-dir $cifar --split validation --epochs 1 --lr 0.001 \
    --bits 4 --lambdas 0.01 0.03 --coder auto --raw-dtype float16 --fold-batchnorm
# 24x from the 75% checkpoint: 8 more epochs, 12 more distilled from the dense reference, ECSQ 0.04
# (about 45 + 60 + 12 minutes with one thread on the idle machine)
r24=runs/r20-24x-from-75 && mkdir -p $r24
$ds finetune runs/resnet20-cifar10-24x/06-finetune/checkpoint.pt --data-dir $cifar --epochs 8 --lr 0.01 \
    --weight-decay 1e-4 --schedule cosine --validation 5000 --keep-best --out $r24/r20-75long.pt
$ds finetune $r24/r20-75long.pt --data-dir $cifar --epochs 12 --lr 0.005 --weight-decay 1e-4 --schedule cosine \
    --validation 5000 --keep-best --teacher runs/resnet20-cifar10-24x/02-train/checkpoint.pt --out $r24/r20-75kd.pt
$ds quantize $r24/r20-75kd.pt --method ecsq --lambda 0.04 --bits 4 --init linear --train-centroids --epochs 2 \
    --lr 0.001 --weight-decay 0 --validation 5000 --data-dir $cifar --out $r24/ecsq-0.04.pt
$ds encode $r24/ecsq-0.04.pt --coder auto --raw-dtype float16 --codebook-dtype float16 --fold-batchnorm --out $r24/ecsq-0.04.dsz
$ds eval $r24/ecsq-0.04.dsz --split validation --data-dir $cifar && $ds eval $r24/ecsq-0.04.dsz --data-dir $cifar
# the same 75% model with quantization-aware retraining instead of centroid training alone (ECSQ 0.035 and
# 0.04, 8 distilled epochs of reassignment, 1 of centroid training; about 40 minutes each with two threads)
teacher=runs/resnet20-cifar10-24x/02-train/checkpoint.pt
for lam in 0.035 0.04; do
    q=$r24/qat-$lam
    $ds quantize $r24/r20-75kd.pt --method ecsq --lambda $lam --bits 4 --init linear --out $q-ecsq.pt
    $ds finetune $q-ecsq.pt --data-dir $cifar --epochs 8 --lr 0.005 --weight-decay 1e-4 --schedule cosine \
        --validation 5000 --keep-best --teacher $teacher --reassign-lambda $lam --out $q-reassigned.pt
    $ds finetune $q-reassigned.pt --data-dir $cifar --epochs 1 --lr 0.001 --weight-decay 0 --validation 5000 \
        --keep-best --teacher $teacher --out $q-centroids.pt
    $ds encode $q-centroids.pt --coder auto --raw-dtype float16 --codebook-dtype float16 --fold-batchnorm --out $q.dsz
    $ds eval $q.dsz --split validation --data-dir $cifar && $ds eval $q.dsz --data-dir $cifar
done
$ds run recipes/resnet20-cifar10-cpu.yaml --out runs/resnet20-cifar10-cpu "$@"
$ds run recipes/resnet20-cifar10-24x-cpu.yaml --out runs/resnet20-cifar10-24x-cpu "$@"
dense=runs/resnet20-cifar10-cpu/02-train/checkpoint.pt     # the JPEG-adapted dense model
pruned=runs/resnet20-cifar10-cpu/04-finetune/checkpoint.pt # q=50, retrained
$ds sweep prune-std "$dense" --out sweeps/prune-std --epochs 0
$ds sweep prune-percentile "$dense" --out sweeps/prune-percentile --epochs 1
$ds sweep bits "$pruned" --out sweeps/bits --epochs 0
$ds sweep init "$pruned" --out sweeps/init --epochs 0

# ResNet-20 with a 5,000-image validation split held out of training; sweeps retrain on the other
# images (one epoch of 15,000 per point) and report test accuracy; --split validation measures on the
# validation split instead, for anything that chooses (e.g. per-layer q from the sensitivity sweep)
$ds run recipes/resnet20-cifar10-gradual-cpu.yaml --out runs/resnet20-gradual "$@"
gdense=runs/resnet20-gradual/02-train/checkpoint.pt      # dense reference (1 epoch on JPEG images)
gpruned=runs/resnet20-gradual/04-finetune/checkpoint.pt  # q=50 (conv1 25, fc 35), retrained
$ds sweep prune-std "$gdense" --out sweeps/gradual-prune-std --epochs 1
$ds sweep prune-percentile "$gdense" --out sweeps/gradual-prune-percentile --epochs 1
$ds sweep bits "$gpruned" --out sweeps/gradual-bits --epochs 1 --lr 0.001
$ds sweep init "$gpruned" --out sweeps/gradual-init --epochs 1 --lr 0.001
$ds sweep sensitivity "$gdense" --out sweeps/gradual-sensitivity --split validation
