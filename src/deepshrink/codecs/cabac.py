"""Codec ``cabac``: a quantized weight as one context-coded stream of signed levels, zeros included.

The codebook is sorted and each weight's level is ordered like its value (``indices_to_levels``); the
levels are coded by the context-adaptive coder ``deepshrink.coding.level_coder`` with one output row/filter as
the context geometry (and with its dependent-quantization context model when the levels follow that
state machine, as those of ``quantize``'s "dq" method do). No frequency tables are stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from deepshrink.codecs import AUTO, TensorCodec, TensorToStore, register_codec
from deepshrink.codecs.common import (CODEBOOK_DTYPE_HELP, DTYPES, check_codebook, check_entry, check_levels_stream, check_quantized,
                                      codebook_entry, codebook_view, decode_levels_stream, expect, header_share,
                                      int_field, levels_entropy)
from deepshrink.coding import count_values, entropy_of_counts, level_coder, row_length_of
from deepshrink.config import MAX_BITS
from deepshrink.errors import TensorInfoMismatch


@dataclass(frozen=True)
class CabacTensor:
    """A quantized weight as one context-coded stream of signed levels (see ``encode_levels``)."""

    shape: tuple[int, ...]
    bits: int
    codebook: np.ndarray  # (K,) in level order (sorted ascending unless ``_dependent_order``), float32 or float16
    num_negative: int  # codebook[:num_negative] get levels -num_negative..-1; the rest 1..K-num_negative
    num_nonzero: int  # non-zero levels
    stream: bytes | memoryview  # a file's tensor views its bytes
    coder_params: dict  # deepshrink.coding.level_coder params (row_length, max_abs, num_gt and the constants)
    # memoryless entropy of the levels (zeros included), in bits: known when encoding, None when read
    levels_entropy_bits: float | None = None

    dtype = np.dtype("<f4")  # of the decoded tensor


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
    """float32 values of signed levels (inverse of ``indices_to_levels``; 0 -> 0.0), shaped like ``levels``.

    Raises:
        ValueError: a level outside -num_negative..K - num_negative.
    """
    levels = np.asarray(levels)
    codebook = np.asarray(codebook).astype(np.float32)
    # level -num_negative..K - num_negative is table[level + num_negative]: one lookup, no temporaries
    table = np.concatenate([codebook[:num_negative], np.zeros(1, np.float32), codebook[num_negative:]])
    values = np.empty(levels.shape, dtype=np.float32)
    outside = _lookup(np.ascontiguousarray(levels).reshape(-1), table, num_negative, values.reshape(-1))
    if outside >= 0:
        raise ValueError(f"level {levels.reshape(-1)[outside]} outside the codebook's -{num_negative}.."
                         f"{codebook.size - num_negative}")
    return values


@numba.njit(cache=True, nogil=True)
def _lookup(levels, table, offset, out):
    """out[i] = table[levels[i] + offset]; returns the first i whose slot is outside the table (-1 if none)."""
    for i in range(levels.shape[0]):
        slot = np.uint64(np.int64(levels[i]) + offset)  # a negative slot becomes huge: one compare checks both ends
        if slot >= table.shape[0]:
            return i
        out[i] = table[slot]
    return -1


def encode_levels(
    indices: np.ndarray, codebook: np.ndarray, bits: int, codebook_dtype: str = "float32", where: str = "tensor"
) -> CabacTensor:
    """Encode a quantized weight (0 = pruned, k = codebook[k-1]) as one ``cabac`` stream of signed levels.

    Levels rank the codebook by value (``indices_to_levels``). Levels of dependent quantization
    (``level_coder.is_dependent``) are coded with its context model when that is smaller; if centroid
    training has reordered such a codebook, its own index order still gives them (``_dependent_order``).

    Raises:
        ConfigError: see ``encode_quantized``.
    """
    where = where or "tensor"
    indices, codebook, codebook_dtype = check_quantized(indices, codebook, bits, codebook_dtype, where)
    levels, ordered, num_negative = indices_to_levels(indices, codebook)
    shape = tuple(int(d) for d in indices.shape)
    row_length = row_length_of(shape)
    stream, params = level_coder.encode(levels.reshape(-1), row_length)
    dependent = (levels, ordered, num_negative) if _is_dependent(levels.reshape(-1)) else _dependent_order(
        indices, codebook)
    entropy = None
    if dependent is not None:
        coded = level_coder.encode(dependent[0].reshape(-1), row_length, context_model=level_coder.DEPENDENT_CONTEXT_MODEL)
        if len(coded[0]) < len(stream):
            (stream, params), (levels, ordered, num_negative) = coded, dependent
            entropy = levels_entropy(levels.reshape(-1))
    if entropy is None:  # the levels' histogram from the indices': no int64 copy of the levels
        entropy = _levels_entropy_of_indices(indices, codebook)
    return CabacTensor(
        shape=shape, bits=int(bits), codebook=ordered.astype(DTYPES[codebook_dtype][0]),
        num_negative=num_negative, num_nonzero=int(np.count_nonzero(levels)), stream=stream, coder_params=params,
        levels_entropy_bits=entropy,
    )


def _is_dependent(levels: np.ndarray) -> bool:
    """``level_coder.is_dependent``, settled on a prefix where it can be (one that has a non-zero and is not
    dependent): the whole is then not, and no copy of it is made."""
    head = levels[:_PREFIX]
    if head.any() and not level_coder.is_dependent(head):
        return False
    return level_coder.is_dependent(levels)


def _levels_entropy_of_indices(indices: np.ndarray, codebook: np.ndarray) -> float:
    """``levels_entropy`` of ``indices_to_levels(indices, codebook)``'s levels, from the indices' histogram:
    each level is one index's, so the same histogram (in level order) and the same float."""
    counts = count_values(indices, len(codebook) + 1)
    lookup = indices_to_levels(np.arange(len(codebook) + 1), codebook)[0].astype(np.int64)
    used = counts > 0
    if not counts.sum():
        return 0.0
    max_abs = int(np.abs(lookup[used]).max())
    level_counts = np.zeros(2 * max_abs + 1, dtype=np.int64)
    np.add.at(level_counts, lookup[used] + max_abs, counts[used])
    return entropy_of_counts(level_counts)


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
        if start.any() and not level_coder.is_dependent(start):
            continue
        levels = lookup[indices]
        if level_coder.is_dependent(levels.reshape(-1)):
            return levels, codebook, n
    return None


#: ``sampled_stream_bytes`` codes this many evenly spaced runs of whole rows...
SAMPLE_CHUNKS = 16
#: ... holding a sixteenth of the tensor, but at least 2**18 and at most 2**22 levels
SAMPLE_SHARE, SAMPLE_LEAST, SAMPLE_MOST = 1 / 16, 1 << 18, 1 << 22
#: The sample's estimate of a stream is taken to be within this factor of the stream coded whole.
#: Measured (bench/scale.py's VGG-16 and GPT-2 layers of 1M to 103M weights, 50-99% pruned, 4-8 bits):
#: 1.000 to 1.016 times the real size (each run starts with fresh contexts, so it overestimates a little)
ESTIMATE_MARGIN = 1.05


def sampled_stream_bytes(indices: np.ndarray, codebook: np.ndarray) -> tuple[float, dict] | None:
    """An estimate of the levels stream ``encode_levels`` would write, from ``SAMPLE_CHUNKS`` runs of whole
    rows coded on their own and scaled to the whole tensor, with one run's params; None when the sample
    is the whole tensor or the levels may follow dependent quantization (its context model may win)."""
    flat = np.asarray(indices).reshape(-1)
    numel = flat.size
    row_length = row_length_of(tuple(np.shape(indices)))
    want = min(max(int(numel * SAMPLE_SHARE), SAMPLE_LEAST), SAMPLE_MOST)
    rows = numel // row_length
    run = -(-want // (SAMPLE_CHUNKS * row_length)) * row_length if rows > 1 else -(-want // SAMPLE_CHUNKS)
    if SAMPLE_CHUNKS * run >= numel:
        return None
    lookup, _, _ = indices_to_levels(np.arange(len(codebook) + 1), codebook)
    head = flat[:_PREFIX]
    if not lookup[head].any() or level_coder.is_dependent(lookup[head]) or _dependent_order(head, codebook):
        return None  # a prefix of dependent levels is dependent: without one, neither is the tensor
    starts = np.linspace(0, (numel - run) // row_length if rows > 1 else numel - run, SAMPLE_CHUNKS).astype(np.int64)
    total = 0
    for start in starts * (row_length if rows > 1 else 1):
        stream, params = level_coder.encode(lookup[flat[start:start + run]], row_length if rows > 1 else run)
        total += len(stream)
    return total * numel / (SAMPLE_CHUNKS * run), {**params, "row_length": row_length}


def decode_levels(coded: CabacTensor, where: str = "tensor") -> np.ndarray:
    """Decode the signed levels (int32, flat) of a ``CabacTensor``, checked against its codebook and counts.

    Raises:
        CodecError: a malformed stream; TensorInfoMismatch: a level outside the codebook, or a
            non-zero count other than the header's.
    """
    levels = decode_levels_stream(coded.stream, coded.coder_params, math.prod(coded.shape), coded.num_nonzero, where)
    if levels.size:
        low, high = int(levels.min()), int(levels.max())
        positive = len(coded.codebook) - coded.num_negative
        if low < -coded.num_negative or high > positive:
            raise TensorInfoMismatch(f"{where}: levels span {low}..{high}, the codebook has {coded.num_negative} "
                                     f"negative and {positive} other values")
    return levels


def decode_cabac(coded: CabacTensor, where: str = "tensor") -> np.ndarray:
    """Dense float32 array of a ``CabacTensor`` (see ``decode_levels`` for the errors)."""
    levels = decode_levels(coded, where)
    return levels_to_values(levels, np.asarray(coded.codebook), coded.num_negative).reshape(coded.shape)



@register_codec
class CabacCodec(TensorCodec):
    name = "cabac"
    tensor_type = CabacTensor
    first_version = 2
    weight = True
    KEYS = {"codec", "dtype", "shape", "bits", "num_negative", "num_nonzero", "coder_params", "codebook",
            "levels_stream"}

    options = {"codebook_dtype": CODEBOOK_DTYPE_HELP}

    def coders(self) -> tuple[str, ...]:
        return (self.name,)

    def encode(self, tensor: TensorToStore, config) -> CabacTensor | None:
        if tensor.quantized is None or config.coder not in (self.name, AUTO):
            return None
        q = tensor.quantized
        return encode_levels(q.indices, q.codebook, q.bits, config.codebook_dtype, tensor.name)

    def estimate_bytes(self, tensor: TensorToStore, config) -> tuple[float, float] | None:
        """Under "auto", bounds on the stored bytes from coding a sample of rows (``sampled_stream_bytes``);
        None where it would code the tensor alone, or where the levels may follow dependent quantization."""
        if tensor.quantized is None or config.coder != AUTO:
            return None
        q = tensor.quantized
        estimate = sampled_stream_bytes(q.indices, q.codebook)
        if estimate is None:
            return None
        stream, params = estimate
        total = stream + len(q.codebook) * DTYPES[config.codebook_dtype][0].itemsize + header_share(params)
        return total / ESTIMATE_MARGIN, total * ESTIMATE_MARGIN

    def entry(self, name: str, tensor: CabacTensor, add) -> dict:
        return {
            "codec": self.name, "dtype": "float32", "shape": list(tensor.shape), "bits": tensor.bits,
            "num_negative": tensor.num_negative, "num_nonzero": tensor.num_nonzero,
            "coder_params": tensor.coder_params, "codebook": codebook_entry(name, tensor.codebook, add),
            "levels_stream": add(tensor.stream, True),
        }

    def check(self, entry: dict, name: str, at: str, sections) -> tuple[int, int]:
        numel = check_entry(entry, self.KEYS, at)
        bits = int_field(entry, "bits", at, 1, MAX_BITS)
        size = check_codebook(entry["codebook"], bits, name, at, sections)
        num_negative = int_field(entry, "num_negative", at, 0, size)
        num_nonzero = int_field(entry, "num_nonzero", at, 0, numel if size else 0)
        max_abs = check_levels_stream(entry, name, at, sections, num_nonzero)
        expect(sections.packed or entry["coder_params"]["context_model"] == level_coder.LEGACY_CONTEXT_MODEL, at,
               f"cabac context model {entry['coder_params']['context_model']!r} needs format version 3")
        widest = max(num_negative, size - num_negative)
        expect(max_abs <= widest, at, f"cabac max_abs {max_abs} exceeds the codebook's widest side ({widest} values)",
               TensorInfoMismatch)
        return numel, 0

    def view(self, name: str, entry: dict, span, at: str) -> CabacTensor:
        return CabacTensor(
            shape=tuple(entry["shape"]), bits=entry["bits"], codebook=codebook_view(name, entry, span),
            num_negative=entry["num_negative"], num_nonzero=entry["num_nonzero"],
            stream=span(f"{name}/levels_stream"), coder_params=entry["coder_params"],
        )

    def decode(self, tensor: CabacTensor, where: str) -> np.ndarray:
        return decode_cabac(tensor, where)

    def stored_bytes(self, tensor: CabacTensor) -> int:
        return tensor.codebook.nbytes + len(tensor.stream) + header_share(tensor.coder_params)

    def account(self, tensor: CabacTensor, where: str) -> dict:
        entropy = tensor.levels_entropy_bits
        if entropy is None:  # read from a file: measure by decoding
            entropy = levels_entropy(decode_levels(tensor, where))
        stream_bits, codebook_bytes, nnz = 8 * len(tensor.stream), tensor.codebook.nbytes, tensor.num_nonzero
        return dict(
            nonzero=nnz, bits=tensor.bits, weight_stream_bits=stream_bits, position_stream_bits=0,
            codebook_bytes=codebook_bytes, stored_bytes=codebook_bytes + stream_bits // 8,
            bits_per_nonzero=(stream_bits + 8 * codebook_bytes) / nnz if nnz else None,
            # memoryless entropy of the levels, zeros included: the contexts may code below it
            weight_entropy_bits=entropy, position_entropy_bits=0.0,
        )

    def nonzeros(self, tensor: CabacTensor, where: str) -> tuple[np.ndarray, np.ndarray]:
        levels = decode_levels(tensor, where)
        positions = np.flatnonzero(levels)
        nonzero = levels[positions].astype(np.int64)
        return positions, nonzero + tensor.num_negative - (nonzero > 0)  # level -> index into the sorted codebook
