"""The public API of stage 4: a model to a compressed file (``compress_model``) and back (``load``).

``compress_model`` encodes the model one tensor at a time (``encode.py``), in threads, writes each to
the container as its turn comes (``format.write_tensors``) and accounts for it from its streams in
memory (``accounting.account_row``): nothing is read back or decoded unless ``verify=True``, and no
more than a few encoded tensors are held. ``load`` opens the file through the one gate
(``format.open_file``), finds the model it fills (``model_for``: also what the sparse runtime uses)
and decodes every tensor into its place once, one at a time.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from . import models
from .accounting import FileReport, account_row, dense_bytes_of, report_from_rows
from .encode import EncodeConfig, encode_tensor, model_tensors
from .errors import ConfigError, DeepShrinkError, FormatError, TensorInfoMismatch
from .format import DEFAULT_MAX_EXPANSION, TIED_KEY, CompressedFile, inspect_file, open_file, write_tensors
from .layers import place, retie, tied_weights
from .parallel import map_in_order, map_unordered
from .progress import tensor_progress

log = logging.getLogger(__name__)


def compress_model(
    model: nn.Module,
    path: str | os.PathLike,
    config: EncodeConfig = EncodeConfig(),
    *,
    model_spec: dict | None = None,
    meta: dict | None = None,
    verify: bool = False,
    workers: int | None = None,
    progress: bool = True,
    exhaustive: bool = False,
) -> FileReport:
    """Write ``model`` as a compressed file and return its accounting.

    Tensors are encoded one at a time, ``workers`` at once, each written (and accounted) as soon as its
    turn comes in name order, so memory holds the model plus a few tensors in flight; the file's bytes
    do not depend on ``workers``.

    Args:
        model: any module; weights with a ``SharedWeights`` parametrization are entropy coded, every
            other tensor of the plain state dict is stored raw. The model is not modified.
        path: destination, written atomically.
        config: coder, index bits, stored float precision.
        model_spec: ``{"arch": ...}`` or ``{"factory": ...}`` so that ``load`` can rebuild the model.
        meta: free JSON metadata (dataset, accuracy, configs).
        verify: read the file back, decode every stream and check that its accounting
            (``format.inspect_file``) equals the one made from memory.
        workers: tensors encoded at once (threads); None = one per CPU.
        progress: a bar per tensor on a terminal (``progress.tensor_progress``).
        exhaustive: encode every codec in full on every tensor, even where ``estimate_bytes`` shows it
            cannot be the smallest (``encode.encode_tensor``).

    Raises:
        ConfigError: bad settings, or spec/meta that are not plain JSON.
        FormatError: ``verify`` found the file on disk disagreeing with what was written.
    """
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict or None, got {type(meta).__name__}")
    meta = {"encode": config.record(), **(meta or {})}  # the caller's keys win
    tied = tied_weights(model)
    if tied:  # stored once, under the first name; the loader points the aliases back at it
        meta[TIED_KEY] = tied
    tensors = model_tensors(model, config)
    names = sorted(tensors)  # the file's order
    rows, dense_bytes = [], 0

    def encode(name: str):
        return encode_tensor(tensors[name](), config, exhaustive=exhaustive)

    def written(advance):
        nonlocal dense_bytes
        for name, encoded in zip(names, map_in_order(encode, names, workers, release_memory=True)):
            rows.append(account_row(name, encoded, str(path)))
            dense_bytes += dense_bytes_of(encoded)
            advance(name)
            yield name, encoded

    with tensor_progress(f"writing {Path(path).name}", len(names), progress) as advance:
        path, header_bytes = write_tensors(path, written(advance), model_spec, meta, count=len(names))
    file_report = report_from_rows(rows, dense_bytes, path=str(path), file_bytes=path.stat().st_size,
                                   header_bytes=header_bytes)
    if verify and inspect_file(path) != file_report:
        raise FormatError(f"{path}: the file read back does not account like the tensors written")
    log.info("%s: %d bytes, %.1fx smaller than dense float32", path, file_report.file_bytes, file_report.ratio)
    return file_report


def load(
    path: str | os.PathLike | CompressedFile,
    map_location: str | torch.device | None = None,
    *,
    model: nn.Module | None = None,
    trust_factory: bool = False,
    max_expansion: int = DEFAULT_MAX_EXPANSION,
    max_memory: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> nn.Module | dict[str, torch.Tensor]:
    """Load a compressed file into a model: ``model`` if given, else one built from the file's spec.

    With ``model`` (any module the caller built, e.g. the same factory with the same arguments), the
    file's tensors must match its state dict exactly, names and shapes; the error lists every
    difference. Without it, a built-in spec is built; a ``{"factory": "pkg.mod:fn"}`` spec imports and
    runs code named by the file, so it is built only with ``trust_factory=True``, and otherwise the
    state dict is returned. Tied weights (stored once) are tied again in the returned model.

    Tensors are decoded one at a time (``workers`` at once) and each goes straight into its place: copied
    into the given model's own parameter or buffer, or, for a model built from the spec on the meta
    device, becoming it; memory holds the model plus a few tensors being decoded, never a second copy.
    So a stream that fails to decode (a file that passed every check of the gate, then holds a corrupt
    stream) raises once the tensors before it are in place: the given model then holds some of the
    file's tensors; load into a fresh model where that matters.

    Args:
        path: a ``.dsz`` file, or one already opened by ``format.open_file``.
        map_location: device of the result; default: CPU, or the given model's own device.
        max_expansion, max_memory: bound the decoding, as in ``format.open_file`` (for a path).
        workers: tensors decoded at once (threads); None = one per CPU.
        progress: a bar per tensor on a terminal.

    Raises:
        every error of ``open_file``; TensorInfoMismatch when the tensors do not fit the model;
        ConfigError for a spec that does not build.
    """
    file = path if isinstance(path, CompressedFile) else open_file(path, max_expansion=max_expansion,
                                                                   max_memory=max_memory)
    net = model_for(file, model, trust_factory=trust_factory, on_meta=model is None)
    if net is None:
        tensors = file.with_aliases(file.decode_all())
        return {k: v.to(map_location or "cpu") for k, v in tensors.items()}
    where = f"{file.path}: into the given {type(net).__name__}" if model is not None else \
        f"{file.path}: model {file.model_spec}"
    try:
        _fill(net, file, workers, progress)
    except (RuntimeError, ConfigError) as e:
        raise TensorInfoMismatch(f"{where}: tensors do not fit: {e}") from None
    if model is not None:
        return net if map_location is None else net.to(map_location)
    return net.to(map_location or "cpu")


def _fill(net: nn.Module, file: CompressedFile, workers: int | None, progress: bool) -> None:
    """Decode each stored tensor and put it in place: copied into ``net``'s tensor, or assigned where that is
    on the meta device (a model built there); the aliases of tied weights are tied again."""
    assign = any(t.is_meta for t in net.state_dict().values())
    if not assign:  # the aliases share their first name's storage, which the copy fills
        retie(net, file.tied)
    # largest first: the others decode on the remaining threads meanwhile (the order changes no value)
    names = sorted(file.encoded, key=lambda n: -math.prod(file.encoded[n].shape))
    with tensor_progress(f"loading {file.path.name}", len(names), progress) as advance:
        for name, tensor in map_unordered(file.decode, names, workers, release_memory=True):
            place(net, name, tensor, assign)
            advance(name)
    if assign:
        retie(net, file.tied)


def model_for(file: CompressedFile, model: nn.Module | None = None, *, trust_factory: bool = False,
              on_meta: bool = False) -> nn.Module | None:
    """The model ``file`` fills, checked to fit it (every name and shape) before any tensor is decoded.

    ``model`` when given; else the file's spec built (a built-in one, or a factory with
    ``trust_factory``): first on the meta device, so that a spec with inflated kwargs is caught by the
    shape check before anything is allocated, then for real unless ``on_meta`` (the caller assigns
    every tensor itself; a model holding buffers that no file stores is always built for real).
    None when the file names no model, or a factory that is not trusted (logged).

    Raises:
        TensorInfoMismatch: the file does not fit the model (every difference listed);
        ConfigError: ``model`` is not a module, or the spec does not build.
    """
    shapes = file.shapes()
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_fits(model.state_dict(), shapes, f"{file.path}: into the given {type(model).__name__}")
        return model
    spec = file.model_spec
    if spec is None or ("factory" in spec and not trust_factory):
        if spec is not None:
            log.warning("%s: model factory %r not built (pass trust_factory=True if you trust the file)",
                        file.path, spec["factory"])
        return None
    where = f"{file.path}: model {spec}"
    try:
        with torch.device("meta"):  # no memory: a spec with inflated kwargs is caught by the shape check
            built = models.build_model(spec, trust_factory=trust_factory)
    except DeepShrinkError:  # unknown arch, kwargs the constructor does not take
        raise
    except Exception:  # code that cannot run on the meta device, or rejects the kwargs: the real build decides
        built = None
    if built is not None:
        _check_fits(built.state_dict(), shapes, where)
        if on_meta and not set(dict(built.named_buffers())) - set(built.state_dict()):
            return built
    try:
        built = models.build_model(spec, trust_factory=trust_factory)
    except DeepShrinkError:
        raise
    except Exception as e:  # kwargs from the file that a constructor rejects (negative sizes...)
        raise ConfigError(f"{where}: cannot build the model ({type(e).__name__}: {e})") from None
    _check_fits(built.state_dict(), shapes, where)
    return built


def _check_fits(expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    mismatched = [f"{name} {shapes[name]} in the file, {tuple(t.shape)} in the model"
                  for name, t in expected.items() if name in shapes and tuple(t.shape) != shapes[name]]
    parts = [f"{label} ({len(items)}): {', '.join(items[:10])}{', ...' if len(items) > 10 else ''}"
             for label, items in (("missing from the file", missing), ("not in the model", unexpected),
                                  ("shape mismatch", mismatched)) if items]
    if parts:
        raise TensorInfoMismatch(f"{where}: the file does not fit the model; " + "; ".join(parts))
