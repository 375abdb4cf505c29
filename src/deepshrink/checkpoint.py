"""Checkpoints that carry a model's architecture and compression state (masks, codebooks).

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True``::

    {"deepshrink_checkpoint": 1,
     "model": {"arch": "lenet300", "kwargs": {...}}        # or {"factory": "pkg.mod:fn", ...}
     "state_dict": {...},            # includes parametrization tensors (original, mask, ...)
     "compression": {"fc1.weight": [{"kind": "masked"}], "fc2.weight": [{"kind": "shared", "bits": 4}]},
     "meta": {...}}                  # JSON-like: dataset, metrics, stage history, configs
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compression import compression_state, restore_compression
from .errors import CheckpointError
from .files import atomic_write

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_spec: dict, meta: dict | None = None) -> Path:
    """Write ``model`` with its spec and compression state atomically (temp file, then rename)."""
    payload = {
        "deepshrink_checkpoint": FORMAT_VERSION,
        "model": model_spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "compression": compression_state(model),
        "meta": meta or {},
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint dict safely (``weights_only=True``); checks the layout, not the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/unsafe files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "deepshrink_checkpoint" not in payload:
        raise CheckpointError(f"{path}: not a deepshrink checkpoint (expected a dict with 'deepshrink_checkpoint')")
    if payload["deepshrink_checkpoint"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload['deepshrink_checkpoint']}, expected {FORMAT_VERSION}")
    return payload


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model (architecture, masks, codebooks, weights) from a checkpoint.

    Returns:
        (model, payload) where payload holds "model" (the spec), "compression" and "meta".
    """
    from .models import build_model  # models imports nothing from here; local import keeps layering clear

    payload = read_checkpoint(path)
    model = build_model(payload["model"])
    restore_compression(model, payload["compression"], payload["state_dict"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {payload['model']}: {e}") from None
    return model.to(map_location), payload
