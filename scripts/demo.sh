#!/usr/bin/env bash
# The main job on the embedded default (scikit-learn's digits): train, prune, retrain, quantize, encode.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/deepshrink" demo "$@"
