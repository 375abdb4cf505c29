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
from .encode import EncodeConfig, encode_model, jsonable
from .errors import ConfigError, DeepShrinkError, FormatError, TensorInfoMismatch
from .format import DEFAULT_MAX_EXPANSION, inspect_file, read_file, serialize, write_chunks

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
    map_location: str | torch.device = "cpu",
    *,
    trust_factory: bool = False,
    max_expansion: int = DEFAULT_MAX_EXPANSION,
) -> nn.Module | dict[str, torch.Tensor]:
    """Load a compressed file: a model with plain weights if its spec is a built-in, else the state dict.

    A ``{"factory": "pkg.mod:fn"}`` spec imports and runs code named by the file, so it is built only
    with ``trust_factory=True``. The architecture is first built on the meta device and compared with
    the file, so a spec with inflated kwargs cannot make the loader allocate a huge model.

    Raises:
        every error of ``read_file``; TensorInfoMismatch when the tensors do not fit the model;
        ConfigError for a spec that does not build.
    """
    header, tensors = read_file(path, max_expansion=max_expansion)
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
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise TensorInfoMismatch(f"{path}: tensors do not fit model {spec}: {e}") from None
    return model.to(map_location)


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
    if missing or unexpected:
        raise TensorInfoMismatch(f"{where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in expected.items():
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise TensorInfoMismatch(f"{where}: {name} has shape {tuple(tensors[name].shape)} in the file, "
                                     f"the model expects {tuple(t.shape)}")
