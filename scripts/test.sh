#!/usr/bin/env bash
# The test suite. Tests that need ../shared/datasets or ../shared/pretrained skip when those are absent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
