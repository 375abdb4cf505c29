#!/usr/bin/env bash
# The lab's tables at full length, from the ResNet-20 headline run's dense reference (its stage 2: the
# pretrained model fine-tuned on the JPEG training images, 5,000 held out for validation): pruning by
# s x std and by percentile q, each point retrained 2 full epochs; q=50 (uniform, as the lab) retrained
# 2 epochs; on it weight sharing at 6/5/4/3 bits and the four initialisations at 4 bits, each with one
# epoch of centroid training; and the lab's end-to-end file, q=50 + 4 bits + Huffman, inspected. Test
# accuracy throughout: these tables report, they choose nothing. 27 epochs over 45,000 images: 68 minutes
# with two threads on the idle 2-core CPU (2026-12-06), 3-4 hours with one thread beside other runs.
# Usage: bash scripts/lab_tables.sh RUN_DIR [OUT=runs/lab]   (RUN_DIR: a resnet20-cifar10-25x run)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
run=$1
out=${2:-runs/lab}
ds=.venv/bin/deepshrink
data=(--data-dir ../shared/datasets/cifar10-jpeg)  # checkpoints record their dataset, not where it is
dense=$run/02-train/checkpoint.pt
mkdir -p "$out"
# each step is skipped when its output exists and a sweep continues after its finished points, so a
# stopped run loses at most the point in progress
sweep() { [ -f "$out/$1/sweep.json" ] || $ds sweep "$@" "${data[@]}"; }
sweep prune-std "$dense" --out "$out/prune-std" --epochs 2 --lr 0.01
sweep prune-percentile "$dense" --out "$out/prune-percentile" --epochs 2 --lr 0.01
[ -f "$out/q50.pt" ] || { $ds prune "$dense" --method percentile --q 50 --out "$out/q50-pruned.pt" &&
    $ds finetune "$out/q50-pruned.pt" --epochs 2 --lr 0.01 --weight-decay 1e-4 --out "$out/q50.pt" "${data[@]}"; }
sweep bits "$out/q50.pt" --out "$out/bits" --epochs 1 --lr 0.001
sweep init "$out/q50.pt" --out "$out/init" --epochs 1 --lr 0.001
[ -f "$out/q50-4bit.pt" ] || $ds quantize "$out/q50.pt" --bits 4 --init linear --train-centroids --epochs 1 \
    --lr 0.001 --weight-decay 0 --out "$out/q50-4bit.pt" "${data[@]}"
$ds encode "$out/q50-4bit.pt" --coder huffman --out "$out/q50-4bit-huffman.dsz"
.venv/bin/python scripts/lab_tables.py "$out" "$run" "${data[@]}"
