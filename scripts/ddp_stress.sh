#!/bin/bash
# Distributed teardown under load: the 2-process DDP test N times and `torchrun ... deepshrink.cli train`
# M times while two CPU-bound processes run. Prints the pass counts.
# Usage: bash scripts/ddp_stress.sh [N=30] [M=10]   (from the repository root, with deepshrink importable)
set -u
N=${1:-30}; M=${2:-10}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1
OUT=$(mktemp -d)
nice -n 5 "$PY" -c 'while True: pass' & HOG1=$!
nice -n 5 "$PY" -c 'while True: pass' & HOG2=$!
trap 'kill $HOG1 $HOG2 2>/dev/null' EXIT
ok=0
for i in $(seq "$N"); do
  "$PY" -m pytest -q -x -p no:cacheprovider tests/test_train.py -k two_process > "$OUT/ddp_$i.log" 2>&1 && ok=$((ok+1))
done
cli=0
for i in $(seq "$M"); do
  "$PY" -m torch.distributed.run --nproc_per_node 2 --standalone -m deepshrink.cli -q train --model mlp \
    --dataset digits --epochs 1 --out "$OUT/cli_$i.pt" > "$OUT/cli_$i.log" 2>&1 && cli=$((cli+1))
done
echo "DDP test: $ok/$N passed; torchrun CLI train: $cli/$M exited 0 (logs in $OUT)"
