"""The public API of stage 4: a model to a compressed file (``compress_model``) and back (``load``).

``compress_model`` encodes the model (``encode.py``), writes the container (``format.py``) once and
accounts for it from the encoded streams still in memory (``accounting.py``): nothing is read back
or decoded unless ``verify=True``. ``load`` validates and decodes the file once and builds the model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from . import models
from .accounting import FileReport, account
from .codecs.common import jsonable
from .encode import EncodeConfig, encode_model
from .errors import ConfigError, DeepShrinkError, FormatError, TensorInfoMismatch
from .format import (DEFAULT_MAX_EXPANSION, TIED_KEY, inspect_file, read_file, serialize, tied_aliases, with_aliases,
                     write_chunks)
from .layers import retie, tied_weights

log = logging.getLogger(__name__)


def compress_model(
    model: nn.Module,
    path: str | os.PathLike,
    config: EncodeConfig = EncodeConfig(),
    *,
    model_spec: dict | None = None,
    meta: dict | None = None,
    verify: bool = False,
) -> FileReport:
    """Write ``model`` as a compressed file and return its accounting.

    Args:
        model: any module; weights with a ``SharedWeights`` parametrization are entropy coded, every
            other tensor of the plain state dict is stored raw. The model is not modified.
        path: destination, written atomically.
        config: coder, index bits, stored float precision.
        model_spec: ``{"arch": ...}`` or ``{"factory": ...}`` so that ``load`` can rebuild the model.
        meta: free JSON metadata (dataset, accuracy, configs).
        verify: read the file back, decode every stream and check that its accounting
            (``format.inspect_file``) equals the one made from memory.

    Raises:
        ConfigError: bad settings, or spec/meta that are not plain JSON.
        FormatError: ``verify`` found the file on disk disagreeing with what was written.
    """
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict or None, got {type(meta).__name__}")
    meta = {"encode": jsonable(dataclasses.asdict(config)), **(meta or {})}  # the caller's keys win
    tied = tied_weights(model)
    if tied:  # stored once, under the first name; the loader points the aliases back at it
        meta[TIED_KEY] = tied
    tensors = encode_model(model, config)
    chunks = serialize(tensors, model_spec, meta)
    path = write_chunks(path, chunks)
    file_report = account(tensors, path=str(path), file_bytes=path.stat().st_size, header_bytes=len(chunks[0]))
    if verify and inspect_file(path) != file_report:
        raise FormatError(f"{path}: the file read back does not account like the tensors written")
    log.info("%s: %d bytes, %.1fx smaller than dense float32", path, file_report.file_bytes, file_report.ratio)
    return file_report


def load(
    path: str | os.PathLike,
    map_location: str | torch.device | None = None,
    *,
    model: nn.Module | None = None,
    trust_factory: bool = False,
    max_expansion: int = DEFAULT_MAX_EXPANSION,
    max_memory: int | None = None,
) -> nn.Module | dict[str, torch.Tensor]:
    """Load a compressed file into a model: ``model`` if given, else one built from the file's spec.

    With ``model`` (any module the caller built, e.g. the same factory with the same arguments), the
    file's tensors must match its state dict exactly, names and shapes; the error lists every
    difference. Without it, a built-in spec is built; a ``{"factory": "pkg.mod:fn"}`` spec imports and
    runs code named by the file, so it is built only with ``trust_factory=True``, and otherwise the
    state dict is returned. The architecture is first built on the meta device and compared with the
    file, so a spec with inflated kwargs cannot make the loader allocate a huge model. Tied weights
    (stored once) are tied again in the returned model.

    Args:
        map_location: device of the result; default: CPU, or the given model's own device.
        max_expansion, max_memory: bound the decoding, as in ``format.read_file``.

    Raises:
        every error of ``read_file``; TensorInfoMismatch when the tensors do not fit the model;
        ConfigError for a spec that does not build.
    """
    header, tensors = read_file(path, max_expansion=max_expansion, max_memory=max_memory)
    tied = tied_aliases(header, tensors, str(path))
    tensors = with_aliases(header, tensors, str(path))
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _fill(model, tensors, tied, f"{path}: into the given {type(model).__name__}")
        return model if map_location is None else model.to(map_location)
    map_location = map_location or "cpu"
    spec = header["model"]
    if spec is None or ("factory" in spec and not trust_factory):
        if spec is not None:
            log.warning("%s: model factory %r not built (pass trust_factory=True if you trust the file); "
                        "returning the state dict", path, spec["factory"])
        return {k: v.to(map_location) for k, v in tensors.items()}
    where = f"{path}: model {spec}"

    def build(spec: dict) -> nn.Module:  # one gate for files and checkpoints: build_model's
        return models.build_model(spec, trust_factory=trust_factory)

    try:
        with torch.device("meta"):  # no memory: a spec with inflated kwargs is caught by the shape check
            expected = build(spec).state_dict()
    except DeepShrinkError:  # unknown arch, kwargs the constructor does not take
        raise
    except Exception:  # code that cannot run on the meta device, or rejects the kwargs: the real build decides
        expected = None
    _check_fits(expected, tensors, where)
    model = _build(build, spec, where)
    _fill(model, tensors, tied, where)
    return model.to(map_location)


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str], where: str) -> None:
    """Strict name/shape check, then ``load_state_dict`` and re-tying of tied weights."""
    _check_fits(model.state_dict(), tensors, where)
    try:
        retie(model, tied)
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ConfigError) as e:
        raise TensorInfoMismatch(f"{where}: tensors do not fit: {e}") from None


def _build(build_model: Callable, spec: dict, where: str) -> nn.Module:
    try:
        return build_model(spec)
    except DeepShrinkError:
        raise
    except Exception as e:  # kwargs from the file that a constructor rejects (negative sizes...)
        raise ConfigError(f"{where}: cannot build the model ({type(e).__name__}: {e})") from None


def _check_fits(expected: dict[str, torch.Tensor] | None, tensors: dict[str, torch.Tensor], where: str) -> None:
    if expected is None:
        return
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    shapes = [f"{name} {tuple(tensors[name].shape)} in the file, {tuple(t.shape)} in the model"
              for name, t in expected.items() if name in tensors and tuple(t.shape) != tuple(tensors[name].shape)]
    parts = [f"{label} ({len(items)}): {', '.join(items[:10])}{', ...' if len(items) > 10 else ''}"
             for label, items in (("missing from the file", missing), ("not in the model", unexpected),
                                  ("shape mismatch", shapes)) if items]
    if parts:
        raise TensorInfoMismatch(f"{where}: the file does not fit the model; " + "; ".join(parts))
