"""Where the bytes of a compressed file go, from the encoded tensors themselves.

``account`` builds a ``FileReport`` from encoded tensors and the file's size: right after writing,
the streams and their entropies are still in memory, so nothing is read back or decoded (``compress``
makes each tensor's row with ``account_row`` as it is written, and ``report_from_rows`` the report, so
that no tensor is kept for it). A tensor
read from a file does not carry its streams' entropy; ``account`` then decodes those streams to
measure it (that is what ``format.inspect_file`` does, and what ``compress_model(verify=True)``
compares against).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .codecs import CODECS, EncodedTensor, codec_of


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


def dense_bytes_of(encoded: EncodedTensor) -> int:
    """Bytes of the tensor in the dense state dict with floats at float32."""
    return math.prod(encoded.shape) * (4 if encoded.dtype.kind == "f" else encoded.dtype.itemsize)


def account_row(name: str, encoded: EncodedTensor, path: str) -> dict:
    """One tensor's row of the accounting: what ``account`` lists for it (made as each tensor is written,
    so that the encoded streams need not be held until the file is complete).

    Raises:
        CodecError, TensorInfoMismatch: only for a tensor read from a file, whose streams are decoded.
    """
    codec = codec_of(encoded, name)
    row = {"name": name, "codec": codec.name, "shape": list(encoded.shape), "numel": math.prod(encoded.shape),
           **dict.fromkeys(_CODED_COLUMNS)}
    row.update(codec.account(encoded, f"{path}: tensor {name!r}"))
    return row


def account(tensors: dict[str, EncodedTensor], *, path: str, file_bytes: int, header_bytes: int) -> FileReport:
    """Per-tensor accounting: stream sizes beside their entropy, fillers, bits per non-zero, totals.

    Args:
        tensors: the file's encoded tensors (as written, or as read back by ``format``).
        path: reported as is.
        file_bytes: the file's size on disk; header_bytes: its prefix and padded header.

    Raises:
        CodecError, TensorInfoMismatch: only for tensors read from a file, whose streams are decoded.
    """
    rows = [account_row(name, tensors[name], path) for name in sorted(tensors)]
    dense_bytes = sum(dense_bytes_of(t) for t in tensors.values())
    return report_from_rows(rows, dense_bytes, path=path, file_bytes=file_bytes, header_bytes=header_bytes)


def report_from_rows(rows: list[dict], dense_bytes: int, *, path: str, file_bytes: int,
                     header_bytes: int) -> FileReport:
    """The ``FileReport`` of ``account_row``'s rows (in name order) for a file of ``file_bytes`` whose tensors
    take ``dense_bytes`` in a dense state dict (``dense_bytes_of`` summed)."""
    coded_rows = [r for r in rows if CODECS[r["codec"]].weight]
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
