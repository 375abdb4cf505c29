"""Stage 4: the compressed file that holds ``encode.py``'s coded and raw tensors, and its safe loader.

Layout (specified in ``docs/format.md``): ``b"DSHRINK\\0"``, u16 version, u16 flags, u64 header
length N, N bytes of JSON header (space-padded so the payload starts 8-byte aligned), then the
payload: 8-byte aligned sections (raw tensors, codebooks, weight and position streams), each with a
CRC32. A quantized weight is stored as the paper describes: for each non-zero, its cluster index and
the zero-run before it in ``index_bits`` bits, with filler entries for longer runs.

The reader treats every file as hostile: all checks that need no decoding run first, in a fixed
order, and each failure raises its own ``FormatError`` subclass (see ``read_header``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write
from .coding import CODERS, entropy_bits, get_coder
from .encode import (
    DTYPES,
    MAX_BITS,
    MAX_TENSOR_ELEMENTS,
    CodedTensor,
    Encoded,
    EncodeConfig,
    RawTensor,
    decode_quantized,
    decode_symbols,
    encode_model,
    is_int,
    jsonable,
    untrusted_call,
)
from .errors import (
    BadMagic,
    ChecksumMismatch,
    ConfigError,
    DeepShrinkError,
    FormatError,
    HeaderTooLarge,
    HeaderTooSmall,
    InvalidHeader,
    InvalidOffset,
    TensorInfoMismatch,
    TrailingBytes,
    UnsupportedVersion,
)

log = logging.getLogger(__name__)

MAGIC = b"DSHRINK\0"
VERSION = 1
_PREFIX = struct.Struct("<8sHHQ")  # magic, version, flags, header length
#: flags bit 0: the JSON header is zlib-compressed. Per-tensor entries (offsets, CRCs, code-length
#: tables) are repetitive text: deflate shrinks them 3-5x, which matters on small models, where the
#: plain header was up to a fifth of the file. Other bits are reserved.
FLAG_DEFLATED_HEADER = 1
KNOWN_FLAGS = (0, FLAG_DEFLATED_HEADER)
PREFIX_SIZE = _PREFIX.size  # 20
ALIGN = 8

MAX_HEADER_BYTES = 16 << 20  # a header larger than this is an attack, not a model
MAX_SPEC_BYTES = 16 << 10  # model spec as JSON: real ones are a name and a few kwargs
MAX_NDIM = 32
#: Decoded elements of coded tensors allowed per byte of file, plus a fixed allowance: a tiny file
#: must not make the loader allocate gigabytes of zeros (raise it for files you trust). Measured by
#: bench/expansion.py: the demo file needs 6.6 elements per byte, a layer pruned 99% 62-65 (either
#: coder, 5- or 8-bit index); 256 leaves 4x room and caps decoding near 24 * (2**16 + 256 * B) bytes.
DEFAULT_MAX_EXPANSION = 256
EXPANSION_ALLOWANCE = 1 << 16
#: Peak bytes ``read_file`` may hold per coded element (the dense float32 output, decoded symbols,
#: position entries and int64 positions of the tensor being decoded): bench/expansion.py measured
#: 12.8-16.9 on unpruned layers and 4.0 on 99%-pruned ones, so 24 is an upper bound.
DECODE_BYTES_PER_ELEMENT = 24

CODED_DTYPES = ("float32",)  # dtype of a decoded deep_compression tensor
CODEBOOK_DTYPES = ("float32", "float16")

RAW_KEYS = {"codec", "dtype", "shape", "offsets", "crc32"}
CODED_KEYS = {
    "codec", "dtype", "shape", "bits", "index_bits", "coder", "coder_params", "num_nonzero",
    "num_entries", "codebook", "weights_stream", "positions_stream",
}
TOP_KEYS = {"format", "version", "model", "meta", "tensors"}


# ---------------------------------------------------------------- writing


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def serialize(tensors: dict[str, Encoded], model_spec: dict | None = None, meta: dict | None = None) -> list[bytes]:
    """The file as a list of byte chunks (prefix+header, then sections and padding), deterministic.

    Raises:
        ConfigError: a tensor name is empty, or the spec/meta is not JSON (NaN, non-string keys...).
    """
    if model_spec is not None and not isinstance(model_spec, dict):
        raise ConfigError(f"model_spec must be a dict or None, got {type(model_spec).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict or None, got {type(meta).__name__}")
    sections: list[bytes] = []
    entries: dict[str, dict] = {}
    cursor = 0

    def add(data: bytes) -> dict:
        nonlocal cursor
        begin = _align(cursor)
        if begin > cursor:
            sections.append(bytes(begin - cursor))
        sections.append(data)
        cursor = begin + len(data)
        return {"offsets": [begin, cursor], "crc32": _crc(data)}

    for name in sorted(tensors):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor names must be non-empty strings, got {name!r}")
        enc = tensors[name]
        if isinstance(enc, RawTensor):
            arr = enc.array
            dtype = next((n for n, (d, _) in DTYPES.items() if d == arr.dtype.newbyteorder("<")), None)
            if dtype is None:
                raise ConfigError(f"{name}: numpy dtype {arr.dtype} is not storable; supported: {', '.join(DTYPES)}")
            data = arr.astype(DTYPES[dtype][0], order="C").tobytes()
            entries[name] = {"codec": "raw", "dtype": dtype, "shape": [int(d) for d in arr.shape], **add(data)}
        elif isinstance(enc, CodedTensor):
            cb_name = next((n for n in CODEBOOK_DTYPES if DTYPES[n][0] == enc.codebook.dtype.newbyteorder("<")), None)
            if cb_name is None:
                raise ConfigError(f"{name}: codebook dtype {enc.codebook.dtype}, expected one of {CODEBOOK_DTYPES}")
            codebook = {"dtype": cb_name, "size": len(enc.codebook),
                        **add(enc.codebook.astype(DTYPES[cb_name][0]).tobytes())}
            entries[name] = {
                "codec": "deep_compression", "dtype": "float32", "shape": list(enc.shape), "bits": enc.bits,
                "index_bits": enc.index_bits, "coder": enc.coder, "coder_params": enc.coder_params,
                "num_nonzero": enc.num_nonzero, "num_entries": enc.num_entries, "codebook": codebook,
                "weights_stream": add(enc.weights_stream), "positions_stream": add(enc.positions_stream),
            }
        else:
            raise ConfigError(f"{name}: expected a RawTensor or CodedTensor, got {type(enc).__name__}")
    header = {"format": "deepshrink", "version": VERSION, "model": model_spec, "meta": meta or {}, "tensors": entries}
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model spec, meta or coder params are not plain JSON ({e})") from None
    if len(text) > MAX_HEADER_BYTES:
        raise ConfigError(f"header of {len(text)} bytes exceeds the format's limit {MAX_HEADER_BYTES}")
    raw = zlib.compress(text.encode("utf-8"), 9)
    raw += bytes(_align(PREFIX_SIZE + len(raw)) - PREFIX_SIZE - len(raw))  # zero padding: payload 8-aligned
    return [_PREFIX.pack(MAGIC, VERSION, FLAG_DEFLATED_HEADER, len(raw)) + raw, *sections]


def write_file(
    path: str | os.PathLike, tensors: dict[str, Encoded], model_spec: dict | None = None, meta: dict | None = None
) -> Path:
    """Write encoded tensors to ``path`` atomically (temp file + rename); the same input gives the same bytes."""
    chunks = serialize(tensors, model_spec, meta)

    def write(f) -> None:
        for chunk in chunks:
            f.write(chunk)

    return atomic_write(path, write)


def compress_model(
    model: nn.Module,
    path: str | os.PathLike,
    config: EncodeConfig = EncodeConfig(),
    *,
    model_spec: dict | None = None,
    meta: dict | None = None,
) -> "FileReport":
    """Write ``model`` as a compressed file and return its accounting (read back from disk).

    Args:
        model: any module; weights with a ``SharedWeights`` parametrization are entropy coded, every
            other tensor of the plain state dict is stored raw. The model is not modified.
        path: destination, written atomically.
        config: coder, index bits, stored float precision.
        model_spec: ``{"arch": ...}`` or ``{"factory": ...}`` so that ``load`` can rebuild the model.
        meta: free JSON metadata (dataset, accuracy, configs).
    """
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict or None, got {type(meta).__name__}")
    meta = {"encode": jsonable(dataclasses.asdict(config)), **(meta or {})}  # the caller's keys win
    write_file(path, encode_model(model, config), model_spec, meta)
    file_report = inspect_file(path)
    log.info("%s: %d bytes, %.1fx smaller than dense float32", path, file_report.file_bytes, file_report.ratio)
    return file_report


# ---------------------------------------------------------------- reading: the untrusted load order


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise InvalidHeader(f"duplicate key {key!r} in JSON header")
        out[key] = value
    return out


def _reject_constant(name: str):
    raise InvalidHeader(f"JSON header holds {name}, which is not JSON")


@dataclass(frozen=True)
class _Section:
    begin: int
    end: int
    crc32: int
    label: str  # e.g. "fc1.bias" or "fc1.weight/codebook"


@dataclass
class _Parsed:
    path: Path
    file_bytes: int
    header_bytes: int  # prefix + padded JSON
    header: dict
    payload: memoryview
    sections: list[_Section]


def _parse(path: str | os.PathLike, max_expansion: int, max_memory: int | None = None) -> _Parsed:
    """Run every check that needs no decoding, in the documented order; return the parsed file."""
    path = Path(path)
    if not is_int(max_expansion) or max_expansion < 0:
        raise ConfigError(f"max_expansion must be an integer >= 0, got {max_expansion!r}")
    if max_memory is not None and (not is_int(max_memory) or max_memory < 0):
        raise ConfigError(f"max_memory must be a number of bytes >= 0 or None, got {max_memory!r}")
    try:
        data = path.read_bytes()
    except OSError as e:  # not a check on the contents: the base class
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from None
    where = str(path)
    # 1. fixed prefix, magic, version
    if len(data) < PREFIX_SIZE:
        raise HeaderTooSmall(f"{where}: {len(data)} bytes, smaller than the {PREFIX_SIZE}-byte prefix")
    magic, version, flags, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BadMagic(f"{where}: starts with {magic!r}, expected {MAGIC!r} (not a deepshrink file)")
    if version != VERSION or flags not in KNOWN_FLAGS:
        raise UnsupportedVersion(f"{where}: version {version} flags {flags:#x}; this reader knows version {VERSION}, "
                                 f"flags {KNOWN_FLAGS}")
    # 2. header length: capped, inside the file, payload aligned
    if header_len > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"{where}: header length {header_len} exceeds the cap {MAX_HEADER_BYTES}")
    if PREFIX_SIZE + header_len > len(data):
        raise HeaderTooLarge(f"{where}: header length {header_len} runs past the end of the {len(data)}-byte file")
    if header_len < 2:
        raise HeaderTooSmall(f"{where}: header length {header_len} cannot hold a JSON object")
    if (PREFIX_SIZE + header_len) % ALIGN:
        raise InvalidHeader(f"{where}: header length {header_len} leaves the payload unaligned "
                            f"(prefix + header must be a multiple of {ALIGN})")
    # 3. inflate (bounded), strict UTF-8, JSON without duplicate keys or NaN, then the schema
    header_bytes = data[PREFIX_SIZE : PREFIX_SIZE + header_len]
    if flags & FLAG_DEFLATED_HEADER:
        header_bytes = _inflate_header(header_bytes, where)
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidHeader(f"{where}: header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except InvalidHeader as e:
        raise InvalidHeader(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise InvalidHeader(f"{where}: header is not valid JSON ({e})") from None
    payload = memoryview(data)[PREFIX_SIZE + header_len :]
    sections = _check_schema(header, where, len(data), max_expansion, max_memory)
    # 4. sections tile the payload: sorted, from 0, 8-aligned, zero padding, no overlap, no trailing bytes
    _check_tiling(sections, payload, where)
    # 5. checksums
    for s in sections:
        crc = _crc(payload[s.begin : s.end])
        if crc != s.crc32:
            raise ChecksumMismatch(f"{where}: section {s.label}: CRC32 {crc:#010x}, header says {s.crc32:#010x}")
    return _Parsed(path, len(data), PREFIX_SIZE + header_len, header, payload, sections)


def _inflate_header(data: bytes, where: str) -> bytes:
    """Decompress a deflated header without ever producing more than MAX_HEADER_BYTES (no zip bomb)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_HEADER_BYTES + 1)
    except zlib.error as e:
        raise InvalidHeader(f"{where}: compressed header is corrupt ({e})") from None
    if len(text) > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"{where}: compressed header inflates past the cap {MAX_HEADER_BYTES}")
    if not inflater.eof:
        raise InvalidHeader(f"{where}: compressed header is truncated")
    if inflater.unused_data.strip(b"\0"):
        raise InvalidHeader(f"{where}: bytes other than zero padding follow the compressed header")
    return text


def _one_of(value: Any, allowed) -> bool:
    return isinstance(value, str) and value in allowed  # a JSON list/object is unhashable: no TypeError


def _expect(cond: bool, where: str, message: str, error: type[DeepShrinkError] = InvalidHeader) -> None:
    if not cond:
        raise error(f"{where}: {message}")


def _check_keys(obj: Any, keys: set[str], where: str) -> None:
    _expect(isinstance(obj, dict), where, f"expected a JSON object, got {type(obj).__name__}")
    unknown, missing = set(obj) - keys, keys - set(obj)
    _expect(not unknown, where, f"unknown key(s) {sorted(unknown)}")
    _expect(not missing, where, f"missing key(s) {sorted(missing)}")


def _int_field(obj: dict, key: str, where: str, lo: int, hi: int) -> int:
    v = obj[key]
    _expect(is_int(v), where, f"{key!r} must be an integer, got {v!r}")
    _expect(lo <= v <= hi, where, f"{key!r}={v} outside {lo}..{hi}", TensorInfoMismatch)
    return int(v)


def _section(obj: Any, where: str, sections: list[_Section], label: str) -> int:
    """Validate an {"offsets": [b, e], "crc32": c} part, record the section, return its length."""
    _expect(is_int(obj.get("crc32")) and 0 <= obj["crc32"] < 1 << 32, where, f"section {label}: 'crc32' must be a u32")
    offsets = obj.get("offsets")
    _expect(isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets), where,
            f"section {label}: 'offsets' must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    _expect(0 <= begin <= end, where, f"section {label}: offsets [{begin}, {end}] are not 0 <= begin <= end",
            InvalidOffset)
    sections.append(_Section(begin, end, obj["crc32"], label))
    return end - begin


def _shape(entry: dict, where: str) -> int:
    shape = entry["shape"]
    _expect(isinstance(shape, list) and len(shape) <= MAX_NDIM, where,
            f"'shape' must be a list of at most {MAX_NDIM} integers, got {shape!r}")
    _expect(all(is_int(d) and d >= 0 for d in shape), where,
            f"'shape' entries must be non-negative integers: {shape!r}")
    _expect(all(d <= MAX_TENSOR_ELEMENTS for d in shape), where,
            f"shape {shape} has a dimension over {MAX_TENSOR_ELEMENTS}", TensorInfoMismatch)
    numel = math.prod(shape)
    _expect(numel <= MAX_TENSOR_ELEMENTS, where, f"shape {shape} has {numel} elements, over the limit "
            f"{MAX_TENSOR_ELEMENTS}", TensorInfoMismatch)
    return numel


def _check_schema(header: Any, where: str, file_bytes: int, max_expansion: int,
                  max_memory: int | None = None) -> list[_Section]:
    """Known keys, types, allowlists and bounds; returns every section the entries claim."""
    _check_keys(header, TOP_KEYS, f"{where}: header")
    _expect(header["format"] == "deepshrink", where, f"'format' is {header['format']!r}, expected 'deepshrink'")
    _expect(is_int(header["version"]) and header["version"] == VERSION, where,
            f"header version {header['version']!r} disagrees with the prefix version {VERSION}", UnsupportedVersion)
    _expect(header["model"] is None or isinstance(header["model"], dict), where, "'model' must be an object or null")
    spec_bytes = len(json.dumps(header["model"]))
    _expect(spec_bytes <= MAX_SPEC_BYTES, where, f"model spec of {spec_bytes} bytes exceeds {MAX_SPEC_BYTES} (its "
            "kwargs could ask for millions of modules)", HeaderTooLarge)
    _expect(isinstance(header["meta"], dict), where, "'meta' must be an object")
    _expect(isinstance(header["tensors"], dict), where, "'tensors' must be an object")
    sections: list[_Section] = []
    coded_elements = raw_bytes = 0
    for name, entry in header["tensors"].items():
        at = f"{where}: tensor {name!r}"
        _expect(bool(name), where, "empty tensor name")
        _expect(isinstance(entry, dict) and _one_of(entry.get("codec"), ("raw", "deep_compression")), at,
                "'codec' must be 'raw' or 'deep_compression'")
        if entry["codec"] == "raw":
            _check_keys(entry, RAW_KEYS, at)
            _expect(_one_of(entry["dtype"], DTYPES), at, f"dtype {entry['dtype']!r} not in {sorted(DTYPES)}")
            numel = _shape(entry, at)
            length = _section(entry, at, sections, name)
            expected = numel * DTYPES[entry["dtype"]][0].itemsize
            _expect(length == expected, at, f"section holds {length} bytes, shape {entry['shape']} of "
                    f"{entry['dtype']} needs {expected}", TensorInfoMismatch)
            raw_bytes += expected
        else:
            coded_elements += _check_coded(entry, name, at, sections)
    limit = EXPANSION_ALLOWANCE + max_expansion * file_bytes
    _expect(coded_elements <= limit, where, f"coded tensors decode to {coded_elements} elements, more than "
            f"{limit} allowed for a {file_bytes}-byte file (max_expansion={max_expansion}; raise it only for "
            "files you trust)", TensorInfoMismatch)
    need = decode_memory(coded_elements, raw_bytes)
    if max_memory is not None and need > max_memory:
        raise TensorInfoMismatch(f"{where}: decoding needs about {need:,} bytes ({coded_elements:,} coded elements x "
                                 f"{DECODE_BYTES_PER_ELEMENT} + {raw_bytes:,} raw bytes), more than "
                                 f"max_memory={max_memory:,}")
    return sections


def decode_memory(coded_elements: int, raw_bytes: int) -> int:
    """Bytes ``read_file`` may hold at its peak beyond the file itself: what ``max_memory`` is compared with."""
    return DECODE_BYTES_PER_ELEMENT * coded_elements + raw_bytes


def _check_coded(entry: dict, name: str, at: str, sections: list[_Section]) -> int:
    _check_keys(entry, CODED_KEYS, at)
    _expect(_one_of(entry["dtype"], CODED_DTYPES), at, f"dtype {entry['dtype']!r} not in {CODED_DTYPES}")
    numel = _shape(entry, at)
    bits = _int_field(entry, "bits", at, 1, MAX_BITS)
    index_bits = _int_field(entry, "index_bits", at, 1, MAX_BITS)
    _expect(_one_of(entry["coder"], CODERS), at, f"coder {entry['coder']!r} not in {sorted(CODERS)}")
    codebook = entry["codebook"]
    _check_keys(codebook, {"dtype", "offsets", "crc32", "size"}, f"{at}: codebook")
    _expect(_one_of(codebook["dtype"], CODEBOOK_DTYPES), at,
            f"codebook dtype {codebook['dtype']!r} not in {CODEBOOK_DTYPES}")
    size = _int_field(codebook, "size", f"{at}: codebook", 0, 1 << bits)
    length = _section(codebook, at, sections, f"{name}/codebook")
    expected = size * DTYPES[codebook["dtype"]][0].itemsize
    _expect(length == expected, at, f"codebook section holds {length} bytes, {size} {codebook['dtype']} "
            f"values need {expected}", TensorInfoMismatch)
    num_nonzero = _int_field(entry, "num_nonzero", at, 0, numel if size else 0)
    filler = (1 << index_bits) - 1
    # fillers cover at least F zeros each, and the writer never ends with one
    most_entries = num_nonzero + (numel - num_nonzero) // filler if num_nonzero else 0
    num_entries = _int_field(entry, "num_entries", at, num_nonzero, most_entries)
    params = entry["coder_params"]
    _check_keys(params, {"weights", "positions"}, f"{at}: coder_params")
    coder = get_coder(entry["coder"])
    for label, count, alphabet in (("weights", num_nonzero, size), ("positions", num_entries, 1 << index_bits)):
        stream = entry[f"{label}_stream"]
        _check_keys(stream, {"offsets", "crc32"}, f"{at}: {label}_stream")
        length = _section(stream, at, sections, f"{name}/{label}_stream")
        _expect(isinstance(params[label], dict), at, f"coder_params[{label!r}] must be an object")
        if count == 0:
            _expect(length == 0 and params[label] == {}, at, f"empty {label} stream must have 0 bytes and {{}} "
                    f"params, got {length} bytes", TensorInfoMismatch)
            continue
        untrusted_call(coder.validate_params, f"{at}: {label} coder params", params[label], alphabet)
        bound = _max_symbols(entry["coder"], length)
        _expect(bound is None or count <= bound, at, f"{label} stream of {length} bytes cannot hold {count} "
                f"{entry['coder']} symbols (at most {bound})", TensorInfoMismatch)
    return numel


def _max_symbols(coder: str, stream_bytes: int) -> int | None:
    """Most symbols a stream of ``stream_bytes`` can decode to, where the coder bounds it (None: no bound)."""
    if coder == "huffman":
        return 8 * stream_bytes  # every Huffman codeword is at least one bit
    return None  # ANS: a near-certain symbol costs almost nothing; numel bounds the count instead


def _check_tiling(sections: list[_Section], payload: memoryview, where: str) -> None:
    cursor = 0
    for s in sorted(sections, key=lambda s: (s.begin, s.end)):
        expected = _align(cursor)
        if s.begin < expected:
            raise InvalidOffset(f"{where}: section {s.label} begins at {s.begin}, overlapping the section "
                                f"ending at {cursor}")
        if s.begin > expected:
            raise InvalidOffset(f"{where}: section {s.label} begins at {s.begin}; expected {expected} (the gap is not "
                                "alignment padding)")
        if s.end > len(payload):
            raise InvalidOffset(f"{where}: section {s.label} ends at {s.end}, past the {len(payload)}-byte payload")
        if any(payload[cursor : s.begin]):
            raise InvalidOffset(f"{where}: non-zero padding before section {s.label}")
        cursor = s.end
    if cursor != len(payload):
        raise TrailingBytes(f"{where}: {len(payload) - cursor} bytes after the last section (payload ends at {cursor})")


def read_header(
    path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION, max_memory: int | None = None
) -> dict:
    """Validate a file without decoding and return its JSON header.

    Order: size >= prefix -> magic -> version/flags -> header length (cap, inside the file, aligned)
    -> UTF-8 -> JSON (no duplicate keys, no NaN) -> schema, allowlists and bounds -> sections tile the
    payload -> no trailing bytes -> CRC32 of every section.

    Raises:
        HeaderTooSmall, BadMagic, UnsupportedVersion, HeaderTooLarge, InvalidHeader, TensorInfoMismatch,
        InvalidOffset, TrailingBytes, ChecksumMismatch (all ``FormatError``), or CodecError for coder
        params the coder rejects.
    """
    return _parse(path, max_expansion, max_memory).header


def _coded_view(entry: dict, payload: memoryview) -> CodedTensor:
    def span(part: dict) -> memoryview:
        begin, end = part["offsets"]
        return payload[begin:end]

    cb = entry["codebook"]
    return CodedTensor(
        shape=tuple(entry["shape"]), bits=entry["bits"], index_bits=entry["index_bits"], coder=entry["coder"],
        codebook=np.frombuffer(span(cb), dtype=DTYPES[cb["dtype"]][0]),
        num_nonzero=entry["num_nonzero"], num_entries=entry["num_entries"],
        weights_stream=bytes(span(entry["weights_stream"])), positions_stream=bytes(span(entry["positions_stream"])),
        coder_params=entry["coder_params"],
    )


def _raw_array(entry: dict, payload: memoryview, at: str) -> np.ndarray:
    begin, end = entry["offsets"]
    dtype = DTYPES[entry["dtype"]][0]
    if entry["dtype"] == "bool":
        as_bytes = np.frombuffer(payload[begin:end], dtype=np.uint8)
        if len(as_bytes) and int(as_bytes.max()) > 1:
            raise TensorInfoMismatch(f"{at}: bool tensor holds byte {int(as_bytes.max())}, expected 0 or 1")
    return np.frombuffer(payload[begin:end], dtype=dtype).reshape(entry["shape"])


def read_file(
    path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION, max_memory: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate (see ``read_header``), then decode every tensor.

    Args:
        max_expansion: coded elements allowed per file byte (plus ``EXPANSION_ALLOWANCE``); the
            default covers every real file measured (see docs/format.md). Raise it only for files you trust.
        max_memory: if given, the most bytes decoding may take (``decode_memory``: 24 per coded element
            plus the raw tensors); checked with the header, before anything is decoded.

    Returns:
        (header, tensors): tensors in the stored dtype (quantized weights float32), CPU, in name order.

    Raises:
        every error of ``read_header``; CodecError for a malformed stream; TensorInfoMismatch when
        decoded symbols are out of range or positions fall outside the tensor.
    """
    parsed = _parse(path, max_expansion, max_memory)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(parsed.header["tensors"]):
        entry = parsed.header["tensors"][name]
        at = f"{parsed.path}: tensor {name!r}"
        if entry["codec"] == "raw":
            array = _raw_array(entry, parsed.payload, at).copy()  # own, writable memory
        else:
            array = decode_quantized(_coded_view(entry, parsed.payload), at)
        tensors[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))
    return parsed.header, tensors


def load(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    trust_factory: bool = False,
    max_expansion: int = DEFAULT_MAX_EXPANSION,
    max_memory: int | None = None,
) -> nn.Module | dict[str, torch.Tensor]:
    """Load a compressed file: a model with plain weights if its spec is a built-in, else the state dict.

    A ``{"factory": "pkg.mod:fn"}`` spec imports and runs code named by the file, so it is built only
    with ``trust_factory=True``. The architecture is first built on the meta device and compared with
    the file, so a spec with inflated kwargs cannot make the loader allocate a huge model.
    ``max_expansion`` and ``max_memory`` bound the decoding as in ``read_file``.

    Raises:
        every error of ``read_file``; TensorInfoMismatch when the tensors do not fit the model;
        ConfigError for a spec that does not build.
    """
    header, tensors = read_file(path, max_expansion=max_expansion, max_memory=max_memory)
    spec = header["model"]
    if spec is None or ("factory" in spec and not trust_factory):
        if spec is not None:
            log.warning("%s: model factory %r not built (pass trust_factory=True if you trust the file); "
                        "returning the state dict", path, spec["factory"])
        return {k: v.to(map_location) for k, v in tensors.items()}
    from .models import build_model as build_untrusted  # models is a leaf module; imported here to keep format light

    def build_model(spec: dict) -> nn.Module:  # one gate for files and checkpoints: build_model's
        return build_untrusted(spec, trust_factory=trust_factory)

    where = f"{path}: model {spec}"
    try:
        with torch.device("meta"):  # no memory: a spec with inflated kwargs is caught by the shape check
            expected = build_model(spec).state_dict()
    except DeepShrinkError:  # unknown arch, kwargs the constructor does not take
        raise
    except Exception:  # code that cannot run on the meta device, or rejects the kwargs: the real build decides
        expected = None
    _check_fits(expected, tensors, where)
    model = _build(build_model, spec, where)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise TensorInfoMismatch(f"{path}: tensors do not fit model {spec}: {e}") from None
    return model.to(map_location)


def _build(build_model: Callable, spec: dict, where: str) -> nn.Module:
    try:
        return build_model(spec)
    except DeepShrinkError:
        raise
    except Exception as e:  # kwargs from the file that a constructor rejects (negative sizes...)
        raise ConfigError(f"{where}: cannot build the model ({type(e).__name__}: {e})") from None


def _check_fits(expected: dict[str, torch.Tensor] | None, tensors: dict[str, torch.Tensor], where: str) -> None:
    if expected is None:
        return
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TensorInfoMismatch(f"{where}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in expected.items():
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise TensorInfoMismatch(f"{where}: {name} has shape {tuple(tensors[name].shape)} in the file, "
                                     f"the model expects {tuple(t.shape)}")


# ---------------------------------------------------------------- accounting


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


def inspect_file(path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION) -> FileReport:
    """Per-tensor accounting of a file: stream sizes beside their entropy, fillers, bits per non-zero.

    Raises:
        the errors of ``read_file`` (streams are decoded to measure their entropy).
    """
    parsed = _parse(path, max_expansion)
    rows: list[dict] = []
    dense_bytes = 0
    for name in sorted(parsed.header["tensors"]):
        entry = parsed.header["tensors"][name]
        at = f"{parsed.path}: tensor {name!r}"
        numel = math.prod(entry["shape"])
        itemsize = DTYPES[entry["dtype"]][0].itemsize
        is_float = entry["dtype"].startswith("float")
        dense_bytes += numel * (4 if is_float else itemsize)
        row = {"name": name, "codec": entry["codec"], "shape": list(entry["shape"]), "numel": numel}
        row.update(dict.fromkeys(("bits", "index_bits", "num_entries", "fillers", "weight_stream_bits",
                                  "position_stream_bits", "codebook_bytes", "bits_per_nonzero",
                                  "weight_entropy_bits", "position_entropy_bits")))
        if entry["codec"] == "raw":
            array = _raw_array(entry, parsed.payload, at)
            row.update(nonzero=int(np.count_nonzero(array)), stored_bytes=numel * itemsize)
        else:
            coded = _coded_view(entry, parsed.payload)
            symbols, entries = decode_symbols(coded, at)
            weight_bits, position_bits = 8 * len(coded.weights_stream), 8 * len(coded.positions_stream)
            codebook_bytes = coded.codebook.nbytes
            nnz = coded.num_nonzero
            row.update(
                nonzero=nnz, bits=coded.bits, index_bits=coded.index_bits, num_entries=coded.num_entries,
                fillers=coded.num_entries - nnz, weight_stream_bits=weight_bits, position_stream_bits=position_bits,
                codebook_bytes=codebook_bytes, stored_bytes=codebook_bytes + (weight_bits + position_bits) // 8,
                bits_per_nonzero=(weight_bits + position_bits + 8 * codebook_bytes) / nnz if nnz else None,
                weight_entropy_bits=float(entropy_bits(symbols, len(coded.codebook))) if nnz else 0.0,
                position_entropy_bits=float(entropy_bits(entries, 1 << coded.index_bits)) if len(entries) else 0.0,
            )
        rows.append(row)
    coded_rows = [r for r in rows if r["codec"] == "deep_compression"]
    totals = {
        "tensors": len(rows),
        "coded_tensors": len(coded_rows),
        "numel": sum(r["numel"] for r in rows),
        "coded_numel": sum(r["numel"] for r in coded_rows),
        "coded_nonzero": sum(r["nonzero"] for r in coded_rows),
        "fillers": sum(r["fillers"] for r in coded_rows),
        "weight_stream_bits": sum(r["weight_stream_bits"] for r in coded_rows),
        "position_stream_bits": sum(r["position_stream_bits"] for r in coded_rows),
        "weight_entropy_bits": sum(r["weight_entropy_bits"] for r in coded_rows),
        "position_entropy_bits": sum(r["position_entropy_bits"] for r in coded_rows),
        "codebook_bytes": sum(r["codebook_bytes"] for r in coded_rows),
        "raw_bytes": sum(r["stored_bytes"] for r in rows if r["codec"] == "raw"),
        "header_bytes": parsed.header_bytes,
        "padding_bytes": parsed.file_bytes - parsed.header_bytes - sum(r["stored_bytes"] for r in rows),
    }
    fraction = None
    if totals["coded_numel"] and totals["coded_nonzero"]:
        # (nnz / numel) x (weight bits / nnz) / 32 = weight bits / (32 numel)
        fraction = totals["weight_stream_bits"] / (32 * totals["coded_numel"])
    stream_bits = totals["weight_stream_bits"] + totals["position_stream_bits"]
    entropy = totals["weight_entropy_bits"] + totals["position_entropy_bits"]
    bound_bytes = parsed.file_bytes - stream_bits / 8 + entropy / 8
    return FileReport(
        path=str(parsed.path), file_bytes=parsed.file_bytes, header_bytes=parsed.header_bytes,
        dense_bytes=dense_bytes, ratio=dense_bytes / parsed.file_bytes, rows=rows, totals=totals,
        lab_estimate_fraction=fraction, lab_estimate_ratio=1 / fraction if fraction else None,
        entropy_bound_ratio=dense_bytes / bound_bytes,
    )


