"""Codec ``grid``: a float tensor on a uniform grid, each element a signed level times one float32 step,
the levels coded by ``deepshrink.coding.level_coder`` with its standard context model.
``encode.EncodeConfig(grid_bits=b)`` stores 1-D float tensors (biases, norm scales) this way where it is
smaller than raw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deepshrink.codecs import TensorCodec, TensorToStore, register_codec
from deepshrink.codecs.common import (check_entry, check_levels_stream, decode_levels_stream, expect, int_field,
                                      levels_entropy)
from deepshrink.coding import level_coder, row_length_of
from deepshrink.config import check_bits
from deepshrink.errors import TensorInfoMismatch

#: A grid tensor's header entry deflates to about this many bytes more than the same tensor's raw
#: entry (45-47 measured with the dictionary, 10 to 256 elements)
GRID_HEADER_BYTES = 48


@dataclass(frozen=True)
class GridTensor:
    """A float tensor on a uniform grid: element = level x ``step``, the signed levels coded as one
    context-coded stream (see ``encode_grid``). No codebook: a bias needs hundreds of levels."""

    shape: tuple[int, ...]
    step: float  # > 0, a float32 value
    num_nonzero: int  # non-zero levels
    stream: bytes | memoryview  # a file's tensor views its bytes
    coder_params: dict  # deepshrink.coding.level_coder params
    levels_entropy_bits: float | None = None  # as CabacTensor's

    dtype = np.dtype("<f4")  # of the decoded tensor


def encode_grid(array: np.ndarray, bits: int, where: str = "tensor") -> GridTensor | None:
    """``array`` (float) rounded to the grid ``step x {-L..L}``, L = 2**(bits-1) - 1 and step = max|x| / L,
    its levels coded by ``cabac`` (rows as for a weight); None when there is no such grid (all zero,
    non-finite values, a step below float32's range).

    Every element moves by at most half a step, max|x| / (2**bits - 2): 8 bits keep a bias within 0.4%
    of the tensor's largest magnitude (float16: 0.05% of each value, at 16 bits a value; a 5- to 8-bit
    grid costs about 5 to 10 on biases).
    """
    bits = check_bits(bits, f"{where}: grid_bits", low=2)
    values = np.asarray(array, dtype=np.float64).reshape(-1)
    if not values.size or not np.isfinite(values).all():
        return None
    top = (1 << (bits - 1)) - 1
    step = np.float32(np.abs(values).max() / top)
    if not (np.isfinite(step) and step >= np.finfo(np.float32).tiny):
        return None
    levels = np.clip(np.rint(values / float(step)), -top, top).astype(np.int32)
    shape = tuple(int(d) for d in np.shape(array))
    stream, params = level_coder.encode(levels, row_length_of(shape))
    return GridTensor(shape=shape, step=float(step), num_nonzero=int(np.count_nonzero(levels)), stream=stream,
                      coder_params=params, levels_entropy_bits=levels_entropy(levels))


def decode_grid(coded: GridTensor, where: str = "tensor") -> np.ndarray:
    """Dense float32 array of a ``GridTensor``: each level times the step, in float32.

    Raises:
        CodecError: a malformed stream; TensorInfoMismatch: a non-zero count other than the header's.
    """
    levels = decode_levels_stream(coded.stream, coded.coder_params, math.prod(coded.shape), coded.num_nonzero, where)
    # float32(level) x float32(step) rounded to float32, as astype then multiply, in one pass
    return np.multiply(levels, np.float32(coded.step), dtype=np.float32).reshape(coded.shape)


@register_codec
class GridCodec(TensorCodec):
    name = "grid"
    tensor_type = GridTensor
    first_version = 4
    KEYS = {"codec", "dtype", "shape", "step", "num_nonzero", "coder_params", "levels_stream"}
    options = {"grid_bits": ("store each 1-D float tensor (biases, norm scales) as context-coded levels on a grid of "
                             "2^B-1 steps spanning its largest magnitude, where that is smaller than raw (lossy; "
                             "default: raw)")}

    def encode(self, tensor: TensorToStore, config) -> GridTensor | None:
        """1-D float tensors on the grid ``config.grid_bits`` asks for (None when it asks for none)."""
        if config.grid_bits is None or tensor.quantized is not None:
            return None
        values = tensor.values
        if values.dim() != 1 or not values.dtype.is_floating_point:
            return None
        return encode_grid(values.detach().cpu().float().numpy(), config.grid_bits, tensor.name)

    def entry(self, name: str, tensor: GridTensor, add) -> dict:
        return {
            "codec": self.name, "dtype": "float32", "shape": list(tensor.shape), "step": tensor.step,
            "num_nonzero": tensor.num_nonzero, "coder_params": tensor.coder_params,
            "levels_stream": add(tensor.stream, True),
        }

    def check(self, entry: dict, name: str, at: str, sections) -> tuple[int, int]:
        numel = check_entry(entry, self.KEYS, at)
        step = entry["step"]
        expect(type(step) is float and math.isfinite(step) and step > 0 and float(np.float32(step)) == step, at,
               f"grid step {step!r} is not a positive float32 value", TensorInfoMismatch)
        num_nonzero = int_field(entry, "num_nonzero", at, 0, numel)
        max_abs = check_levels_stream(entry, name, at, sections, num_nonzero)
        expect(entry["coder_params"]["context_model"] == level_coder.CONTEXT_MODEL, at,
               f"grid context model {entry['coder_params']['context_model']!r}, expected {level_coder.CONTEXT_MODEL!r}")
        with np.errstate(over="ignore"):
            largest = np.float32(max_abs) * np.float32(step)
        expect(bool(np.isfinite(largest)), at, f"grid step {step!r} x max_abs {max_abs} overflows float32",
               TensorInfoMismatch)
        return numel, 0

    def view(self, name: str, entry: dict, span, at: str) -> GridTensor:
        return GridTensor(shape=tuple(entry["shape"]), step=entry["step"], num_nonzero=entry["num_nonzero"],
                          stream=span(f"{name}/levels_stream"), coder_params=entry["coder_params"])

    def decode(self, tensor: GridTensor, where: str) -> np.ndarray:
        return decode_grid(tensor, where)

    def stored_bytes(self, tensor: GridTensor) -> int:
        return len(tensor.stream) + GRID_HEADER_BYTES  # compared with the same tensor raw: the header's extra share

    def account(self, tensor: GridTensor, where: str) -> dict:
        if tensor.levels_entropy_bits is None:  # read from a file: verify the stream as for coded tensors
            decode_grid(tensor, where)
        return {"nonzero": tensor.num_nonzero, "stored_bytes": len(tensor.stream)}
