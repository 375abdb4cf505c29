"""Codec ``deep_compression``: a quantized weight as the paper stores it (Han, Mao & Dally 2016, section 3).

For each non-zero weight (C order), its cluster symbol, and the run of zeros before it as an entry of
``index_bits`` bits, with filler entries for longer runs (``positions_to_entries``); both symbol streams
are entropy coded by a coder of ``deepshrink.coding.CODERS`` (Huffman, the paper's, or ANS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from deepshrink.codecs import AUTO, TensorCodec, TensorToStore, register_codec
from deepshrink.codecs.common import (CODEBOOK_DTYPE_HELP, DTYPES, check_codebook, check_entry, check_keys, check_quantized,
                                      codebook_entry, codebook_view, expect, header_share, int_field, jsonable,
                                      one_of, untrusted_call)
from deepshrink.coding import CODERS, entropy_bits, get_coder
from deepshrink.config import MAX_BITS, check_bits
from deepshrink.errors import ConfigError, TensorInfoMismatch


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
    weights_stream: bytes | memoryview  # a file's tensor views its bytes
    positions_stream: bytes | memoryview
    coder_params: dict = field(default_factory=dict)  # {"weights": {...}, "positions": {...}}
    # Shannon entropy of each stream's symbols, in bits: known when encoding, None for a tensor read
    # from a file (accounting then decodes the streams to measure it)
    weights_entropy_bits: float | None = None
    positions_entropy_bits: float | None = None

    dtype = np.dtype("<f4")  # of the decoded tensor


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
    return encode_with_coders(indices, codebook, bits, index_bits, (coder,), codebook_dtype, where)[0]


def encode_with_coders(
    indices: np.ndarray, codebook: np.ndarray, bits: int, index_bits: int, coders: tuple[str, ...],
    codebook_dtype: str = "float32", where: str = "tensor",
) -> list[CodedTensor]:
    """``encode_quantized`` with each of ``coders``, the symbol streams made once (see ``symbol_streams``)."""
    where = where or "tensor"
    check_bits(index_bits, f"{where}: index_bits")
    unknown = next((c for c in coders if c not in CODERS), None)
    if unknown is not None:
        raise ConfigError(f"{where}: unknown coder {unknown!r}; valid: {', '.join(sorted(CODERS))}")
    indices, codebook, codebook_dtype = check_quantized(indices, codebook, bits, codebook_dtype, where)
    num_centroids = len(codebook)
    symbols, entries = symbol_streams(indices, index_bits)
    weights_entropy = entropy_bits(symbols, num_centroids) if len(symbols) else 0.0
    positions_entropy = entropy_bits(entries, 1 << index_bits) if len(entries) else 0.0
    coded = []
    for coder in coders:
        codec = get_coder(coder)
        weights_stream, weights_params = _encode_stream(codec, symbols, num_centroids)
        positions_stream, positions_params = _encode_stream(codec, entries, 1 << index_bits)
        coded.append(CodedTensor(
            shape=tuple(int(d) for d in indices.shape), bits=int(bits), index_bits=int(index_bits), coder=coder,
            codebook=codebook.astype(DTYPES[codebook_dtype][0]), num_nonzero=len(symbols), num_entries=len(entries),
            weights_stream=weights_stream, positions_stream=positions_stream,
            coder_params={"weights": weights_params, "positions": positions_params},
            weights_entropy_bits=weights_entropy, positions_entropy_bits=positions_entropy,
        ))
    return coded


def symbol_streams(indices: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster symbols ``index - 1`` of the non-zeros in C order, their ``positions_to_entries``), both
    uint32, in one pass over the indices (no positions array: a few bytes per non-zero in all)."""
    flat = np.ascontiguousarray(indices).reshape(-1)
    filler = (1 << index_bits) - 1
    num_nonzero, num_entries = _count_streams(flat, filler)
    symbols = np.empty(num_nonzero, dtype=np.uint32)
    entries = np.empty(num_entries, dtype=np.uint32)
    _fill_streams(flat, filler, symbols, entries)
    return symbols, entries


@numba.njit(cache=True, nogil=True)
def _count_streams(flat, filler):
    nonzero = entries = 0
    last = -1
    for i in range(flat.shape[0]):
        if flat[i] != 0:
            entries += (i - last - 1) // filler + 1
            nonzero += 1
            last = i
    return nonzero, entries


@numba.njit(cache=True, nogil=True)
def _fill_streams(flat, filler, symbols, entries):
    """``positions_to_entries`` of the non-zeros' positions, and their symbols, written as they are met."""
    s = e = 0
    last = -1
    for i in range(flat.shape[0]):
        if flat[i] != 0:
            run = i - last - 1
            for _ in range(run // filler):
                entries[e] = filler
                e += 1
            entries[e] = run % filler
            e += 1
            symbols[s] = flat[i] - 1
            s += 1
            last = i


def _encode_stream(codec, symbols: np.ndarray, alphabet_size: int) -> tuple[bytes, dict]:
    # an empty stream is zero bytes with {} params: no coder call, nothing a reader must trust
    if len(symbols) == 0:
        return b"", {}
    payload, params = codec.encode(symbols, alphabet_size)
    return bytes(payload), jsonable(params)


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
    symbols, entries = decode_symbols(coded, where)
    numel, filler = math.prod(coded.shape), (1 << coded.index_bits) - 1
    # checked as ``entries_to_positions`` and ``decode_nonzeros`` check, in their order, without their arrays
    if len(entries) and int(entries.max()) > filler:
        raise TensorInfoMismatch(f"{where}: position entry {int(entries.max())} exceeds the "
                                 f"{coded.index_bits}-bit alphabet")
    weights, last = _count_positions(entries, filler)
    if len(entries) and entries[-1] == filler:
        raise TensorInfoMismatch(f"{where}: positions stream ends with a filler entry (the writer never emits one)")
    if weights and last >= numel:
        raise TensorInfoMismatch(f"{where}: positions stream places a weight at {last}, "
                                 f"past the end of a tensor of {numel} elements")
    if weights != coded.num_nonzero:
        raise TensorInfoMismatch(f"{where}: positions stream places {weights} weights, "
                                 f"header says num_nonzero={coded.num_nonzero}")
    dense = np.zeros(numel, dtype=np.float32)
    _scatter(entries, symbols, filler, coded.codebook.astype(np.float32), dense)
    return dense.reshape(coded.shape)


@numba.njit(cache=True, nogil=True)
def _count_positions(entries, filler):
    """(weights the entries place, the last one's position; -1 for none)."""
    weights, cursor, last = 0, 0, -1
    for i in range(entries.shape[0]):
        if entries[i] == filler:
            cursor += filler
        else:
            cursor += entries[i] + 1
            last = cursor - 1
            weights += 1
    return weights, last


@numba.njit(cache=True, nogil=True)
def _scatter(entries, symbols, filler, codebook, out):
    """``out[position] = codebook[symbol]`` for each weight the (checked) entries place."""
    cursor, s = 0, 0
    for i in range(entries.shape[0]):
        if entries[i] == filler:
            cursor += filler
        else:
            cursor += entries[i] + 1
            out[cursor - 1] = codebook[symbols[s]]
            s += 1


def decode_nonzeros(coded: CodedTensor, where: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """(flat positions, cluster symbols) of the non-zeros, checked (see ``decode_quantized``)."""
    symbols, entries = decode_symbols(coded, where)
    positions = entries_to_positions(entries, coded.index_bits, math.prod(coded.shape), where)
    if len(positions) != coded.num_nonzero:
        raise TensorInfoMismatch(f"{where}: positions stream places {len(positions)} weights, "
                                 f"header says num_nonzero={coded.num_nonzero}")
    return positions, symbols


def _max_symbols(coder, stream_bytes: int) -> int | None:
    """Most symbols a stream of ``stream_bytes`` can decode to, where the coder bounds it (None: no bound)."""
    if coder.min_bits_per_symbol <= 0:
        return None
    return math.floor(8 * stream_bytes / coder.min_bits_per_symbol)


@register_codec
class DeepCompressionCodec(TensorCodec):
    name = "deep_compression"
    tensor_type = CodedTensor
    first_version = 1
    weight = True
    KEYS = {"codec", "dtype", "shape", "bits", "index_bits", "coder", "coder_params", "num_nonzero",
            "num_entries", "codebook", "weights_stream", "positions_stream"}
    options = {
        "index_bits_conv": "bits of a relative position entry in conv layers (the paper: 8)",
        "index_bits_fc": "bits of a relative position entry in other layers (the paper: 5 for fc)",
        "codebook_dtype": CODEBOOK_DTYPE_HELP,
    }

    def coders(self) -> tuple[str, ...]:
        return tuple(sorted(CODERS))  # the symbol coders, built-in and registered

    def encode(self, tensor: TensorToStore, config) -> CodedTensor | None:
        """The paper's layout with the coder ``config`` names, or under "auto" each symbol coder's (the
        smallest; Huffman, the paper's, first on ties)."""
        if tensor.quantized is None:
            return None
        names = [config.coder] if config.coder in CODERS else (
            sorted(CODERS, key=lambda n: (n != "huffman", n)) if config.coder == AUTO else [])
        if not names:
            return None
        q = tensor.quantized
        index_bits = config.index_bits_for(tensor.name, tensor.kind)
        candidates = encode_with_coders(q.indices, q.codebook, q.bits, index_bits, tuple(names), config.codebook_dtype,
                                        tensor.name)
        return min(candidates, key=self.stored_bytes)  # min keeps the first of equal sizes

    def entry(self, name: str, tensor: CodedTensor, add) -> dict:
        return {
            "codec": self.name, "dtype": "float32", "shape": list(tensor.shape), "bits": tensor.bits,
            "index_bits": tensor.index_bits, "coder": tensor.coder, "coder_params": tensor.coder_params,
            "num_nonzero": tensor.num_nonzero, "num_entries": tensor.num_entries,
            "codebook": codebook_entry(name, tensor.codebook, add),
            "weights_stream": add(tensor.weights_stream, True), "positions_stream": add(tensor.positions_stream, True),
        }

    def check(self, entry: dict, name: str, at: str, sections) -> tuple[int, int]:
        numel = check_entry(entry, self.KEYS, at)
        bits = int_field(entry, "bits", at, 1, MAX_BITS)
        index_bits = int_field(entry, "index_bits", at, 1, MAX_BITS)
        expect(one_of(entry["coder"], CODERS), at, f"coder {entry['coder']!r} not in {sorted(CODERS)}")
        size = check_codebook(entry["codebook"], bits, name, at, sections)
        num_nonzero = int_field(entry, "num_nonzero", at, 0, numel if size else 0)
        filler = (1 << index_bits) - 1
        # fillers cover at least F zeros each, and the writer never ends with one
        most_entries = num_nonzero + (numel - num_nonzero) // filler if num_nonzero else 0
        num_entries = int_field(entry, "num_entries", at, num_nonzero, most_entries)
        params = entry["coder_params"]
        check_keys(params, {"weights", "positions"}, f"{at}: coder_params")
        coder = get_coder(entry["coder"])
        for label, count, alphabet in (("weights", num_nonzero, size), ("positions", num_entries, 1 << index_bits)):
            stream = entry[f"{label}_stream"]
            check_keys(stream, sections.keys(set(), stream=True), f"{at}: {label}_stream")
            length = sections.add(stream, at, f"{name}/{label}_stream")
            expect(isinstance(params[label], dict), at, f"coder_params[{label!r}] must be an object")
            if count == 0:
                expect(length == 0 and params[label] == {}, at, f"empty {label} stream must have 0 bytes and {{}} "
                       f"params, got {length} bytes", TensorInfoMismatch)
                continue
            untrusted_call(coder.validate_params, f"{at}: {label} coder params", params[label], alphabet)
            bound = _max_symbols(coder, length)
            expect(bound is None or count <= bound, at, f"{label} stream of {length} bytes cannot hold {count} "
                   f"{entry['coder']} symbols (at most {bound})", TensorInfoMismatch)
        return numel, 0

    def view(self, name: str, entry: dict, span, at: str) -> CodedTensor:
        return CodedTensor(
            shape=tuple(entry["shape"]), bits=entry["bits"], index_bits=entry["index_bits"], coder=entry["coder"],
            codebook=codebook_view(name, entry, span), num_nonzero=entry["num_nonzero"],
            num_entries=entry["num_entries"], weights_stream=span(f"{name}/weights_stream"),
            positions_stream=span(f"{name}/positions_stream"), coder_params=entry["coder_params"],
        )

    def decode(self, tensor: CodedTensor, where: str) -> np.ndarray:
        return decode_quantized(tensor, where)

    def stored_bytes(self, tensor: CodedTensor) -> int:
        return (tensor.codebook.nbytes + len(tensor.weights_stream) + len(tensor.positions_stream)
                + header_share(tensor.coder_params))

    def account(self, tensor: CodedTensor, where: str) -> dict:
        weight_entropy, position_entropy = tensor.weights_entropy_bits, tensor.positions_entropy_bits
        if weight_entropy is None or position_entropy is None:  # read from a file: measure by decoding
            symbols, entries = decode_symbols(tensor, where)
            weight_entropy = float(entropy_bits(symbols, len(tensor.codebook))) if len(symbols) else 0.0
            position_entropy = float(entropy_bits(entries, 1 << tensor.index_bits)) if len(entries) else 0.0
        weight_bits, position_bits = 8 * len(tensor.weights_stream), 8 * len(tensor.positions_stream)
        codebook_bytes, nnz = tensor.codebook.nbytes, tensor.num_nonzero
        return dict(
            nonzero=nnz, bits=tensor.bits, index_bits=tensor.index_bits, num_entries=tensor.num_entries,
            fillers=tensor.num_entries - nnz, weight_stream_bits=weight_bits, position_stream_bits=position_bits,
            codebook_bytes=codebook_bytes, stored_bytes=codebook_bytes + (weight_bits + position_bits) // 8,
            bits_per_nonzero=(weight_bits + position_bits + 8 * codebook_bytes) / nnz if nnz else None,
            weight_entropy_bits=weight_entropy, position_entropy_bits=position_entropy,
        )

    def nonzeros(self, tensor: CodedTensor, where: str) -> tuple[np.ndarray, np.ndarray]:
        return decode_nonzeros(tensor, where)
