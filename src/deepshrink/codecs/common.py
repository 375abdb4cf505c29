"""What the tensor codecs share: stored dtypes and limits, the header's dictionary and what an entry
costs in it, the loader's small schema checks, and the codebook and levels-stream parts that more than
one codec's entry holds."""

from __future__ import annotations

import json
import math
import zlib
from enum import Enum
from typing import Any, Callable

import numpy as np
import torch

from deepshrink.coding import entropy_bits, level_coder, row_length_of
from deepshrink.config import check_bits, enum_value
from deepshrink.errors import CodecError, ConfigError, DeepShrinkError, InvalidHeader, TensorInfoMismatch

MAX_TENSOR_ELEMENTS = 1 << 31  # per tensor; also bounds every symbol count
MAX_NDIM = 32
#: Format version 4's preset dictionary for the header's zlib stream (RFC 1950 FDICT; ``format.py``
#: deflates the header with it, ``header_share`` estimates with it): the JSON a header is made of, so
#: that deflate codes each key and stock value as a back-reference. It must never change (a version-4
#: reader needs these exact bytes; docs/format.md states its length and Adler-32). Deflate codes near
#: matches in fewer bits, so the commonest text comes last.
HEADER_DICTIONARY = "".join((
    '{"factory":"kwargs":{},"tied_weights":{"model":{"arch":"lenet300","lenet5","resnet20","mlp"},',
    '"dataset":{"augment":"shift","image_shape":[3,32,32],"mean":[0.485,0.456,0.406],"name":"imagefolder",',
    '"num_classes":10,"std":[0.229,0.224,0.225],"validation":5000},"image_shape":[1,28,28],"mean":[0.1307],',
    '"name":"mnist","std":[0.3081]},"recipe":"',
    '"codec":"deep_compression","coder":"ans","coder_params":{"frequencies":[,"model_precision":24,',
    '"perfect":false,"precision":"state_bits":64,"symbol_offset":1,"word_bits":32},',
    '.num_batches_tracked":{"codec":"constant","dtype":"int64","shape":[],"value":0},',
    '.running_mean":.running_var":{"codec":"constant","dtype":"float32","shape":[],"value":1.0},',
    '{"format":"deepshrink","meta":{"encode":{"codebook_dtype":"float16","coder":"auto","exclude":[],',
    '"fold_batchnorm":false,"grid_bits":null,"include":null,"index_bits_by_pattern":[],"index_bits_conv":8,',
    '"index_bits_fc":5,"raw_dtype":"float16"},"model":{"arch":"payload_crc32":"tensors":{"version":4}',
    '"codec":"deep_compression","coder":"huffman","coder_params":{"positions":{"bit_order":"msb",',
    '"code_lengths":"weights":{"bit_order":"msb","code_lengths":"},"dtype":"float32","index_bits":8,',
    '"num_entries":"num_nonzero":"positions_stream":{"bytes":"shape":["weights_stream":{"bytes":',
    '.bias":{"codec":"raw","dtype":"float16","shape":[',
    '.bias":{"codec":"grid","coder_params":{"context_model":"sig24-sign27-gt12k-eg0-warmup","init_prob":32768,',
    '"max_abs":127,"num_gt":32,"prob_bits":15,"row_length":"shifts":[4,7]},"dtype":"float32",',
    '"levels_stream":{"bytes":"num_nonzero":"shape":["step":',
    '.weight":{"bits":4,"codebook":{"dtype":"float32","size":"codec":"cabac","coder_params":{"context_model":',
    '"sig24-sign27-gt12k-eg0-warmup","init_prob":32768,"max_abs":"num_gt":32,"prob_bits":15,"row_length":',
    '"shifts":[4,7]},"dtype":"float32","levels_stream":{"bytes":"num_negative":"num_nonzero":"shape":[',
)).encode("ascii")

#: Stored dtype name -> (little-endian numpy dtype, torch dtype).
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float64": (np.dtype("<f8"), torch.float64),
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "int64": (np.dtype("<i8"), torch.int64),
    "int32": (np.dtype("<i4"), torch.int32),
    "int16": (np.dtype("<i2"), torch.int16),
    "int8": (np.dtype("i1"), torch.int8),
    "uint8": (np.dtype("u1"), torch.uint8),
    "bool": (np.dtype("?"), torch.bool),
}
CODED_DTYPES = ("float32",)  # dtype of a decoded weight or grid tensor
CODEBOOK_DTYPES = ("float32", "float16")
CODEBOOK_DTYPE_HELP = "how codebooks are stored (float16 halves them; decoded values are then rounded)"


class StoredFloat(str, Enum):
    """Float precision on disk. FLOAT16 halves raw tensors/codebooks; decoded values are then the
    float16-rounded numbers (bit-exact with respect to what is stored, not to the float32 model)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


def stored_float(value: Any, label: str) -> str:
    return enum_value(StoredFloat, value, label)


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy scalars/arrays and tuples converted) so the header serializes the same way."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Enum):
        return obj.value
    return obj


def header_share(params: dict) -> int:
    """About the bytes ``params`` add to a header: their JSON deflated with ``HEADER_DICTIONARY``, less
    an empty stream's. A Huffman table costs its code lengths; a cabac entry's constants almost nothing."""
    return _deflated_size(json.dumps(jsonable(params), sort_keys=True, separators=(",", ":"))) - _deflated_size("")


def _deflated_size(text: str) -> int:
    deflate = zlib.compressobj(9, zdict=HEADER_DICTIONARY)
    return len(deflate.compress(text.encode("ascii")) + deflate.flush())


def untrusted_call(fn: Callable, where: str, *args):
    """Call a coder on file data: its CodecError gets the tensor's name, anything else becomes a CodecError."""
    try:
        return fn(*args)
    except DeepShrinkError as e:
        raise type(e)(f"{where}: {e}") from e
    except Exception as e:  # a coder bug on hostile input must not escape as a numpy/constriction error
        raise CodecError(f"{where}: coder failed ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- encoding a weight over a codebook


def check_quantized(indices, codebook, bits, codebook_dtype, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(indices, flat codebook, stored codebook dtype name) after checking bits, sizes and index range.

    Raises:
        ConfigError: bad bits or dtype, too many centroids or elements, or an index outside 0..K.
    """
    check_bits(bits, f"{where}: bits")
    codebook_dtype = stored_float(codebook_dtype, f"{where}: codebook_dtype")
    codebook = np.asarray(codebook).reshape(-1)
    if len(codebook) > 1 << bits:
        raise ConfigError(f"{where}: {len(codebook)} centroids do not fit in {bits} bits")
    indices = np.asarray(indices)
    if indices.size > MAX_TENSOR_ELEMENTS:
        raise ConfigError(f"{where}: {indices.size} elements exceed the format's limit {MAX_TENSOR_ELEMENTS}")
    if indices.dtype.kind not in "iu":
        raise ConfigError(f"{where}: cluster indices must be integers, got {indices.dtype}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) > len(codebook)):
        bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
        raise ConfigError(f"{where}: cluster index {bad} outside 0..{len(codebook)}")
    return indices, codebook, codebook_dtype


def levels_entropy(levels: np.ndarray) -> float:
    """Memoryless entropy of signed levels in bits, zeros included (the context coder may go below it)."""
    if not levels.size:
        return 0.0
    max_abs = max(-int(levels.min()), int(levels.max()))  # no int64 copy of the levels
    return float(entropy_bits(levels + max_abs, 2 * max_abs + 1))


def decode_levels_stream(stream: bytes, params: dict, numel: int, num_nonzero: int, where: str) -> np.ndarray:
    """The flat int32 levels of a ``cabac`` stream, checked against the element and non-zero counts.

    Raises:
        CodecError: a malformed stream; TensorInfoMismatch: a count other than the header's.
    """
    levels = np.asarray(untrusted_call(level_coder.decode, f"{where}: levels stream", stream, params, numel))
    if levels.shape != (numel,):
        raise TensorInfoMismatch(f"{where}: levels stream decoded {levels.shape} levels, shape needs {numel}")
    nonzero = int(np.count_nonzero(levels))
    if nonzero != num_nonzero:
        raise TensorInfoMismatch(f"{where}: levels stream holds {nonzero} non-zeros, header says {num_nonzero}")
    return levels


# ---------------------------------------------------------------- header entries: writing and checking


def dtype_name(dtype: np.dtype, name: str) -> str:
    """The stored name of a numpy dtype (ConfigError if the format cannot store it)."""
    found = next((n for n, (d, _) in DTYPES.items() if d == dtype.newbyteorder("<")), None)
    if found is None:
        raise ConfigError(f"{name}: numpy dtype {dtype} is not storable; supported: {', '.join(DTYPES)}")
    return found


def codebook_entry(name: str, codebook: np.ndarray, add: Callable[[bytes], dict]) -> dict:
    """A codebook's header part, its values appended as a section."""
    cb_name = next((n for n in CODEBOOK_DTYPES if DTYPES[n][0] == codebook.dtype.newbyteorder("<")), None)
    if cb_name is None:
        raise ConfigError(f"{name}: codebook dtype {codebook.dtype}, expected one of {CODEBOOK_DTYPES}")
    return {"dtype": cb_name, "size": len(codebook), **add(codebook.astype(DTYPES[cb_name][0]).tobytes())}


def codebook_view(name: str, entry: dict, span: Callable[[str], memoryview]) -> np.ndarray:
    return np.frombuffer(span(f"{name}/codebook"), dtype=DTYPES[entry["codebook"]["dtype"]][0])


def one_of(value: Any, allowed) -> bool:
    return isinstance(value, str) and value in allowed  # a JSON list/object is unhashable: no TypeError


def expect(cond: bool, where: str, message: str, error: type[DeepShrinkError] = InvalidHeader) -> None:
    if not cond:
        raise error(f"{where}: {message}")


def check_keys(obj: Any, keys: set[str], where: str) -> None:
    expect(isinstance(obj, dict), where, f"expected a JSON object, got {type(obj).__name__}")
    unknown, missing = set(obj) - keys, keys - set(obj)
    expect(not unknown, where, f"unknown key(s) {sorted(unknown)}")
    expect(not missing, where, f"missing key(s) {sorted(missing)}")


def int_field(obj: dict, key: str, where: str, lo: int, hi: int) -> int:
    v = obj[key]
    expect(is_int(v), where, f"{key!r} must be an integer, got {v!r}")
    expect(lo <= v <= hi, where, f"{key!r}={v} outside {lo}..{hi}", TensorInfoMismatch)
    return int(v)


def check_entry(entry: dict, keys: set[str], at: str, dtypes=CODED_DTYPES) -> int:
    """An entry's key set, dtype and shape; returns its element count."""
    check_keys(entry, keys, at)
    expect(one_of(entry["dtype"], dtypes), at, f"dtype {entry['dtype']!r} not in {dtypes}")
    shape = entry["shape"]
    expect(isinstance(shape, list) and len(shape) <= MAX_NDIM, at,
           f"'shape' must be a list of at most {MAX_NDIM} integers, got {shape!r}")
    expect(all(is_int(d) and d >= 0 for d in shape), at, f"'shape' entries must be non-negative integers: {shape!r}")
    expect(all(d <= MAX_TENSOR_ELEMENTS for d in shape), at,
           f"shape {shape} has a dimension over {MAX_TENSOR_ELEMENTS}", TensorInfoMismatch)
    numel = math.prod(shape)
    expect(numel <= MAX_TENSOR_ELEMENTS, at, f"shape {shape} has {numel} elements, over the limit "
           f"{MAX_TENSOR_ELEMENTS}", TensorInfoMismatch)
    return numel


def check_codebook(codebook: Any, bits: int, name: str, at: str, sections) -> int:
    """Check a codebook part (keys, dtype, K <= 2**bits, section length); returns K."""
    check_keys(codebook, sections.keys({"dtype", "size"}), f"{at}: codebook")
    expect(one_of(codebook["dtype"], CODEBOOK_DTYPES), at,
           f"codebook dtype {codebook['dtype']!r} not in {CODEBOOK_DTYPES}")
    size = int_field(codebook, "size", f"{at}: codebook", 0, 1 << bits)
    expected = size * DTYPES[codebook["dtype"]][0].itemsize
    length = sections.add(codebook, at, f"{name}/codebook", expected)
    expect(length == expected, at, f"codebook section holds {length} bytes, {size} {codebook['dtype']} "
           f"values need {expected}", TensorInfoMismatch)
    return size


def check_levels_stream(entry: dict, name: str, at: str, sections, num_nonzero: int) -> int:
    """A ``cabac`` or ``grid`` entry's levels stream: its section, coder params, the shape's context
    geometry, and an empty stream exactly for an all-zero tensor; returns max_abs."""
    check_keys(entry["levels_stream"], sections.keys(set(), stream=True), f"{at}: levels_stream")
    length = sections.add(entry["levels_stream"], at, f"{name}/levels_stream")
    params = entry["coder_params"]
    row_length, max_abs, _, _ = untrusted_call(level_coder.validate_params, f"{at}: cabac coder params", params)
    expected_row = row_length_of(tuple(entry["shape"]))
    expect(row_length == expected_row, at, f"cabac row_length {row_length}, shape {entry['shape']} has rows of "
           f"{expected_row}", TensorInfoMismatch)
    expect((max_abs == 0) == (num_nonzero == 0), at, f"cabac max_abs {max_abs} disagrees with num_nonzero "
           f"{num_nonzero} (one is 0, the other is not)", TensorInfoMismatch)
    expect(max_abs > 0 or length == 0, at, f"an all-zero levels stream has 0 bytes, got {length}",
           TensorInfoMismatch)
    return max_abs
