"""Codecs ``raw`` (a tensor's bytes, C order, little-endian) and ``constant`` (a tensor of one repeated
value, stored as that value in the header: reset BatchNorm statistics, zero biases, step counters)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from deepshrink.codecs import TensorCodec, TensorToStore, register_codec
from deepshrink.codecs.common import (DTYPES, MAX_TENSOR_ELEMENTS, check_entry, dtype_name, expect, stored_float)
from deepshrink.errors import ConfigError, TensorInfoMismatch

_TORCH_TO_NAME = {t: name for name, (_, t) in DTYPES.items()}
STORABLE = tuple(sorted(DTYPES))  # dtype names a raw or constant entry may state


@dataclass(frozen=True)
class RawTensor:
    """A tensor stored as its bytes: ``array`` is C-ordered in a dtype of ``DTYPES``."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype


@dataclass(frozen=True)
class ConstantTensor:
    """A tensor whose elements are all one value, stored as that value (no payload bytes). ``value`` is
    a Python number that the dtype holds exactly (``constant_value``)."""

    shape: tuple[int, ...]
    dtype: np.dtype  # one of DTYPES
    value: int | float | bool

    @property
    def array(self) -> np.ndarray:
        return np.full(self.shape, self.value, dtype=self.dtype)


def encode_raw(tensor: torch.Tensor, raw_dtype: str = "float32", where: str = "tensor") -> RawTensor | ConstantTensor:
    """Raw entry: floats converted to ``raw_dtype``, integers and bools kept as they are; a tensor
    whose stored elements are all one value becomes a ``ConstantTensor``.

    Raises:
        ConfigError: a dtype the format cannot store (complex, unsigned > 8 bits...).
    """
    array = stored_array(tensor, raw_dtype, where)
    value = constant_value(array)
    return RawTensor(array) if value is None else ConstantTensor(array.shape, array.dtype, value)


def stored_array(tensor: torch.Tensor, raw_dtype: str = "float32", where: str = "tensor") -> np.ndarray:
    """The C-ordered numpy array a raw entry stores: floats as ``raw_dtype``, other dtypes as they are."""
    tensor = tensor.detach().cpu()
    if tensor.dtype.is_floating_point:
        name = stored_float(raw_dtype, f"{where}: raw_dtype")
        tensor = tensor.float()  # bfloat16 has no numpy dtype; float32 holds it exactly
    else:
        name = _TORCH_TO_NAME.get(tensor.dtype)
        if name is None:
            raise ConfigError(f"{where}: dtype {tensor.dtype} cannot be stored; supported: {', '.join(DTYPES)}")
    if tensor.numel() > MAX_TENSOR_ELEMENTS:
        raise ConfigError(f"{where}: {tensor.numel()} elements exceed the format's limit {MAX_TENSOR_ELEMENTS}")
    return tensor.numpy().astype(DTYPES[name][0], order="C")  # astype copies; keeps 0-d shape


def constant_value(array: np.ndarray) -> int | float | bool | None:
    """The one value all elements of ``array`` hold, bit for bit (so -0.0 is not 0.0), as a Python
    number that JSON writes and reads back exactly; None if they differ, the array is empty or the
    value is not finite (JSON has no NaN)."""
    if array.size == 0:
        return None
    flat = np.ascontiguousarray(array).reshape(-1)
    as_bytes = flat.view(np.uint8).reshape(flat.size, flat.dtype.itemsize)
    if not (as_bytes == as_bytes[0]).all():
        return None
    value = flat[0].item()
    return value if not isinstance(value, float) or math.isfinite(value) else None


@register_codec
class RawCodec(TensorCodec):
    name = "raw"
    tensor_type = RawTensor
    first_version = 1
    KEYS = {"codec", "dtype", "shape"}  # + offsets and crc32 in versions 1-2
    options = {"raw_dtype": "how tensors stored raw (biases, BatchNorm statistics) store floats"}

    def encode(self, tensor: TensorToStore, config) -> RawTensor | None:
        """Any tensor that is not coded over a codebook, as its bytes."""
        if tensor.quantized is not None:
            return None
        return RawTensor(stored_array(tensor.values, config.raw_dtype, tensor.name))

    def entry(self, name: str, tensor: RawTensor, add) -> dict:
        array = tensor.array
        dtype = dtype_name(array.dtype, name)
        data = array.astype(DTYPES[dtype][0], order="C").tobytes()
        return {"codec": "raw", "dtype": dtype, "shape": [int(d) for d in array.shape], **add(data)}

    def check(self, entry: dict, name: str, at: str, sections) -> tuple[int, int]:
        expected = check_entry(entry, sections.keys(self.KEYS), at, STORABLE) * DTYPES[entry["dtype"]][0].itemsize
        length = sections.add(entry, at, name, expected)
        expect(length == expected, at, f"section holds {length} bytes, shape {entry['shape']} of "
               f"{entry['dtype']} needs {expected}", TensorInfoMismatch)
        return 0, expected

    def view(self, name: str, entry: dict, span, at: str) -> RawTensor:
        return RawTensor(np.frombuffer(span(name), dtype=DTYPES[entry["dtype"]][0]).reshape(entry["shape"]))

    def decode(self, tensor: RawTensor, where: str) -> np.ndarray:
        if tensor.array.dtype == np.bool_ and tensor.array.size:
            largest = int(tensor.array.view(np.uint8).max())
            if largest > 1:
                raise TensorInfoMismatch(f"{where}: bool tensor holds byte {largest}, expected 0 or 1")
        return tensor.array.copy()  # own, writable memory (a file's raw tensors view its bytes)

    def stored_bytes(self, tensor: RawTensor) -> int:
        return tensor.array.nbytes

    def account(self, tensor: RawTensor, where: str) -> dict:
        return {"nonzero": int(np.count_nonzero(tensor.array)), "stored_bytes": tensor.array.nbytes}


@register_codec
class ConstantCodec(TensorCodec):
    name = "constant"
    tensor_type = ConstantTensor
    first_version = 3
    KEYS = {"codec", "dtype", "shape", "value"}

    def encode(self, tensor: TensorToStore, config) -> ConstantTensor | None:
        """A tensor of one repeated value (as stored raw), as that value: no payload bytes."""
        if tensor.quantized is not None:
            return None
        array = stored_array(tensor.values, config.raw_dtype, tensor.name)
        value = constant_value(array)
        return None if value is None else ConstantTensor(array.shape, array.dtype, value)

    def entry(self, name: str, tensor: ConstantTensor, add) -> dict:
        return {"codec": "constant", "dtype": dtype_name(tensor.dtype, name),
                "shape": [int(d) for d in tensor.shape], "value": tensor.value}

    def check(self, entry: dict, name: str, at: str, sections) -> tuple[int, int]:
        """dtype, shape and value (a number the dtype holds exactly). No bytes in the file: its elements
        count against max_expansion like a coded tensor's."""
        numel = check_entry(entry, self.KEYS, at, STORABLE)
        value, dtype = entry["value"], DTYPES[entry["dtype"]][0]
        kind = bool if dtype.kind == "b" else float if dtype.kind == "f" else int
        exact = type(value) is kind and (kind is not float or math.isfinite(value))
        if exact and kind is int:
            exact = np.iinfo(dtype).min <= value <= np.iinfo(dtype).max
        if exact and kind is float and dtype.itemsize < 8:
            with np.errstate(over="ignore"):  # 1e300 as float16 is inf: not exact, and no warning for it
                exact = np.array(value, dtype=dtype).item() == value
        expect(exact, at, f"constant value {value!r} is not a {entry['dtype']} (the type and the exact value must "
               "fit)", TensorInfoMismatch)
        return numel, numel * dtype.itemsize

    def view(self, name: str, entry: dict, span, at: str) -> ConstantTensor:
        return ConstantTensor(tuple(entry["shape"]), DTYPES[entry["dtype"]][0], entry["value"])

    def decode(self, tensor: ConstantTensor, where: str) -> np.ndarray:
        return tensor.array

    def stored_bytes(self, tensor: ConstantTensor) -> int:
        return 0  # the value is in the header

    def account(self, tensor: ConstantTensor, where: str) -> dict:
        return {"nonzero": math.prod(tensor.shape) if tensor.value else 0, "stored_bytes": 0}
