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
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import CheckpointError
from .layers import resolve, tie_parametrizations
from .prune import Masked
from .quantize import SharedWeights

FORMAT_VERSION = 1
PARAMETRIZATIONS: dict[str, type[nn.Module]] = {Masked.kind: Masked, SharedWeights.kind: SharedWeights}


def compression_state(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Describe every parametrization deepshrink attached: ``{fqn: [{"kind": ..., **options}]}``."""
    state: dict[str, list[dict[str, Any]]] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            entries = []
            for p in plist:
                if type(p) not in PARAMETRIZATIONS.values():
                    raise CheckpointError(f"{module_name}.{param_name}: unknown parametrization {type(p).__name__}")
                entry: dict[str, Any] = {"kind": p.kind}
                if isinstance(p, SharedWeights):
                    entry["bits"] = p.bits
                    if p.gradient != "sum":
                        entry["gradient"] = p.gradient
                entries.append(entry)
            state[f"{module_name}.{param_name}" if module_name else param_name] = entries
    return state


def restore_compression(
    model: nn.Module, compression: dict[str, list[dict[str, Any]]], state_dict: dict[str, torch.Tensor]
) -> None:
    """Attach placeholder parametrizations so that ``model.load_state_dict(state_dict)`` fits."""
    for fqn, entries in compression.items():
        module, param_name = resolve(model, fqn)
        prefix = f"{fqn.rpartition('.')[0]}.parametrizations.{param_name}".lstrip(".")
        for i, entry in enumerate(entries):
            cls = PARAMETRIZATIONS.get(entry.get("kind"))
            if cls is None:
                raise CheckpointError(f"{fqn}: unknown compression kind {entry.get('kind')!r}")
            key = f"{prefix}.{i}."
            tensors = {k[len(key):]: v for k, v in state_dict.items() if k.startswith(key)}
            options = {k: v for k, v in entry.items() if k != "kind"}
            try:
                p = cls.from_state(tensors, **options)
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"{fqn}: saved {entry['kind']} state is incomplete ({e})") from None
            parametrize.register_parametrization(module, param_name, p, unsafe=True)
    tie_parametrizations(model)  # tied weights: one mask/codebook object under every name


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


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path`` and rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
