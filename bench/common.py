"""What every benchmark records beside its figures (machine, versions, commit, date) and how it writes them.

Benchmarks run as scripts (``python bench/NAME.py``), so this folder is on ``sys.path`` and they
import it as ``common``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def machine_info(**extra) -> dict:
    """The machine, Python/numpy/torch/deepshrink versions, UTC date and git commit; ``extra`` is added
    (a benchmark's own library versions, thread counts...)."""
    import torch

    import deepshrink

    try:
        sha, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", None
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
        "deepshrink": deepshrink.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha, "git_dirty": dirty, **extra,
    }


def write_text(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all (temp file, then rename), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, results: dict, indent: int = 2) -> None:
    write_text(path, json.dumps(results, indent=indent) + "\n")
