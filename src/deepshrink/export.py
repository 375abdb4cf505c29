"""A compressed model as an ONNX graph that ONNX Runtime runs: dense, or palettized (weight sharing kept).

``to_onnx`` decodes a ``.dsz`` file (``deepshrink.load``), traces the model with PyTorch's TorchScript
exporter and writes the graph. Palettized, every float initializer with few distinct values (the
quantized weights: their decoded values are exactly the codebook) is stored as uint8 indices (uint16
above 256 levels, uint4 from opset 21 where 16 levels suffice) plus a float32 codebook, rebuilt by
``Cast(indices -> int32)`` and ``Gather(codebook, indices)``, standard operators. Index 0 is 0.0 where
a tensor has zeros (pruned weights), so the index tensors also compress well.

Why the TorchScript exporter (``dynamo=False``): it needs only ``onnx``, while the dynamo exporter of
torch 2.13 also needs ``onnxscript``; it exported the tested models several times faster (a trial on
the 2-core VM: 0.1-0.9 s against 1.2-4.4 s per model); its initializers keep the state-dict names;
and its errors name the unsupported ``aten`` op. It writes opsets up to 20, so a higher ``opset`` is
reached with ``onnx.version_converter``. It is deprecated in torch 2.13: a torch without it needs the
dynamo exporter here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
import warnings

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, DeepShrinkError, ExportError
from .files import atomic_write
from .palettize import PalettizedTensor, names_in, palettize

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # a dense graph's: run by ONNX Runtime >= 1.14 and most other runtimes; nothing needs newer ops
MIN_OPSET = 13  # the oldest opset tried here; Cast and Gather as used need nothing newer
TORCHSCRIPT_MAX_OPSET = 20  # the highest opset torch's TorchScript exporter writes
UINT4_OPSET = 21  # uint4 tensors and Cast from them (ONNX Runtime >= 1.23 runs that Cast)
INPUT_NAME, OUTPUT_NAME = "input", "output"
INPUT_DTYPES = ("float32", "int64")
TRACE_BATCH, VERIFY_BATCH = 2, 3  # verified at another batch size than traced: the batch axis must be dynamic


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What ``to_onnx`` wrote."""

    path: str
    onnx_bytes: int
    opset: int
    input_shape: tuple[int, ...]  # one sample; the batch axis (and a token sequence axis) is dynamic
    input_dtype: str
    palettized: tuple[PalettizedTensor, ...]
    max_abs_diff: float | None  # ONNX Runtime vs PyTorch on VERIFY_BATCH inputs; None when not verified
    metadata: dict[str, str]


def to_onnx(
    source: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    trust_factory: bool = False,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str | None = None,
    opset: int | None = None,
    palettized: bool = False,
    verify: bool = True,
) -> ExportReport:
    """Export a compressed file's model (or a model) to ONNX, written atomically to ``out``.

    Args:
        source: a ``.dsz`` file, or a module (e.g. one filled by ``deepshrink.load(path, model=m)``).
        model: with a file, the module to fill from it (a file made from a user model).
        trust_factory: build the ``pkg.module:fn`` factory the file names (runs its code).
        input_shape: one sample's shape, e.g. (3, 32, 32), or (sequence length,) for token ids;
            default: the file's dataset record ``image_shape``.
        input_dtype: "float32" or "int64" (token ids); default int64 for Hugging Face models.
        opset: ONNX opset of the graph; default ``DEFAULT_OPSET`` for a dense graph and ``UINT4_OPSET`` for a
            palettized one (uint4 indices: half the bytes of uint8 where 16 levels suffice; ONNX Runtime
            >= 1.23; pass 18 for older runtimes).
        palettized: store shared weights as indices plus codebook (see the module docstring).
        verify: run the graph with ONNX Runtime and compare it with PyTorch before writing.

    Returns:
        an ``ExportReport``.

    Raises:
        ConfigError: bad arguments, no input shape, a file that names no buildable model.
        ExportError: onnx/onnxruntime missing, an op or layer the exporter cannot convert, a graph that
            fails ``onnx.checker`` or whose ONNX Runtime outputs differ from PyTorch's.
        FormatError, WriteError: from reading the file or writing ``out``.
    """
    onnx = _import_onnx()
    opset = _check_opset((UINT4_OPSET if palettized else DEFAULT_OPSET) if opset is None else opset, onnx)
    module, record, where = _load_source(source, model, trust_factory)
    hugging_face = _is_hugging_face(module)
    token_input = hugging_face if input_dtype is None else _check_dtype(input_dtype) == "int64"
    shape = _input_shape(input_shape, record, where)
    metadata = dataset_metadata(record)
    traced = _TokenLogits(module) if hugging_face else module
    example = _example_input(module, shape, token_input, TRACE_BATCH)
    with _eval_mode(traced):
        proto = onnx.load_from_string(_torch_export(traced, example, opset, token_input, where))
        if traced is not module:  # the wrapper's attribute name is no part of the model's tensor names
            _strip_prefix(proto.graph, "model.")
        if opset > TORCHSCRIPT_MAX_OPSET:
            proto = _convert_opset(proto, opset, where)
        tensors = palettize(proto, packed=opset >= UINT4_OPSET) if palettized else []
        metadata.update(_input_metadata(shape, token_input, tensors))
        onnx.helper.set_model_props(proto, metadata)
        try:
            onnx.checker.check_model(proto)
            data = proto.SerializeToString()
        except Exception as e:  # checker errors, or a graph over protobuf's 2 GB limit
            raise ExportError(f"{where}: the exported graph is not valid ONNX ({type(e).__name__}: {e})") from None
        checked = _example_input(module, shape, token_input, VERIFY_BATCH)
        diff = _verify(traced, data, checked, where) if verify else None
    path = atomic_write(out, lambda f: f.write(data))
    log.debug("%s: %d bytes, opset %d, %d palettized tensors", path, len(data), opset, len(tensors))
    return ExportReport(str(path), len(data), opset, shape, "int64" if token_input else "float32", tuple(tensors),
                        diff, metadata)


# ---------------------------------------------------------------- metadata (from an untrusted record)


def dataset_metadata(record) -> dict[str, str]:
    """ONNX ``metadata_props`` from a file's dataset record: only well-formed values, as strings.

    The record comes from the file (untrusted): values of the wrong type, size or range are left out.
    """
    if not isinstance(record, dict):
        return {}
    out: dict[str, str] = {}
    name = record.get("name")
    if isinstance(name, str) and 0 < len(name) <= 64 and name.isprintable():
        out["dataset"] = name
    shape = _image_shape(record)
    if shape:
        out["image_shape"] = json.dumps(list(shape))
    mean, std = _floats(record.get("mean")), _floats(record.get("std"))
    if mean and std and len(mean) == len(std) and all(s > 0 for s in std) and (not shape or len(mean) == shape[0]):
        out["mean"], out["std"] = json.dumps(mean), json.dumps(std)
        out["preprocessing"] = ("input = (pixel / 255 - mean) / std per channel, pixels 0..255 in (N, C, H, W) "
                                "order")
    classes = record.get("num_classes")
    if _is_int(classes) and 0 < classes <= 1_000_000:
        out["num_classes"] = str(classes)
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_shape(record) -> tuple[int, ...] | None:
    shape = record.get("image_shape") if isinstance(record, dict) else None
    if (isinstance(shape, list) and 1 <= len(shape) <= 4
            and all(_is_int(v) and 0 < v <= 65536 for v in shape)):
        return tuple(shape)
    return None


def _floats(values) -> list[float] | None:
    if (isinstance(values, list) and 1 <= len(values) <= 16 and all(isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        return [float(v) for v in values]
    return None


def _input_metadata(shape: tuple[int, ...], token_input: bool, tensors: list[PalettizedTensor]) -> dict[str, str]:
    axes = "batch,sequence" if token_input else ",".join(["batch", *map(str, shape)])
    out = {"input": f"{INPUT_NAME}: {'int64 token ids' if token_input else 'float32'} [{axes}]"}
    if tensors:
        bits = sorted({t.index_bits for t in tensors})
        out["palettized"] = (f"{len(tensors)} weight tensors as uint{'/uint'.join(map(str, bits))} indices + float32 "
                             "codebook, rebuilt by Cast and Gather")
    return out


# ---------------------------------------------------------------- the model and its input


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'deepshrink[onnx]'") from None
    return onnx


def _check_opset(opset, onnx) -> int:
    newest = onnx.defs.onnx_opset_version()
    if not _is_int(opset) or not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"opset must be an integer from {MIN_OPSET} to {newest} (onnx {onnx.__version__}), "
                          f"got {opset!r}")
    return opset


def _check_dtype(dtype) -> str:
    if dtype not in INPUT_DTYPES:
        raise ConfigError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {dtype!r}")
    return dtype


def _load_source(source, model: nn.Module | None, trust_factory: bool) -> tuple[nn.Module, dict | None, str]:
    """(model, dataset record or None, label for messages)."""
    if isinstance(source, nn.Module):
        if model is not None:
            raise ConfigError("pass either a module as the source or a file with model=, not both")
        return source, None, type(source).__name__
    from .compress import load  # deepshrink.load's dense runtime
    from .format import open_file

    file = open_file(source)  # read and checked once: the record below is the gate's checked one
    spec = file.model_spec
    if model is None and spec and "factory" in spec and not trust_factory:
        raise ConfigError(f"{source}: the file was made from the user model {spec['factory']!r}; build it "
                          "yourself and pass it (--model pkg.module:factory, model=), or trust the factory the "
                          "file names (--trust-factory, trust_factory=True; this imports and runs its code)")
    loaded = load(file, model=model, trust_factory=trust_factory)
    if not isinstance(loaded, nn.Module):
        raise ConfigError(f"{source}: the file names no model to build; pass the model it was made from "
                          "(--model pkg.module:factory, or model= in Python)")
    return loaded, file.dataset, str(source)


def _input_shape(shape, record, where: str) -> tuple[int, ...]:
    if shape is None:
        found = _image_shape(record)
        if found is None:
            raise ConfigError(f"{where}: no input shape: the file records no dataset image shape; pass one "
                              "sample's shape, e.g. --input-shape 3,32,32 (input_shape=(3, 32, 32))")
        return found
    shape = tuple(shape)
    if not 1 <= len(shape) <= 8 or not all(_is_int(v) and 0 < v <= 65536 for v in shape):
        raise ConfigError(f"input shape must be 1 to 8 positive integers (one sample, no batch axis), got {shape!r}")
    return shape


def _is_hugging_face(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # never imported here: a model of it means it is loaded
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


class _TokenLogits(nn.Module):
    """A Hugging Face model as token ids -> its first output (logits), with no cache and an all-ones attention
    mask: the same outputs for unpadded input, and a graph without data-dependent packed-sequence checks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False,
                         return_dict=False)
        return out[0]


def _example_input(module: nn.Module, shape: tuple[int, ...], token_input: bool, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    device = next(module.parameters(), torch.empty(0)).device  # the trace runs where the model is
    if token_input:
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        high = vocab if _is_int(vocab) and vocab > 0 else 1
        return torch.randint(0, high, (batch, *shape), generator=generator).to(device)
    return torch.randn((batch, *shape), generator=generator).to(device)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode for the export; every submodule's own flag restored after (``train(flag)`` would not)."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _torch_export(module: nn.Module, example: torch.Tensor, opset: int, token_input: bool, where: str) -> bytes:
    axes = {0: "batch", 1: "sequence"} if token_input else {0: "batch"}
    buffer = io.BytesIO()
    try:
        # not under no_grad: TransformerEncoderLayer would take its fused fast path, which has no ONNX form
        with _onnx_log_to_debug(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # constant folding off: folding would merge BatchNorm into the conv weights and reshape others,
            # losing the shared values; ONNX Runtime folds at session creation anyway
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=False,
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}})
    except torch.onnx.errors.UnsupportedOperatorError as e:
        op = re.search(r"'([\w.]+::[\w.]+)'", str(e))
        layers = _layers_using(module, example, op.group(1)) if op else []
        at = f" in layer(s) {', '.join(layers)}" if layers else ""
        raise ExportError(f"{where}: cannot export to ONNX{at}: {e}") from None
    except DeepShrinkError:
        raise
    except Exception as e:  # the trace itself failed: a forward that rejects the input, outputs that are not tensors
        message = " ".join(str(e).split())[:500]
        raise ExportError(f"{where}: cannot export to ONNX with an input of shape {tuple(example.shape)} "
                          f"{example.dtype} ({type(e).__name__}: {message})") from None
    for message in {str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)}:
        log.info("%s: while tracing: %s", where, message)
    return buffer.getvalue()


def _strip_prefix(graph, prefix: str) -> None:
    """Rename the initializers called ``prefix + name`` to ``name``, and their uses."""
    taken = names_in(graph)
    renamed = {t.name: t.name[len(prefix):] for t in graph.initializer
               if t.name.startswith(prefix) and t.name[len(prefix):] not in taken}
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def _layers_using(module: nn.Module, example: torch.Tensor, op: str) -> list[str]:
    """'name (Class)' of the layers whose traced forward calls ``op`` (e.g. 'aten::diff'); [] if unknown."""
    try:
        with warnings.catch_warnings():  # traced as exported: with grad enabled
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(module, (example,), check_trace=False, strict=False).inlined_graph
    except Exception:  # only a better message was at stake
        return []
    prefix = "model." if isinstance(module, _TokenLogits) else ""
    inner = module.model if prefix else module
    layers = []
    for node in graph.nodes():
        if node.kind() == op:
            name = node.scopeName().rsplit("/", 1)[-1].removeprefix("__module.").removeprefix(prefix)
            name = "" if name in ("__module", "model") else name
            with contextlib.suppress(AttributeError):
                label = f"{name or '(the model itself)'} ({type(inner.get_submodule(name)).__name__})"
                if label not in layers:
                    layers.append(label)
    return layers


@contextlib.contextmanager
def _onnx_log_to_debug():
    """Route torch's ONNX log to our debug log for the duration.

    torch 2.13's TorchScript exporter leaves that log on (its switch tests a function object, which is
    always true) and prints the whole IR graph to stdout when a conversion fails; our error names the
    op and the layer instead. A missing hook (another torch) is left alone.
    """
    hook = getattr(torch._C, "_jit_onnx_log", None)
    if hook is None:
        yield
        return
    torch._C._jit_onnx_log = lambda *parts: log.debug("torch.onnx: %s", " ".join(map(str, parts))[:20000])
    try:
        yield
    finally:
        torch._C._jit_onnx_log = hook


def _convert_opset(proto, opset: int, where: str):
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, opset)
    except Exception as e:
        raise ExportError(f"{where}: cannot convert the graph from opset {TORCHSCRIPT_MAX_OPSET} to {opset} "
                          f"({type(e).__name__}: {e}); choose opset <= {TORCHSCRIPT_MAX_OPSET}") from None
    del converted.graph.value_info[:]  # the converter's inferred shapes: 3% of a ResNet-20 file; runtimes infer them
    return converted


def _verify(module: nn.Module, data: bytes, x: torch.Tensor, where: str) -> float:
    """Largest |ONNX Runtime - PyTorch| over the outputs on ``x``; raises ExportError above float32 tolerance."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("verifying the export needs onnxruntime: pip install 'deepshrink[onnx]' "
                          "(or pass --no-verify / verify=False)") from None
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: x.cpu().numpy()})
    except Exception as e:
        raise ExportError(f"{where}: ONNX Runtime {ort.__version__} cannot run the exported graph "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:500]})") from None
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _tensors(module(x))]
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        raise ExportError(f"{where}: ONNX Runtime outputs {[g.shape for g in got]}, PyTorch "
                          f"{[e.shape for e in expected]} for a batch of {len(x)}: the traced graph does not "
                          "generalise (is the batch size baked into a reshape?)")
    diff = max((float(np.max(np.abs(g - e))) if g.size else 0.0) for g, e in zip(got, expected))
    scale = max([1.0] + [float(np.max(np.abs(e))) for e in expected if e.size])
    if not diff <= 1e-4 * scale:  # also catches NaN
        raise ExportError(f"{where}: ONNX Runtime's outputs differ from PyTorch's by up to {diff:.3g} (tolerance "
                          f"{1e-4 * scale:.3g}): the trace does not match the model (data-dependent control flow?)")
    return diff


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a model's output, in the order the exporter flattens them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []
