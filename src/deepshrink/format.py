"""Stage 4: the container that holds ``encode.py``'s coded and raw tensors, and its safe reader.

Layout (specified in ``docs/format.md``): ``b"DSHRINK\\0"``, u16 version, u16 flags, u64 header
length N, N bytes of zlib-compressed JSON header (with a preset dictionary from version 4), then the
payload: the sections (raw tensors, codebooks, coded streams) back to back in tensor-name order,
their lengths in the header and one CRC32 over the payload. A quantized weight is stored as the
paper describes (codec ``deep_compression``: for each non-zero, its cluster index and the zero-run
before it in ``index_bits`` bits, with filler entries for longer runs) or as one context-coded stream
of signed levels (codec ``cabac``); a tensor of one repeated value is that value (codec
``constant``); a float tensor on a uniform grid is its step and its context-coded levels (codec
``grid``). Versions 1 to 3 are still read, and written on request for older readers.

The reader treats every file as hostile: all checks that need no decoding run first, in a fixed
order, and each failure raises its own ``FormatError`` subclass (see ``read_header``).
``compress.py`` builds models on top (``compress_model``, ``load``); ``accounting.py`` says where
the bytes go (``inspect_file`` here reads a file for it).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .accounting import FileReport, account
from .codecs import CODECS, EncodedTensor, codec_of, codecs_in
from .codecs.common import HEADER_DICTIONARY, check_keys, expect, is_int, one_of
from .errors import (
    BadMagic,
    ChecksumMismatch,
    ConfigError,
    FormatError,
    HeaderTooLarge,
    HeaderTooSmall,
    InvalidHeader,
    InvalidOffset,
    TensorInfoMismatch,
    TrailingBytes,
    UnsupportedVersion,
)
from .files import atomic_write

MAGIC = b"DSHRINK\0"
#: Version 2 added the ``cabac`` codec. Version 3 packs the sections (no alignment padding), states
#: only the lengths the header cannot derive, keeps one CRC32 for the payload instead of one per
#: section and adds the ``constant`` codec: on ResNet-20 the version-2 header was 7% of the file,
#: most of it offsets and CRCs, which are incompressible. ``write_file(..., version=2)`` still
#: writes the old layout (the lowest of 1 and 2 that holds the file's codecs) for older readers.
#: Version 4 deflates the header with a preset dictionary (``HEADER_DICTIONARY``) and adds the ``grid``
#: codec: on a 50K-weight MLP the header was a tenth of the file and the float16 biases a sixth.
VERSION = 4
VERSIONS = (1, 2, 3, 4)
LEGACY_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<8sHHQ")  # magic, version, flags, header length
#: flags bit 0: the JSON header is zlib-compressed. Per-tensor entries (offsets, CRCs, code-length
#: tables) are repetitive text: deflate shrinks them 3-5x, which matters on small models, where the
#: plain header was up to a fifth of the file. Other bits are reserved.
FLAG_DEFLATED_HEADER = 1
KNOWN_FLAGS = (0, FLAG_DEFLATED_HEADER)
PREFIX_SIZE = _PREFIX.size  # 20
ALIGN = 8  # versions 1-2: every section and the payload start on a multiple of 8

MAX_HEADER_BYTES = 16 << 20  # a header larger than this is an attack, not a model
MAX_SPEC_BYTES = 16 << 10  # model spec as JSON: real ones are a name and a few kwargs
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


SECTION_KEYS = {"offsets", "crc32"}  # versions 1-2: where each section lies, and its checksum
TOP_KEYS = {"format", "version", "model", "meta", "tensors"}  # + "payload_crc32" from version 3


# ---------------------------------------------------------------- writing


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def serialize(tensors: dict[str, EncodedTensor], model_spec: dict | None = None, meta: dict | None = None,
              version: int = VERSION) -> list[bytes]:
    """The file as a list of byte chunks (prefix+header, then the sections), deterministic.

    ``version`` 1 or 2 writes the aligned layout with offsets and CRCs per section (the lowest of the
    two that holds the codecs; constants stored raw, cabac streams recoded with version 2's contexts)
    for readers older than version 3; ``version`` 3 the packed layout with a header deflated without
    the preset dictionary, for readers older than 4.

    Raises:
        ConfigError: a tensor name is empty, the spec/meta is not JSON (NaN, non-string keys...), or
            ``version`` is unknown or cannot hold the tensors (cabac needs 2, grid 4).
    """
    if model_spec is not None and not isinstance(model_spec, dict):
        raise ConfigError(f"model_spec must be a dict or None, got {type(model_spec).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict or None, got {type(meta).__name__}")
    if version not in VERSIONS:
        raise ConfigError(f"format version must be one of {VERSIONS}, got {version!r}")
    packed = version not in LEGACY_VERSIONS
    sections: list[bytes] = []
    cursor = 0

    def add(data: bytes, stream: bool = False) -> dict:
        """Append a section; returns what its header part says about where it lies."""
        nonlocal cursor
        if packed:  # back to back; only a stream's length is not derivable from the header
            sections.append(data)
            cursor += len(data)
            return {"bytes": len(data)} if stream else {}
        begin = _align(cursor)
        if begin > cursor:
            sections.append(bytes(begin - cursor))
        sections.append(data)
        cursor = begin + len(data)
        return {"offsets": [begin, cursor], "crc32": _crc(data)}

    entries: dict[str, dict] = {}
    for name in sorted(tensors):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor names must be non-empty strings, got {name!r}")
        codec = codec_of(tensors[name], name)
        entries[name] = entry = codec.entry(name, tensors[name], add, version)
        first = CODECS[entry["codec"]].first_version
        if first > version:
            raise ConfigError(f"{name}: format version {version} cannot hold codec {entry['codec']!r} "
                              f"({entry['codec']} needs version {first})")
    if not packed:  # the lowest of versions 1-2 that holds every codec of the file
        version = max((CODECS[entry["codec"]].first_version for entry in entries.values()), default=1)
    header = {"format": "deepshrink", "version": version, "model": model_spec, "meta": meta or {}, "tensors": entries}
    if packed:
        header["payload_crc32"] = _crc_chunks(sections)
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model spec, meta or coder params are not plain JSON ({e})") from None
    if len(text) > MAX_HEADER_BYTES:
        raise ConfigError(f"header of {len(text)} bytes exceeds the format's limit {MAX_HEADER_BYTES}")
    deflate = zlib.compressobj(9, zdict=HEADER_DICTIONARY) if version >= 4 else zlib.compressobj(9)
    raw = deflate.compress(text.encode("utf-8")) + deflate.flush()
    if not packed:
        raw += bytes(_align(PREFIX_SIZE + len(raw)) - PREFIX_SIZE - len(raw))  # zero padding: payload 8-aligned
    return [_PREFIX.pack(MAGIC, version, FLAG_DEFLATED_HEADER, len(raw)) + raw, *sections]


def _crc_chunks(chunks) -> int:
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


def write_file(
    path: str | os.PathLike, tensors: dict[str, EncodedTensor], model_spec: dict | None = None,
    meta: dict | None = None, version: int = VERSION,
) -> Path:
    """Write encoded tensors to ``path`` atomically (temp file + rename); the same input gives the same bytes.
    ``version`` < 3 writes the older layout (see ``serialize``)."""
    return write_chunks(path, serialize(tensors, model_spec, meta, version))


def write_chunks(path: str | os.PathLike, chunks: list[bytes]) -> Path:
    """Write ``serialize``'s chunks to ``path`` atomically."""

    def write(f) -> None:
        for chunk in chunks:
            f.write(chunk)

    return atomic_write(path, write)


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
    crc32: int | None  # versions 1-2; version 3 has one CRC32 for the whole payload
    label: str  # e.g. "fc1.bias" or "fc1.weight/codebook"


class _Sections:
    """The sections the header claims, in tensor-name order: where each lies is stated (offsets and a
    CRC32 per section, versions 1-2) or follows from packing them back to back (version 3)."""

    def __init__(self, version: int):
        self.packed = version not in LEGACY_VERSIONS
        self.items: list[_Section] = []

    def keys(self, keys: set[str], stream: bool = False) -> set[str]:
        """The key set of a header part holding a section: a stream states its length when packed."""
        if self.packed:
            return keys | {"bytes"} if stream else keys
        return keys | SECTION_KEYS

    def add(self, part: dict, where: str, label: str, length: int | None = None) -> int:
        """Record the section of ``part`` (``length``: what the header implies, None for a stream); returns
        its length: the stated one when offsets are stated, for the caller to compare."""
        if self.packed:
            if length is None:
                length = part["bytes"]
                expect(is_int(length) and length >= 0, where, f"section {label}: 'bytes' must be an integer >= 0, "
                       f"got {length!r}")
            begin = self.items[-1].end if self.items else 0
            self.items.append(_Section(begin, begin + length, None, label))
            return length
        expect(is_int(part.get("crc32")) and 0 <= part["crc32"] < 1 << 32, where,
               f"section {label}: 'crc32' must be a u32")
        offsets = part.get("offsets")
        expect(isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets), where,
               f"section {label}: 'offsets' must be [begin, end] integers, got {offsets!r}")
        begin, end = offsets
        expect(0 <= begin <= end, where, f"section {label}: offsets [{begin}, {end}] are not 0 <= begin <= end",
               InvalidOffset)
        self.items.append(_Section(begin, end, part["crc32"], label))
        return end - begin


@dataclass
class _Parsed:
    path: Path
    file_bytes: int
    header_bytes: int  # prefix + padded JSON
    header: dict
    payload: memoryview
    sections: dict[str, _Section]  # by label

    def span(self, label: str) -> memoryview:
        section = self.sections[label]
        return self.payload[section.begin : section.end]


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
    if version not in VERSIONS or flags not in KNOWN_FLAGS:
        raise UnsupportedVersion(f"{where}: version {version} flags {flags:#x}; this reader knows versions {VERSIONS}, "
                                 f"flags {KNOWN_FLAGS}")
    # 2. header length: capped, inside the file, payload aligned
    if header_len > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"{where}: header length {header_len} exceeds the cap {MAX_HEADER_BYTES}")
    if PREFIX_SIZE + header_len > len(data):
        raise HeaderTooLarge(f"{where}: header length {header_len} runs past the end of the {len(data)}-byte file")
    if header_len < 2:
        raise HeaderTooSmall(f"{where}: header length {header_len} cannot hold a JSON object")
    if version in LEGACY_VERSIONS and (PREFIX_SIZE + header_len) % ALIGN:
        raise InvalidHeader(f"{where}: header length {header_len} leaves the payload unaligned "
                            f"(prefix + header must be a multiple of {ALIGN})")
    # 3. inflate (bounded), strict UTF-8, JSON without duplicate keys or NaN, then the schema
    header_bytes = data[PREFIX_SIZE : PREFIX_SIZE + header_len]
    if flags & FLAG_DEFLATED_HEADER:
        header_bytes = _inflate_header(header_bytes, where, padded=version in LEGACY_VERSIONS,
                                       dictionary=version >= 4)
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
    sections = _check_schema(header, where, len(data), max_expansion, version, max_memory)
    # 4. sections tile the payload: sorted, from 0, aligned (1-2) or packed (3), zero padding, no overlap,
    # no trailing bytes
    _check_tiling(sections.items, payload, where, 1 if sections.packed else ALIGN)
    # 5. checksums
    if sections.packed:
        crc = _crc(payload)
        if crc != header["payload_crc32"]:
            raise ChecksumMismatch(f"{where}: payload CRC32 {crc:#010x}, header says {header['payload_crc32']:#010x}")
    for s in sections.items:
        if s.crc32 is not None and (crc := _crc(payload[s.begin : s.end])) != s.crc32:
            raise ChecksumMismatch(f"{where}: section {s.label}: CRC32 {crc:#010x}, header says {s.crc32:#010x}")
    return _Parsed(path, len(data), PREFIX_SIZE + header_len, header, payload, {s.label: s for s in sections.items})


def _inflate_header(data: bytes, where: str, padded: bool, dictionary: bool) -> bytes:
    """Decompress a deflated header without ever producing more than MAX_HEADER_BYTES (no zip bomb);
    ``padded``: zero bytes may follow the stream (versions 1-2 align the payload); ``dictionary``: the
    stream may use ``HEADER_DICTIONARY`` (version 4; zlib checks its Adler-32 against the stream's)."""
    inflater = zlib.decompressobj(zdict=HEADER_DICTIONARY) if dictionary else zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_HEADER_BYTES + 1)
    except zlib.error as e:
        raise InvalidHeader(f"{where}: compressed header is corrupt ({e})") from None
    if len(text) > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"{where}: compressed header inflates past the cap {MAX_HEADER_BYTES}")
    if not inflater.eof:
        raise InvalidHeader(f"{where}: compressed header is truncated")
    if inflater.unused_data.strip(b"\0") or (inflater.unused_data and not padded):
        raise InvalidHeader(f"{where}: bytes other than {'zero padding' if padded else 'the stream'} follow the "
                            "compressed header")
    return text


def _check_schema(header: Any, where: str, file_bytes: int, max_expansion: int, version: int,
                  max_memory: int | None = None) -> _Sections:
    """Known keys, types, allowlists and bounds; returns every section the entries claim."""
    sections = _Sections(version)
    check_keys(header, TOP_KEYS | ({"payload_crc32"} if sections.packed else set()), f"{where}: header")
    expect(header["format"] == "deepshrink", where, f"'format' is {header['format']!r}, expected 'deepshrink'")
    expect(is_int(header["version"]) and header["version"] == version, where,
           f"header version {header['version']!r} disagrees with the prefix version {version}", UnsupportedVersion)
    expect(header["model"] is None or isinstance(header["model"], dict), where, "'model' must be an object or null")
    spec_bytes = len(json.dumps(header["model"]))
    expect(spec_bytes <= MAX_SPEC_BYTES, where, f"model spec of {spec_bytes} bytes exceeds {MAX_SPEC_BYTES} (its "
           "kwargs could ask for millions of modules)", HeaderTooLarge)
    expect(isinstance(header["meta"], dict), where, "'meta' must be an object")
    expect(isinstance(header["tensors"], dict), where, "'tensors' must be an object")
    if sections.packed:
        expect(is_int(header["payload_crc32"]) and 0 <= header["payload_crc32"] < 1 << 32, where,
               "'payload_crc32' must be a u32")
    coded_elements = raw_bytes = 0
    for name in sorted(header["tensors"]):  # the order sections are packed in
        entry = header["tensors"][name]
        at = f"{where}: tensor {name!r}"
        expect(bool(name), where, "empty tensor name")
        codecs = codecs_in(version)
        expect(isinstance(entry, dict) and one_of(entry.get("codec"), codecs), at,
               f"'codec' must be one of {codecs} in a version-{version} file")
        elements, copied = CODECS[entry["codec"]].check(entry, name, at, sections)
        coded_elements += elements  # a constant has no bytes in the file: its elements count too
        raw_bytes += copied
    limit = EXPANSION_ALLOWANCE + max_expansion * file_bytes
    expect(coded_elements <= limit, where, f"coded and constant tensors decode to {coded_elements} elements, more than "
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


def _check_tiling(sections: list[_Section], payload: memoryview, where: str, align: int) -> None:
    cursor = 0
    for s in sorted(sections, key=lambda s: (s.begin, s.end)):
        expected = -(-cursor // align) * align
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

    Order: size >= prefix -> magic -> version/flags -> header length (cap, inside the file; aligned in
    versions 1-2) -> UTF-8 -> JSON (no duplicate keys, no NaN) -> schema, allowlists and bounds ->
    sections tile the payload -> no trailing bytes -> CRC32 of the payload (of every section in 1-2).

    Raises:
        HeaderTooSmall, BadMagic, UnsupportedVersion, HeaderTooLarge, InvalidHeader, TensorInfoMismatch,
        InvalidOffset, TrailingBytes, ChecksumMismatch (all ``FormatError``), or CodecError for coder
        params the coder rejects.
    """
    return _parse(path, max_expansion, max_memory).header


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
    for name, encoded in _encoded(parsed).items():
        array = codec_of(encoded).decode(encoded, f"{parsed.path}: tensor {name!r}")
        tensors[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))
    return parsed.header, tensors


TIED_KEY = "tied_weights"  # meta entry {alias: first name}: tensors stored once, under the first name


def tied_aliases(header: dict, tensors: dict[str, torch.Tensor], where: str = "file") -> dict[str, str]:
    """The file's ``{alias: first name}`` map, checked against its tensors (the header is untrusted).

    Raises:
        InvalidHeader: not a map of names, an alias that is also stored, or a first name not stored.
    """
    tied = (header.get("meta") or {}).get(TIED_KEY, {})
    expect(isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()),
           where, f"meta {TIED_KEY!r} must map tensor names to tensor names")
    for alias, first in tied.items():
        expect(alias not in tensors, where, f"meta {TIED_KEY!r}: {alias!r} is stored and also tied to {first!r}")
        expect(first in tensors, where, f"meta {TIED_KEY!r}: {alias!r} is tied to {first!r}, which is not stored")
    return tied


def with_aliases(header: dict, tensors: dict[str, torch.Tensor], where: str = "file") -> dict[str, torch.Tensor]:
    """``tensors`` plus every tied alias, each the same tensor object as its first name (name order)."""
    tied = tied_aliases(header, tensors, where)
    full = {**tensors, **{alias: tensors[first] for alias, first in tied.items()}}
    return {k: full[k] for k in sorted(full)}


def _encoded(parsed: _Parsed) -> dict[str, EncodedTensor]:
    """The file's tensors as encoded objects viewing its payload (nothing decoded)."""
    out: dict[str, EncodedTensor] = {}
    for name, entry in sorted(parsed.header["tensors"].items()):
        out[name] = CODECS[entry["codec"]].view(name, entry, parsed.span, f"{parsed.path}: tensor {name!r}")
    return out


def inspect_file(path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION) -> FileReport:
    """Per-tensor accounting of a file on disk (see ``accounting.account``): validated as ``read_header``
    does, and every coded stream decoded once to measure its entropy (this also verifies the streams).

    Raises:
        the errors of ``read_file``.
    """
    parsed = _parse(path, max_expansion)
    return account(_encoded(parsed), path=str(parsed.path), file_bytes=parsed.file_bytes,
                   header_bytes=parsed.header_bytes)
