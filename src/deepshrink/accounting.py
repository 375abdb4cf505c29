"""Where the bytes of a compressed file go, from the encoded tensors themselves.

``account`` builds a ``FileReport`` from encoded tensors and the file's size: right after writing,
the streams and their entropies are still in memory, so nothing is read back or decoded. A tensor
read from a file does not carry its streams' entropy; ``account`` then decodes those streams to
measure it (that is what ``format.inspect_file`` does, and what ``compress_model(verify=True)``
compares against).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .coding import entropy_bits
from .encode import (DTYPES, CabacTensor, CodedTensor, ConstantTensor, Encoded, GridTensor, RawTensor, decode_grid,
                     decode_levels, decode_symbols, levels_entropy)


@dataclass(frozen=True)
class FileReport:
    """Where the bytes of a compressed file go. ``ratio`` is measured on disk, headers included.

    ``dense_bytes`` is the plain state dict as torch holds it with floats at float32 (4 bytes per
    float element, itemsize for integer/bool tensors). ``lab_estimate_*`` is the quick estimate
    (non-zero fraction x average weight code length / 32 over coded layers): it ignores positions,
    codebooks and raw tensors, so it is not a file size. ``entropy_bound_ratio`` replaces each coded
    stream by its Shannon entropy: no coder of these symbols (memoryless) can beat it.
    """

    path: str
    file_bytes: int
    header_bytes: int
    dense_bytes: int
    ratio: float
    rows: list[dict]
    totals: dict
    lab_estimate_fraction: float | None
    lab_estimate_ratio: float | None
    entropy_bound_ratio: float  # the ratio if every coded stream took exactly its entropy

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CODED_COLUMNS = ("bits", "index_bits", "num_entries", "fillers", "weight_stream_bits", "position_stream_bits",
                  "codebook_bytes", "bits_per_nonzero", "weight_entropy_bits", "position_entropy_bits")


def _raw_row(array: np.ndarray) -> dict:
    return {"nonzero": int(np.count_nonzero(array)), "stored_bytes": array.size * array.dtype.itemsize}


def _stream_entropies(coded: CodedTensor, where: str) -> tuple[float, float]:
    if coded.weights_entropy_bits is not None and coded.positions_entropy_bits is not None:
        return coded.weights_entropy_bits, coded.positions_entropy_bits
    symbols, entries = decode_symbols(coded, where)  # read from a file: measure by decoding
    weights = float(entropy_bits(symbols, len(coded.codebook))) if len(symbols) else 0.0
    positions = float(entropy_bits(entries, 1 << coded.index_bits)) if len(entries) else 0.0
    return weights, positions


def _coded_row(coded: CodedTensor, where: str) -> dict:
    weight_entropy, position_entropy = _stream_entropies(coded, where)
    weight_bits, position_bits = 8 * len(coded.weights_stream), 8 * len(coded.positions_stream)
    codebook_bytes = coded.codebook.nbytes
    nnz = coded.num_nonzero
    return dict(
        nonzero=nnz, bits=coded.bits, index_bits=coded.index_bits, num_entries=coded.num_entries,
        fillers=coded.num_entries - nnz, weight_stream_bits=weight_bits, position_stream_bits=position_bits,
        codebook_bytes=codebook_bytes, stored_bytes=codebook_bytes + (weight_bits + position_bits) // 8,
        bits_per_nonzero=(weight_bits + position_bits + 8 * codebook_bytes) / nnz if nnz else None,
        weight_entropy_bits=weight_entropy, position_entropy_bits=position_entropy,
    )


def _cabac_row(coded: CabacTensor, where: str) -> dict:
    entropy = coded.levels_entropy_bits
    if entropy is None:  # read from a file: measure by decoding
        entropy = levels_entropy(decode_levels(coded, where))
    stream_bits, codebook_bytes, nnz = 8 * len(coded.stream), coded.codebook.nbytes, coded.num_nonzero
    return dict(
        nonzero=nnz, bits=coded.bits, weight_stream_bits=stream_bits, position_stream_bits=0,
        codebook_bytes=codebook_bytes, stored_bytes=codebook_bytes + stream_bits // 8,
        bits_per_nonzero=(stream_bits + 8 * codebook_bytes) / nnz if nnz else None,
        # memoryless entropy of the levels, zeros included: the contexts may code below it
        weight_entropy_bits=entropy, position_entropy_bits=0.0,
    )


def _dense_bytes(encoded: Encoded) -> tuple[int, int]:
    """(numel, bytes of the tensor in the dense float32 state dict)."""
    numel = math.prod(encoded.shape)
    if isinstance(encoded, (RawTensor, ConstantTensor)):
        return numel, numel * (4 if encoded.dtype.kind == "f" else encoded.dtype.itemsize)
    return numel, numel * DTYPES["float32"][0].itemsize  # coded tensors decode to float32


def account(tensors: dict[str, Encoded], *, path: str, file_bytes: int, header_bytes: int) -> FileReport:
    """Per-tensor accounting: stream sizes beside their entropy, fillers, bits per non-zero, totals.

    Args:
        tensors: the file's encoded tensors (as written, or as read back by ``format``).
        path: reported as is.
        file_bytes: the file's size on disk; header_bytes: its prefix and padded header.

    Raises:
        CodecError, TensorInfoMismatch: only for tensors read from a file, whose streams are decoded.
    """
    rows: list[dict] = []
    dense_bytes = 0
    for name in sorted(tensors):
        encoded = tensors[name]
        numel, dense = _dense_bytes(encoded)
        dense_bytes += dense
        codec = {RawTensor: "raw", ConstantTensor: "constant", CabacTensor: "cabac",
                 GridTensor: "grid"}.get(type(encoded), "deep_compression")
        row = {"name": name, "codec": codec, "shape": list(encoded.shape), "numel": numel,
               **dict.fromkeys(_CODED_COLUMNS)}
        if isinstance(encoded, RawTensor):
            row.update(_raw_row(encoded.array))
        elif isinstance(encoded, ConstantTensor):  # the value is in the header: no payload bytes
            row.update(nonzero=numel if encoded.value else 0, stored_bytes=0)
        elif isinstance(encoded, GridTensor):  # a bias or norm scale: stored like a raw tensor, not a weight
            if encoded.levels_entropy_bits is None:  # read from a file: verify the stream as for coded tensors
                decode_grid(encoded, f"{path}: tensor {name!r}")
            row.update(nonzero=encoded.num_nonzero, stored_bytes=len(encoded.stream))
        elif isinstance(encoded, CabacTensor):
            row.update(_cabac_row(encoded, f"{path}: tensor {name!r}"))
        else:
            row.update(_coded_row(encoded, f"{path}: tensor {name!r}"))
        rows.append(row)
    coded_rows = [r for r in rows if r["codec"] not in ("raw", "constant", "grid")]
    totals = {
        "tensors": len(rows),
        "coded_tensors": len(coded_rows),
        "numel": sum(r["numel"] for r in rows),
        "coded_numel": sum(r["numel"] for r in coded_rows),
        "coded_nonzero": sum(r["nonzero"] for r in coded_rows),
        "fillers": sum(r["fillers"] or 0 for r in coded_rows),
        "weight_stream_bits": sum(r["weight_stream_bits"] for r in coded_rows),
        "position_stream_bits": sum(r["position_stream_bits"] for r in coded_rows),
        "weight_entropy_bits": sum(r["weight_entropy_bits"] for r in coded_rows),
        "position_entropy_bits": sum(r["position_entropy_bits"] for r in coded_rows),
        "codebook_bytes": sum(r["codebook_bytes"] for r in coded_rows),
        "raw_bytes": sum(r["stored_bytes"] for r in rows if r["codec"] == "raw"),
        "grid_bytes": sum(r["stored_bytes"] for r in rows if r["codec"] == "grid"),
        "header_bytes": header_bytes,
        "padding_bytes": file_bytes - header_bytes - sum(r["stored_bytes"] for r in rows),
    }
    fraction = None
    if totals["coded_numel"] and totals["coded_nonzero"]:
        # (nnz / numel) x (weight bits / nnz) / 32 = weight bits / (32 numel)
        fraction = totals["weight_stream_bits"] / (32 * totals["coded_numel"])
    stream_bits = totals["weight_stream_bits"] + totals["position_stream_bits"]
    entropy = totals["weight_entropy_bits"] + totals["position_entropy_bits"]
    bound_bytes = file_bytes - stream_bits / 8 + entropy / 8
    return FileReport(
        path=str(path), file_bytes=file_bytes, header_bytes=header_bytes,
        dense_bytes=dense_bytes, ratio=dense_bytes / file_bytes, rows=rows, totals=totals,
        lab_estimate_fraction=fraction, lab_estimate_ratio=1 / fraction if fraction else None,
        entropy_bound_ratio=dense_bytes / bound_bytes,
    )
