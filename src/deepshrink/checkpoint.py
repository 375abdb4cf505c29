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

from .parametrizations import compression_state, restore_compression
from .data import check_dataset_record
from .errors import CheckpointError, ConfigError
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
    """Read a checkpoint dict safely (``weights_only=True``); checks the layout, not the model.

    Raises:
        CheckpointError: a missing or unreadable file, or a payload that fails ``check_payload``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/unsafe files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    check_payload(payload, str(path))
    return payload


#: what each top-level entry must be; other keys are ignored (room for later additions)
PAYLOAD_TYPES: dict[str, type] = {"model": dict, "state_dict": dict, "compression": dict, "meta": dict}


def check_payload(payload: Any, where: str) -> None:
    """Check a loaded checkpoint's structure before anything is built from it.

    A checkpoint comes from a file, so every entry is checked for its type: a version this reader
    knows, the four entries of ``PAYLOAD_TYPES``, string tensor names mapping to tensors, and
    compression entries that are lists of ``{"kind": ...}`` objects.

    Raises:
        CheckpointError: naming the first entry that does not fit.
    """

    def fail(message: str) -> None:
        raise CheckpointError(f"{where}: {message}")

    if not isinstance(payload, dict) or "deepshrink_checkpoint" not in payload:
        fail("not a deepshrink checkpoint (expected a dict with 'deepshrink_checkpoint')")
    version = payload["deepshrink_checkpoint"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        fail(f"checkpoint version {version!r}, expected {FORMAT_VERSION}")
    missing = [key for key in PAYLOAD_TYPES if key not in payload]
    if missing:
        fail(f"missing entr{'y' if len(missing) == 1 else 'ies'} {missing}")
    for key, kind in PAYLOAD_TYPES.items():
        if not isinstance(payload[key], kind):
            fail(f"'{key}' must be a {kind.__name__}, got {type(payload[key]).__name__}")
    for name, tensor in payload["state_dict"].items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            fail(f"'state_dict' must map names to tensors, got {name!r}: {type(tensor).__name__}")
    for fqn, entries in payload["compression"].items():
        if not isinstance(fqn, str) or not isinstance(entries, list):
            fail(f"'compression' must map weight names to lists, got {fqn!r}: {type(entries).__name__}")
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("kind"), str)):
                fail(f"'compression' entry of {fqn!r} must be a dict with a 'kind' string, got {entry!r}")
    if payload["meta"].get("dataset") is not None:  # what eval and sweeps load data by
        check_dataset_record(payload["meta"]["dataset"], f"{where}: meta 'dataset'", CheckpointError, stored=True)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, trust_factory: bool = False
) -> tuple[nn.Module, dict]:
    """Rebuild the model (architecture, masks, codebooks, weights) from a checkpoint.

    The model is bounded before it is allocated: its state dict may hold no more elements than the
    checkpoint stores (``build_model`` counts them on the meta device), so a spec with inflated kwargs
    fails at once.

    Args:
        trust_factory: build a ``{"factory": "pkg.module:fn"}`` spec, which imports and runs the code
            the checkpoint names. Off by default: a checkpoint may come from anyone.

    Returns:
        (model, payload) where payload holds "model" (the spec), "compression" and "meta".

    Raises:
        CheckpointError: an unreadable or malformed file, an untrusted factory, a spec that does not
            build or asks for more than the file holds, or weights that do not fit the model.
    """
    from .models import MAX_MODEL_ELEMENTS, build_model  # models imports nothing from here; keeps layering clear

    payload = read_checkpoint(path)
    stored = sum(t.numel() for t in payload["state_dict"].values())
    try:  # the limit is what the file stores: a real checkpoint holds every weight of its model
        model = build_model(payload["model"], trust_factory=trust_factory, max_elements=min(stored, MAX_MODEL_ELEMENTS))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        restore_compression(model, payload["compression"], payload["state_dict"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # the file is untrusted: names, kinds or shapes the model cannot take
        raise CheckpointError(f"{path}: weights do not fit model {payload['model']}: {type(e).__name__}: {e}") from None
    return model.to(map_location), payload
