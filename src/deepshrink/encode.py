"""Stage 4's core: a quantized weight as Deep Compression stores it, and raw tensors otherwise.

A quantized layer is stored in one of two layouts:

* the paper's (``CodedTensor``): for each non-zero weight (C order), its cluster symbol, and the run
  of zeros before it as an entry of ``index_bits`` bits, with filler entries for longer runs
  (``positions_to_entries``); both symbol streams are entropy coded (``deepshrink.coding``, Huffman
  or ANS);
* one stream of signed levels, zeros included (``CabacTensor``): the codebook sorted, each weight's
  level ordered like its value (``indices_to_levels``), coded by the context-adaptive coder
  ``deepshrink.coding.cabac`` with one output row/filter as the context geometry (and with its
  dependent-quantization context model when the levels follow that state machine, as those of
  ``quantize``'s "dq" method do).

``EncodeConfig(coder="auto")`` writes each layer in whichever is smaller. Every other tensor is
stored raw, or with ``EncodeConfig(grid_bits=b)`` a 1-D float tensor on a uniform grid of levels
coded by the same context coder (``GridTensor``), where that is smaller. This module turns tensors
into ``CodedTensor``/``CabacTensor``/``GridTensor``/``RawTensor`` and back;
``format.py`` lays them out in a file and reads them back from untrusted bytes.
"""

from __future__ import annotations

import fnmatch
import json
import math
import zlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import nn

from .batchnorm import fold_batchnorms
from .coding import CODERS, cabac, entropy_bits, get_coder
from .compression import fold_zero_centroids, plain_state_dict
from .config import check_bits, check_patterns_match, enum_value, first_match, pattern_values
from .errors import CodecError, ConfigError, DeepShrinkError, TensorInfoMismatch
from .layers import as_patterns, tied_weights

MAX_TENSOR_ELEMENTS = 1 << 31  # per tensor; also bounds every symbol count
CABAC = "cabac"  # the one-stream layout's coder name (not a symbol coder of deepshrink.coding.CODERS)
AUTO = "auto"  # per tensor, the smallest of every layout and coder
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
#: A grid tensor's header entry deflates to about this many bytes more than the same tensor's raw
#: entry (45-47 measured with the dictionary, 10 to 256 elements)
GRID_HEADER_BYTES = 48

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
_TORCH_TO_NAME = {t: name for name, (_, t) in DTYPES.items()}


class StoredFloat(str, Enum):
    """Float precision on disk. FLOAT16 halves raw tensors/codebooks; decoded values are then the
    float16-rounded numbers (bit-exact with respect to what is stored, not to the float32 model)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


@dataclass(frozen=True)
class EncodeConfig:
    """How ``compress_model`` writes a file. Every choice is recorded in the file itself."""

    # per layer the smallest of: the paper's layout with "huffman" (the paper's coder) or "ans" (closer to
    # the entropy), and "cabac" (one context-coded stream of levels); never larger than any one of them
    coder: str = "auto"
    index_bits_conv: int = 8  # paper: 8-bit relative indices for conv layers
    index_bits_fc: int = 5  # paper: 5 bits for fc layers (sparser rows, shorter runs)
    index_bits_by_pattern: tuple[tuple[str, int], ...] = ()  # (glob on weight FQN, bits); first match wins
    codebook_dtype: StoredFloat = StoredFloat.FLOAT32  # float32 keeps the decoded model bit-exact
    raw_dtype: StoredFloat = StoredFloat.FLOAT32  # biases/BN stats: few bytes, keep them exact
    include: tuple[str, ...] | None = None  # quantized weights to entropy code (FQN globs); None = all
    exclude: tuple[str, ...] = ()  # quantized weights stored raw instead (their effective values)
    # store each BatchNorm as a scale and a shift (``batchnorm.fold_batchnorms``). Off by default: the
    # decoded model computes the same function in eval mode, but its weight/bias are no longer the trained
    # gamma/beta and its running statistics are reset, so training the loaded model (train mode normalises
    # with batch statistics) starts from a different function
    fold_batchnorm: bool = False
    # round each 1-D float tensor (biases, norm scales) to a uniform grid of 2**grid_bits - 1 levels
    # spanning its largest magnitude and context-code the levels (``encode_grid``), where that is smaller
    # than storing it raw; lossy like float16 (the error is at most half a step). None keeps them raw
    grid_bits: int | None = None

    def __post_init__(self):
        coder = self.coder.value if isinstance(self.coder, Enum) else self.coder
        if not isinstance(coder, str) or coder not in tensor_coders():
            raise ConfigError(f"unknown coder {self.coder!r}; valid: {', '.join(tensor_coders())}")
        object.__setattr__(self, "coder", coder)
        for label in ("codebook_dtype", "raw_dtype"):
            object.__setattr__(self, label, StoredFloat(_stored_float(getattr(self, label), label)))
        for label in ("index_bits_conv", "index_bits_fc"):
            object.__setattr__(self, label, check_bits(getattr(self, label), label))
        object.__setattr__(self, "index_bits_by_pattern",
                           pattern_values(self.index_bits_by_pattern, "index_bits_by_pattern", check_bits))
        object.__setattr__(self, "include", None if self.include is None else as_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", as_patterns(self.exclude, "exclude"))
        if not isinstance(self.fold_batchnorm, bool):
            raise ConfigError(f"fold_batchnorm must be true or false, got {self.fold_batchnorm!r}")
        if self.grid_bits is not None:
            object.__setattr__(self, "grid_bits", check_bits(self.grid_bits, "grid_bits", low=2))

    def index_bits_for(self, fqn: str, kind: str) -> int:
        """Index bits for weight ``fqn`` of a layer of ``kind`` ("conv" or anything else = fc)."""
        bits = first_match(fqn, self.index_bits_by_pattern)
        if bits is not None:
            return bits
        return self.index_bits_conv if kind == "conv" else self.index_bits_fc


def tensor_coders() -> list[str]:
    """Valid ``EncodeConfig.coder`` values: the symbol coders, "cabac" and "auto"."""
    return [*sorted(CODERS), CABAC, AUTO]


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _stored_float(value: Any, label: str) -> str:
    return enum_value(StoredFloat, value, label)


# ---------------------------------------------------------------- encoded tensors (the functional core)


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
    """A tensor whose elements are all one value, stored as that value (no payload bytes): reset
    BatchNorm statistics, zero biases, step counters. ``value`` is a Python number that the dtype
    holds exactly (``constant_value``)."""

    shape: tuple[int, ...]
    dtype: np.dtype  # one of DTYPES
    value: int | float | bool

    @property
    def array(self) -> np.ndarray:
        return np.full(self.shape, self.value, dtype=self.dtype)


@dataclass(frozen=True)
class CodedTensor:
    """A quantized weight as Deep Compression stores it (see ``encode_quantized``)."""

    shape: tuple[int, ...]
    bits: int
    index_bits: int
    coder: str
    codebook: np.ndarray  # (K,) float32 or float16: the value of cluster symbol s is codebook[s]
    num_nonzero: int  # symbols in the weights stream
    num_entries: int  # symbols in the positions stream (non-zeros + fillers)
    weights_stream: bytes
    positions_stream: bytes
    coder_params: dict = field(default_factory=dict)  # {"weights": {...}, "positions": {...}}
    # Shannon entropy of each stream's symbols, in bits: known when encoding, None for a tensor read
    # from a file (accounting then decodes the streams to measure it)
    weights_entropy_bits: float | None = None
    positions_entropy_bits: float | None = None


@dataclass(frozen=True)
class CabacTensor:
    """A quantized weight as one context-coded stream of signed levels (see ``encode_levels``)."""

    shape: tuple[int, ...]
    bits: int
    codebook: np.ndarray  # (K,) in level order (sorted ascending unless ``_dependent_order``), float32 or float16
    num_negative: int  # codebook[:num_negative] get levels -num_negative..-1; the rest 1..K-num_negative
    num_nonzero: int  # non-zero levels
    stream: bytes
    coder_params: dict  # deepshrink.coding.cabac params (row_length, max_abs, num_gt and the constants)
    # memoryless entropy of the levels (zeros included), in bits: known when encoding, None when read
    levels_entropy_bits: float | None = None


@dataclass(frozen=True)
class GridTensor:
    """A float tensor on a uniform grid: element = level x ``step``, the signed levels coded as one
    context-coded stream (see ``encode_grid``). No codebook: a bias needs hundreds of levels."""

    shape: tuple[int, ...]
    step: float  # > 0, a float32 value
    num_nonzero: int  # non-zero levels
    stream: bytes
    coder_params: dict  # deepshrink.coding.cabac params
    levels_entropy_bits: float | None = None  # as CabacTensor's


Encoded = Union[RawTensor, ConstantTensor, CodedTensor, CabacTensor, GridTensor]


def row_length_of(shape: tuple[int, ...]) -> int:
    """Levels per output row/filter: prod(shape[1:]) for 2-D and up, else every element (at least 1)."""
    numel = math.prod(shape)
    return max(1, numel // shape[0] if len(shape) >= 2 and shape[0] else numel)


def positions_to_entries(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Relative-index entries for strictly increasing flat positions of the non-zeros.

    Entry value r < F = 2**index_bits - 1 means "skip r zeros, then a non-zero"; the value F itself
    is a filler: "skip F zeros, no weight". Runs of zeros at the end of the tensor are not stored.

    Returns:
        (num_entries,) uint32 array: for each non-zero, ``run // F`` fillers then ``run % F``.
    """
    filler = (1 << index_bits) - 1
    runs = np.diff(positions.astype(np.int64), prepend=-1) - 1  # zeros before each non-zero
    fillers = runs // filler
    ends = np.cumsum(fillers + 1) - 1  # where each non-zero's entry lands
    entries = np.full(int(ends[-1]) + 1 if len(ends) else 0, filler, dtype=np.uint32)
    entries[ends] = runs % filler
    return entries


def entries_to_positions(entries: np.ndarray, index_bits: int, numel: int, where: str = "tensor") -> np.ndarray:
    """Inverse of ``positions_to_entries``, checked: every position inside ``numel``, no trailing filler.

    Raises:
        TensorInfoMismatch: an entry exceeds the alphabet, ends with a filler, or points past the end.
    """
    filler = (1 << index_bits) - 1
    if len(entries) == 0:
        return np.zeros(0, dtype=np.int64)
    if int(entries.max()) > filler:
        raise TensorInfoMismatch(f"{where}: position entry {int(entries.max())} exceeds the {index_bits}-bit alphabet")
    is_weight = entries != filler
    if not is_weight[-1]:
        raise TensorInfoMismatch(f"{where}: positions stream ends with a filler entry (the writer never emits one)")
    # an entry advances the cursor by r + 1 (weight) or F (filler): entry + is_weight. In place: this
    # runs on hostile counts, so keep it to one int64 array.
    cursor = entries.astype(np.int64)
    cursor += is_weight
    np.cumsum(cursor, out=cursor)  # one past each entry's last position
    positions = cursor[is_weight]
    del cursor
    positions -= 1  # strictly increasing: every entry advances at least 1
    if int(positions[-1]) >= numel:
        raise TensorInfoMismatch(f"{where}: positions stream places a weight at {int(positions[-1])}, "
                                 f"past the end of a tensor of {numel} elements")
    return positions


def indices_to_levels(indices: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Signed levels for cluster indices (0 = pruned, s = codebook[s-1]), ordered like the values.

    The codebook is sorted ascending (stable); its n negative values get levels -n..-1 (the most
    negative -n) and the others 1, 2, ... by increasing value, so |level| grows with |value| on
    each side and 0 stays "pruned".

    Returns:
        (levels int32 shaped like ``indices``, the sorted codebook, n).
    """
    codebook = np.asarray(codebook).reshape(-1)
    order = np.argsort(codebook, kind="stable")
    num_negative = int((codebook < 0).sum())
    rank = np.empty(codebook.size, dtype=np.int64)
    rank[order] = np.arange(codebook.size)
    lookup = np.zeros(codebook.size + 1, dtype=np.int32)
    lookup[1:] = rank - num_negative + (rank >= num_negative)
    return lookup[np.asarray(indices)], codebook[order], num_negative


def levels_to_values(levels: np.ndarray, codebook: np.ndarray, num_negative: int) -> np.ndarray:
    """float32 values of signed levels (inverse of ``indices_to_levels``; 0 -> 0.0). Levels must be in range."""
    levels = np.asarray(levels).astype(np.int64)
    slot = levels + num_negative - (levels > 0)
    table = np.concatenate([codebook.astype(np.float32), np.zeros(1, np.float32)])
    return table[np.where(levels == 0, codebook.size, slot)]


def encode_quantized(
    indices: np.ndarray,
    codebook: np.ndarray,
    bits: int,
    index_bits: int,
    coder: str = "huffman",
    codebook_dtype: str = "float32",
    where: str = "tensor",
) -> CodedTensor:
    """Encode a quantized weight given as cluster indices (0 = pruned, k = codebook[k-1]).

    Args:
        indices: integer array shaped like the weight, values in 0..K.
        codebook: (K,) centroid values, K <= 2**bits.
        bits: cluster bits of the layer (recorded; bounds K).
        index_bits: width of the relative position entries (alphabet 2**index_bits).
        coder: a name in ``deepshrink.coding.CODERS``.
        codebook_dtype: "float32" or "float16" on disk.

    Raises:
        ConfigError: bad bits/index_bits/coder/dtype, or an index outside 0..K.
    """
    where = where or "tensor"
    check_bits(index_bits, f"{where}: index_bits")
    if coder not in CODERS:
        raise ConfigError(f"{where}: unknown coder {coder!r}; valid: {', '.join(sorted(CODERS))}")
    indices, codebook, codebook_dtype = _check_quantized(indices, codebook, bits, codebook_dtype, where)
    num_centroids = len(codebook)
    flat = indices.reshape(-1)  # C order
    positions = np.flatnonzero(flat)
    symbols = flat[positions].astype(np.int64) - 1
    entries = positions_to_entries(positions, index_bits)
    codec = get_coder(coder)
    weights_stream, weights_params = _encode_stream(codec, symbols.astype(np.uint32), num_centroids)
    positions_stream, positions_params = _encode_stream(codec, entries, 1 << index_bits)
    return CodedTensor(
        shape=tuple(int(d) for d in indices.shape), bits=int(bits), index_bits=int(index_bits), coder=coder,
        codebook=codebook.astype(DTYPES[codebook_dtype][0]), num_nonzero=len(symbols), num_entries=len(entries),
        weights_stream=weights_stream, positions_stream=positions_stream,
        coder_params={"weights": weights_params, "positions": positions_params},
        weights_entropy_bits=entropy_bits(symbols.astype(np.uint32), num_centroids) if len(symbols) else 0.0,
        positions_entropy_bits=entropy_bits(entries, 1 << index_bits) if len(entries) else 0.0,
    )


def _check_quantized(indices, codebook, bits, codebook_dtype, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(indices, flat codebook, stored codebook dtype name) after checking bits, sizes and index range.

    Raises:
        ConfigError: bad bits or dtype, too many centroids or elements, or an index outside 0..K.
    """
    check_bits(bits, f"{where}: bits")
    codebook_dtype = _stored_float(codebook_dtype, f"{where}: codebook_dtype")
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


def encode_levels(
    indices: np.ndarray, codebook: np.ndarray, bits: int, codebook_dtype: str = "float32", where: str = "tensor"
) -> CabacTensor:
    """Encode a quantized weight (0 = pruned, k = codebook[k-1]) as one ``cabac`` stream of signed levels.

    Levels rank the codebook by value (``indices_to_levels``). Levels of dependent quantization
    (``cabac.is_dependent``) are coded with its context model when that is smaller; if centroid
    training has reordered such a codebook, its own index order still gives them (``_dependent_order``).

    Raises:
        ConfigError: see ``encode_quantized``.
    """
    where = where or "tensor"
    indices, codebook, codebook_dtype = _check_quantized(indices, codebook, bits, codebook_dtype, where)
    levels, ordered, num_negative = indices_to_levels(indices, codebook)
    shape = tuple(int(d) for d in indices.shape)
    row_length = row_length_of(shape)
    stream, params = cabac.encode(levels.reshape(-1), row_length)
    dependent = (levels, ordered, num_negative) if cabac.is_dependent(levels.reshape(-1)) else _dependent_order(
        indices, codebook)
    if dependent is not None:
        coded = cabac.encode(dependent[0].reshape(-1), row_length, context_model=cabac.DEPENDENT_CONTEXT_MODEL)
        if len(coded[0]) < len(stream):
            (stream, params), (levels, ordered, num_negative) = coded, dependent
    flat = levels.reshape(-1)
    return CabacTensor(
        shape=shape, bits=int(bits), codebook=ordered.astype(DTYPES[codebook_dtype][0]),
        num_negative=num_negative, num_nonzero=int(np.count_nonzero(flat)), stream=stream, coder_params=params,
        levels_entropy_bits=levels_entropy(flat),
    )


#: how far from the count of negative values ``_dependent_order`` looks for a dependent quantizer's zero
_ZERO_SEARCH = 3
_PREFIX = 1 << 16  # elements ``_dependent_order`` checks before mapping a whole tensor


def _dependent_order(indices: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(levels, codebook, n) in the codebook's own order, when they follow dependent quantization's machine.

    ``quantize``'s "dq" method makes its grid in index order; centroid training can move levels past
    each other (or past zero), so ranking by value no longer gives the trellis's levels, but the index
    order still does: indices 1..n become levels -n..-1, the others 1, 2, ... . n is where zero sat:
    near the count of negative values, so only the few splits nearest it are tried. None if none fits.
    """
    size = codebook.size
    counted = int((codebook < 0).sum())
    slots = np.arange(1, size + 1)
    head = indices.reshape(-1)[:_PREFIX]
    for n in sorted(range(max(0, counted - _ZERO_SEARCH), min(size, counted + _ZERO_SEARCH) + 1),
                    key=lambda n: abs(n - counted)):
        lookup = np.zeros(size + 1, dtype=np.int32)
        lookup[1:] = np.where(slots <= n, slots - n - 1, slots - n)
        # every layer coded by cabac comes here once its ranks fail (all k-means layers do): a prefix of
        # a dependent sequence is dependent (or all zero), so most splits are refused without mapping the
        # whole tensor
        start = lookup[head]
        if start.any() and not cabac.is_dependent(start):
            continue
        levels = lookup[indices]
        if cabac.is_dependent(levels.reshape(-1)):
            return levels, codebook, n
    return None


def levels_entropy(levels: np.ndarray) -> float:
    """Memoryless entropy of signed levels in bits, zeros included (the context coder may go below it)."""
    if not levels.size:
        return 0.0
    max_abs = int(np.abs(levels.astype(np.int64)).max())
    return float(entropy_bits(levels + max_abs, 2 * max_abs + 1))


def decode_levels(coded: CabacTensor, where: str = "tensor") -> np.ndarray:
    """Decode the signed levels (int32, flat) of a ``CabacTensor``, checked against its codebook and counts.

    Raises:
        CodecError: a malformed stream; TensorInfoMismatch: a level outside the codebook, or a
            non-zero count other than the header's.
    """
    numel = math.prod(coded.shape)
    levels = np.asarray(untrusted_call(cabac.decode, f"{where}: levels stream", coded.stream, coded.coder_params,
                                       numel))
    if levels.shape != (numel,):
        raise TensorInfoMismatch(f"{where}: levels stream decoded {levels.shape} levels, shape needs {numel}")
    if numel:
        low, high = int(levels.min()), int(levels.max())
        positive = len(coded.codebook) - coded.num_negative
        if low < -coded.num_negative or high > positive:
            raise TensorInfoMismatch(f"{where}: levels span {low}..{high}, the codebook has {coded.num_negative} "
                                     f"negative and {positive} other values")
    nonzero = int(np.count_nonzero(levels))
    if nonzero != coded.num_nonzero:
        raise TensorInfoMismatch(f"{where}: levels stream holds {nonzero} non-zeros, header says {coded.num_nonzero}")
    return levels


def decode_grid(coded: GridTensor, where: str = "tensor") -> np.ndarray:
    """Dense float32 array of a ``GridTensor``: each level times the step, in float32.

    Raises:
        CodecError: a malformed stream; TensorInfoMismatch: a non-zero count other than the header's.
    """
    numel = math.prod(coded.shape)
    levels = np.asarray(untrusted_call(cabac.decode, f"{where}: levels stream", coded.stream, coded.coder_params,
                                       numel))
    if levels.shape != (numel,):
        raise TensorInfoMismatch(f"{where}: levels stream decoded {levels.shape} levels, shape needs {numel}")
    nonzero = int(np.count_nonzero(levels))
    if nonzero != coded.num_nonzero:
        raise TensorInfoMismatch(f"{where}: levels stream holds {nonzero} non-zeros, header says {coded.num_nonzero}")
    return (levels.astype(np.float32) * np.float32(coded.step)).reshape(coded.shape)


def decode_cabac(coded: CabacTensor, where: str = "tensor") -> np.ndarray:
    """Dense float32 array of a ``CabacTensor`` (see ``decode_levels`` for the errors)."""
    levels = decode_levels(coded, where)
    return levels_to_values(levels, np.asarray(coded.codebook), coded.num_negative).reshape(coded.shape)


def header_share(params: dict) -> int:
    """About the bytes ``params`` add to a header: their JSON deflated with ``HEADER_DICTIONARY``, less
    an empty stream's. A Huffman table costs its code lengths; a cabac entry's constants almost nothing."""
    return _deflated_size(json.dumps(jsonable(params), sort_keys=True, separators=(",", ":"))) - _deflated_size("")


def _deflated_size(text: str) -> int:
    deflate = zlib.compressobj(9, zdict=HEADER_DICTIONARY)
    return len(deflate.compress(text.encode("ascii")) + deflate.flush())


def stored_bytes(encoded: Encoded) -> int:
    """Bytes a coded tensor adds to a file: its sections plus its coder params' share of the header."""
    if isinstance(encoded, CabacTensor):
        return encoded.codebook.nbytes + len(encoded.stream) + header_share(encoded.coder_params)
    if isinstance(encoded, GridTensor):  # compared with the same tensor raw: only the header's extra share
        return len(encoded.stream) + GRID_HEADER_BYTES
    if isinstance(encoded, CodedTensor):
        return (encoded.codebook.nbytes + len(encoded.weights_stream) + len(encoded.positions_stream)
                + header_share(encoded.coder_params))
    return encoded.array.nbytes


def encode_weight(
    indices: np.ndarray, codebook: np.ndarray, bits: int, index_bits: int, coder: str = "huffman",
    codebook_dtype: str = "float32", where: str = "tensor",
) -> Encoded:
    """A quantized weight in the layout ``coder`` names; "auto" tries huffman, ans and cabac and keeps the
    smallest by ``stored_bytes`` (ties go to that order)."""
    if coder == CABAC:
        return encode_levels(indices, codebook, bits, codebook_dtype, where)
    if coder != AUTO:
        return encode_quantized(indices, codebook, bits, index_bits, coder, codebook_dtype, where)
    candidates = [encode_quantized(indices, codebook, bits, index_bits, name, codebook_dtype, where)
                  for name in sorted(CODERS, key=lambda n: (n != "huffman", n))]
    candidates.append(encode_levels(indices, codebook, bits, codebook_dtype, where))
    return min(candidates, key=stored_bytes)  # min keeps the first of equal sizes


def _encode_stream(codec, symbols: np.ndarray, alphabet_size: int) -> tuple[bytes, dict]:
    # an empty stream is zero bytes with {} params: no coder call, nothing a reader must trust
    if len(symbols) == 0:
        return b"", {}
    payload, params = codec.encode(symbols, alphabet_size)
    return bytes(payload), jsonable(params)


def untrusted_call(fn: Callable, where: str, *args):
    """Call a coder on file data: its CodecError gets the tensor's name, anything else becomes a CodecError."""
    try:
        return fn(*args)
    except DeepShrinkError as e:
        raise type(e)(f"{where}: {e}") from e
    except Exception as e:  # a coder bug on hostile input must not escape as a numpy/constriction error
        raise CodecError(f"{where}: coder failed ({type(e).__name__}: {e})") from e


def decode_symbols(coded: CodedTensor, where: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """Decode both streams: (cluster symbols (num_nonzero,), position entries (num_entries,)), checked.

    Raises:
        CodecError: a stream is malformed; TensorInfoMismatch: decoded symbols out of range or miscounted.
    """
    codec = get_coder(coded.coder)
    num_centroids = len(coded.codebook)
    streams = (
        ("weights", coded.weights_stream, coded.num_nonzero, num_centroids),
        ("positions", coded.positions_stream, coded.num_entries, 1 << coded.index_bits),
    )
    decoded = []
    for label, payload, count, alphabet in streams:
        if count == 0:
            decoded.append(np.zeros(0, dtype=np.uint32))
            continue
        symbols = np.asarray(untrusted_call(codec.decode, f"{where}: {label} stream", payload,
                                             coded.coder_params[label], count, alphabet))
        if symbols.shape != (count,):
            raise TensorInfoMismatch(f"{where}: {label} stream decoded {symbols.shape} symbols, header says {count}")
        if int(symbols.max()) >= alphabet:
            raise TensorInfoMismatch(f"{where}: {label} stream holds symbol {int(symbols.max())}, "
                                     f"alphabet has {alphabet}")
        decoded.append(symbols)
    return decoded[0], decoded[1]


def decode_quantized(coded: CodedTensor, where: str = "tensor") -> np.ndarray:
    """Dense float32 array: ``codebook[symbol]`` at each decoded position, zero elsewhere.

    Raises:
        CodecError, TensorInfoMismatch: see ``decode_symbols`` and ``entries_to_positions``.
    """
    numel = math.prod(coded.shape)
    symbols, entries = decode_symbols(coded, where)
    positions = entries_to_positions(entries, coded.index_bits, numel, where)
    if len(positions) != coded.num_nonzero:
        raise TensorInfoMismatch(f"{where}: positions stream places {len(positions)} weights, "
                                 f"header says num_nonzero={coded.num_nonzero}")
    dense = np.zeros(numel, dtype=np.float32)
    dense[positions] = coded.codebook.astype(np.float32)[symbols]
    return dense.reshape(coded.shape)


def decode_tensor(encoded: Encoded, where: str = "tensor") -> np.ndarray:
    """The dense array an encoded tensor stands for, in its stored dtype (a raw tensor is copied).

    Raises:
        CodecError, TensorInfoMismatch: a coded tensor's streams are malformed (see ``decode_quantized``).
    """
    if isinstance(encoded, RawTensor):
        return encoded.array.copy()  # own, writable memory (a file's raw tensors view its bytes)
    if isinstance(encoded, ConstantTensor):
        return encoded.array
    if isinstance(encoded, CabacTensor):
        return decode_cabac(encoded, where)
    if isinstance(encoded, GridTensor):
        return decode_grid(encoded, where)
    return decode_quantized(encoded, where)


def encode_raw(tensor: torch.Tensor, raw_dtype: str = "float32", where: str = "tensor") -> RawTensor | ConstantTensor:
    """Raw entry: floats converted to ``raw_dtype``, integers and bools kept as they are; a tensor
    whose stored elements are all one value becomes a ``ConstantTensor``.

    Raises:
        ConfigError: a dtype the format cannot store (complex, unsigned > 8 bits...).
    """
    tensor = tensor.detach().cpu()
    if tensor.dtype.is_floating_point:
        name = _stored_float(raw_dtype, f"{where}: raw_dtype")
        tensor = tensor.float()  # bfloat16 has no numpy dtype; float32 holds it exactly
    else:
        name = _TORCH_TO_NAME.get(tensor.dtype)
        if name is None:
            raise ConfigError(f"{where}: dtype {tensor.dtype} cannot be stored; supported: {', '.join(DTYPES)}")
    if tensor.numel() > MAX_TENSOR_ELEMENTS:
        raise ConfigError(f"{where}: {tensor.numel()} elements exceed the format's limit {MAX_TENSOR_ELEMENTS}")
    array = tensor.numpy().astype(DTYPES[name][0], order="C")  # astype copies; keeps 0-d shape
    value = constant_value(array)
    return RawTensor(array) if value is None else ConstantTensor(array.shape, array.dtype, value)


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
    stream, params = cabac.encode(levels, row_length_of(shape))
    return GridTensor(shape=shape, step=float(step), num_nonzero=int(np.count_nonzero(levels)), stream=stream,
                      coder_params=params, levels_entropy_bits=levels_entropy(levels))


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


def encode_model(model: nn.Module, config: EncodeConfig = EncodeConfig()) -> dict[str, Encoded]:
    """Encode every tensor of the model's plain state dict: SharedWeights ones coded (those that
    ``config.include``/``exclude`` select), the rest raw. A tied tensor is encoded once, under its first
    name (``layers.tied_weights`` gives the others). ``config.fold_batchnorm`` folds BatchNorms first
    (``batchnorm.fold_batchnorms``); the model itself is never modified."""
    plain, shared = plain_state_dict(model)
    tied = tied_weights(model)
    if config.fold_batchnorm:  # a quantized or tied weight keeps its values: they are not BatchNorm's alone
        plain = fold_batchnorms(model, plain, skip={*shared, *tied, *tied.values()})
    coded = _select_coded(list(shared), config)
    check_patterns_match(config.index_bits_by_pattern, list(shared), "index_bits_by_pattern")
    encoded: dict[str, Encoded] = {}
    for name, tensor in plain.items():
        if name in tied:
            continue
        if name in coded:
            sw, kind = shared[name]
            # a centroid trained onto exactly 0 codes its weights as pruned: same values, fewer bits
            centroids, indices = fold_zero_centroids(sw.centroids.detach().cpu().float(), sw.indices.detach().cpu())
            encoded[name] = encode_weight(
                indices.numpy(), centroids.numpy(), sw.bits,
                config.index_bits_for(name, kind), config.coder, config.codebook_dtype, where=name,
            )
        else:
            encoded[name] = _encode_plain(tensor, config, name)
    return encoded


def _encode_plain(tensor: torch.Tensor, config: EncodeConfig, where: str) -> Encoded:
    """A tensor that is not a coded weight: raw (or constant); with ``grid_bits``, a 1-D float tensor
    on its grid where that is smaller."""
    raw = encode_raw(tensor, config.raw_dtype, where)
    if config.grid_bits is None or not isinstance(raw, RawTensor) or tensor.dim() != 1 \
            or not tensor.dtype.is_floating_point:
        return raw
    grid = encode_grid(tensor.detach().cpu().float().numpy(), config.grid_bits, where)
    return grid if grid is not None and stored_bytes(grid) < stored_bytes(raw) else raw


def _select_coded(names: list[str], config: EncodeConfig) -> set[str]:
    """The quantized weights to entropy code: ``include`` (None = all) minus ``exclude``."""
    check_patterns_match(tuple((p, None) for p in config.include or ()), names, "encode include")
    check_patterns_match(tuple((p, None) for p in config.exclude), names, "encode exclude")
    return {n for n in names if (config.include is None or any(fnmatch.fnmatchcase(n, p) for p in config.include))
            and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)}


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
