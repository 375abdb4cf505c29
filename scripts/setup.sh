#!/usr/bin/env bash
# Create .venv (once) and install deepshrink with its test, bench, hf and onnx extras.
# Re-installs only when pyproject.toml changes. PyTorch is pinned to the CPU wheel torch==2.13.0
# first, so the later `torch>=2.2` requirement is already met and pip never fetches a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.deepshrink-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
    "${pip[@]}" -e "$root[test,bench,hf,onnx]"
    echo "$want" > "$stamp"
fi
