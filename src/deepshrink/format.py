"""Stage 4: the ``.dsz`` container: ``write_file`` lays encoded tensors out, ``open_file`` is the one way in.

Layout (specified in ``docs/format.md``): ``b"DSHRINK\\0"``, u16 version, u16 flags, u64 header
length N, N bytes of zlib-compressed JSON header (with a preset dictionary from version 4), then the
payload: the sections (raw tensors, codebooks, coded streams) back to back in tensor-name order,
their lengths in the header and one CRC32 over the payload. ``write_tensors`` takes the tensors as
they are encoded (the payload spools, the header follows from it); ``serialize`` lays out a dict.
How each tensor lies in it is its codec's business (``deepshrink.codecs``); this module knows no
codec by name. Only the current version is written; versions 1 to 3 are still read.

``open_file`` treats every file as hostile: every check that needs no decoding runs first, in a fixed
order, each failure raising its own ``FormatError`` subclass, and every bound (expansion, memory,
entries, the tied-weight map, the dataset record) is checked there, before anything is sized from the
file. It returns a ``CompressedFile``: the checked header and each tensor as an encoded view of the
file's bytes, which the dense loader (``compress.load``), the sparse runtime, ``inspect`` and the CLI
decode from. ``read_header``, ``read_file`` and ``inspect_file`` are its one-line uses.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .accounting import FileReport, account
from .codecs import CODECS, EncodedTensor, codec_of, codecs_in
from .codecs.common import HEADER_DICTIONARY, check_keys, expect, is_int, one_of
from .data import check_dataset_record
from .errors import (BadMagic, ChecksumMismatch, ConfigError, FormatError, HeaderTooLarge, HeaderTooSmall, InvalidHeader,
                     InvalidOffset, TensorInfoMismatch, TrailingBytes, UnsupportedVersion, WriteError)
from .files import atomic_write

MAGIC = b"DSHRINK\0"
#: Version 2 added the ``cabac`` codec. Version 3 packs the sections (no alignment padding), states
#: only the lengths the header cannot derive, keeps one CRC32 for the payload instead of one per
#: section and adds the ``constant`` codec: on ResNet-20 the version-2 header was 7% of the file,
#: most of it offsets and CRCs, which are incompressible. Version 4 deflates the header with a preset
#: dictionary (``HEADER_DICTIONARY``) and adds the ``grid`` codec: on a 50K-weight MLP the header was a
#: tenth of the file and the float16 biases a sixth. Only version 4 is written.
VERSION = 4
VERSIONS = (1, 2, 3, 4)  # read
LEGACY_VERSIONS = (1, 2)  # aligned sections with stated offsets and a CRC32 each
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
#: Tensors per file. GPT-2 XL has 580 and a 70B-parameter transformer about 720; checking an entry
#: costs microseconds, so a header of 250,000 one-element constants (600 KB) took 17 s to refuse.
MAX_TENSORS = 1 << 16
#: Decoded elements of coded tensors allowed per byte of file, plus a fixed allowance: a tiny file
#: must not make the loader allocate gigabytes of zeros (raise it for files you trust). Measured by
#: bench/expansion.py: the demo file needs 6.6 elements per byte, a layer pruned 99% 62-65 (either
#: coder, 5- or 8-bit index); 256 leaves 4x room and caps decoding near 24 * (2**16 + 256 * B) bytes.
#: The rows of every tensor of 2 or more dimensions count too (the sparse runtime holds a pointer per
#: row): a weight of shape [R, 0] has no elements but R rows.
DEFAULT_MAX_EXPANSION = 256
EXPANSION_ALLOWANCE = 1 << 16
#: Peak bytes decoding may hold per coded element (the dense float32 output, decoded symbols,
#: position entries and int64 positions of the tensor being decoded): bench/expansion.py measured
#: 12.8-16.9 on unpruned layers and 4.0 on 99%-pruned ones, so 24 is an upper bound.
DECODE_BYTES_PER_ELEMENT = 24
#: ``write_tensors`` keeps this much payload in memory before it spills to a temporary file
SPOOL_BYTES = 64 << 20
COPY_BYTES = 4 << 20  # chunks of the payload's copy into the file

SECTION_KEYS = {"offsets", "crc32"}  # versions 1-2: where each section lies, and its checksum
TOP_KEYS = {"format", "version", "model", "meta", "tensors"}  # + "payload_crc32" from version 3
TIED_KEY = "tied_weights"  # meta entry {alias: first name}: tensors stored once, under the first name
DATASET_KEY = "dataset"  # meta entry: the dataset record (``data.check_dataset_record``)


# ---------------------------------------------------------------- writing


def _crc(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def serialize(tensors: dict[str, EncodedTensor], model_spec: dict | None = None,
              meta: dict | None = None) -> list[bytes]:
    """The file as a list of byte chunks (prefix+header, then the sections), deterministic.

    Raises:
        ConfigError: a tensor name is empty, too many tensors, a malformed dataset record, or the spec/meta
            is not JSON (NaN, non-string keys...).
    """
    _check_header_parts(model_spec, meta, len(tensors))
    sections: list[bytes] = []
    payload = _Payload(sections.append)
    entries = _entries(((name, tensors[name]) for name in sorted(tensors)), payload)
    return [_header_chunk(entries, payload.crc32, model_spec, meta), *sections]


def write_tensors(path: str | os.PathLike, tensors: Iterable[tuple[str, EncodedTensor]], model_spec: dict | None = None,
                  meta: dict | None = None, *, count: int = 0) -> tuple[Path, int]:
    """Write ``(name, encoded tensor)`` pairs as they come (in name order, as the file holds them) to ``path``,
    atomically; returns the path and the bytes of its prefix and header. The same bytes as ``serialize``.

    Each tensor's sections go to a temporary payload as soon as it arrives (in memory up to
    ``SPOOL_BYTES``, then an unnamed file beside ``path``), so no encoded tensor need be held once
    written; the header, which states the payload's CRC32 and stream lengths, is written last into the
    file before the payload is copied behind it. ``count``, when known, is checked against the format's
    limit before the first tensor comes.

    Raises:
        ConfigError: as ``serialize``, or names out of order; WriteError: the payload or the file
            could not be written (no partial file is left).
    """
    _check_header_parts(model_spec, meta, count)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}; no partial file was left") from e
    with spool:

        def append(data: bytes) -> None:
            try:
                spool.write(data)
            except OSError as e:
                raise WriteError(f"cannot write {path}'s payload: {e.strerror or e}; no partial file was left") from e

        payload = _Payload(append)
        head = _header_chunk(_entries(tensors, payload), payload.crc32, model_spec, meta)

        def write(f) -> None:
            f.write(head)
            spool.seek(0)
            shutil.copyfileobj(spool, f, COPY_BYTES)

        return atomic_write(path, write), len(head)


class _Payload:
    """The payload as its sections are appended, back to back, with their running CRC32."""

    def __init__(self, sink):
        self.sink = sink
        self.crc32 = 0

    def add(self, data: bytes, stream: bool = False) -> dict:
        """Append a section; only a stream's length is not derivable from the header."""
        self.sink(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        return {"bytes": len(data)} if stream else {}


def _check_header_parts(model_spec: dict | None, meta: dict | None, count: int = 0) -> None:
    """What the header will hold besides the entries, checked before any tensor is laid out."""
    if model_spec is not None and not isinstance(model_spec, dict):
        raise ConfigError(f"model_spec must be a dict or None, got {type(model_spec).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"meta must be a dict or None, got {type(meta).__name__}")
    if count > MAX_TENSORS:
        raise ConfigError(f"{count} tensors exceed the format's limit of {MAX_TENSORS} per file")
    if meta and DATASET_KEY in meta:  # a reader refuses a file whose record it cannot use: never write one
        check_dataset_record(meta[DATASET_KEY], f"meta {DATASET_KEY!r}", stored=True)
    try:  # before any tensor is encoded; _header_chunk checks the whole header again
        json.dumps([model_spec, meta], allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model spec, meta or coder params are not plain JSON ({e})") from None


def _entries(tensors: Iterable[tuple[str, EncodedTensor]], payload: _Payload) -> dict[str, dict]:
    """Each tensor's header entry, its sections appended to ``payload``; names must arrive sorted."""
    entries: dict[str, dict] = {}
    last = None
    for name, tensor in tensors:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor names must be non-empty strings, got {name!r}")
        if last is not None and not last < name:
            raise ConfigError(f"tensors must come in name order, without repeats: {name!r} after {last!r}")
        if len(entries) == MAX_TENSORS:
            raise ConfigError(f"more tensors than the format's limit of {MAX_TENSORS} per file")
        entries[name] = codec_of(tensor, name).entry(name, tensor, payload.add)
        last = name
    return entries


def _header_chunk(entries: dict[str, dict], crc32: int, model_spec: dict | None, meta: dict | None) -> bytes:
    """The fixed prefix and the deflated JSON header."""
    header = {"format": "deepshrink", "version": VERSION, "model": model_spec, "meta": meta or {},
              "tensors": entries, "payload_crc32": crc32 & 0xFFFFFFFF}
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model spec, meta or coder params are not plain JSON ({e})") from None
    if len(text) > MAX_HEADER_BYTES:
        raise ConfigError(f"header of {len(text)} bytes exceeds the format's limit {MAX_HEADER_BYTES}")
    deflate = zlib.compressobj(9, zdict=HEADER_DICTIONARY)
    raw = deflate.compress(text.encode("utf-8")) + deflate.flush()
    return _PREFIX.pack(MAGIC, VERSION, FLAG_DEFLATED_HEADER, len(raw)) + raw


def write_file(path: str | os.PathLike, tensors: dict[str, EncodedTensor], model_spec: dict | None = None,
               meta: dict | None = None) -> Path:
    """Write encoded tensors to ``path`` atomically (temp file + rename); the same input gives the same bytes."""
    _check_header_parts(model_spec, meta, len(tensors))
    return write_tensors(path, ((name, tensors[name]) for name in sorted(tensors)), model_spec, meta)[0]


def write_chunks(path: str | os.PathLike, chunks: list[bytes]) -> Path:
    """Write ``serialize``'s chunks to ``path`` atomically."""

    def write(f) -> None:
        for chunk in chunks:
            f.write(chunk)

    return atomic_write(path, write)


# ---------------------------------------------------------------- reading: the untrusted load order


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)  # in C; a shorter dict means a key came twice
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise InvalidHeader(f"duplicate key {duplicate!r} in JSON header")
    return out


def _reject_constant(name: str):
    raise InvalidHeader(f"JSON header holds {name}, which is not JSON")


@dataclass(frozen=True)
class _Section:
    begin: int
    end: int
    crc32: int | None  # versions 1-2; version 3 on has one CRC32 for the whole payload
    label: str  # e.g. "fc1.bias" or "fc1.weight/codebook"


class _Sections:
    """The sections the header claims, in tensor-name order: where each lies is stated (offsets and a
    CRC32 per section, versions 1-2) or follows from packing them back to back (version 3 on)."""

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


@dataclass(frozen=True)
class CompressedFile:
    """A ``.dsz`` file that passed every check ``open_file`` makes: its header, and each stored tensor as
    an encoded view of the file's bytes (nothing decoded). ``tied`` maps each alias of a tied tensor to
    the name it is stored under; ``dataset`` is the checked dataset record, if the file has one."""

    path: Path
    file_bytes: int
    header_bytes: int  # prefix + (padded) header
    header: dict
    encoded: dict[str, EncodedTensor]  # stored names, in name order
    tied: dict[str, str]
    dataset: dict | None
    sections: dict[str, tuple[int, int]]  # label ("fc1.bias", "fc1.weight/codebook"...) -> [begin, end) in the payload

    @property
    def model_spec(self) -> dict | None:
        return self.header["model"]

    @property
    def meta(self) -> dict:
        return self.header["meta"]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every name the file fills (aliases included) and its shape, in name order: what a model must match."""
        shapes = {name: tuple(t.shape) for name, t in self.encoded.items()}
        shapes.update({alias: shapes[first] for alias, first in self.tied.items()})
        return dict(sorted(shapes.items()))

    def where(self, name: str) -> str:
        return f"{self.path}: tensor {name!r}"

    def decode(self, name: str) -> torch.Tensor:
        """One stored tensor, dense, in its stored dtype, on the CPU (CodecError / TensorInfoMismatch for a
        malformed stream)."""
        encoded = self.encoded[name]
        array = codec_of(encoded).decode(encoded, self.where(name))
        return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))

    def is_weight(self, name: str) -> bool:
        """Whether tensor ``name`` is stored as a weight over a codebook (``nonzeros`` gives its sparse form)."""
        return codec_of(self.encoded[name]).weight

    def nonzeros(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A weight's non-zeros, checked: (flat positions, indices into its ``codebook``); never dense."""
        encoded = self.encoded[name]
        return codec_of(encoded).nonzeros(encoded, self.where(name))

    def decode_all(self) -> dict[str, torch.Tensor]:
        """Every stored tensor decoded (aliases not repeated), in name order."""
        return {name: self.decode(name) for name in self.encoded}

    def with_aliases(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """``tensors`` (by stored name) plus every tied alias, each the same object as its first name."""
        full = {**tensors, **{alias: tensors[first] for alias, first in self.tied.items()}}
        return {k: full[k] for k in sorted(full)}

    def report(self) -> FileReport:
        """Per-tensor accounting (``accounting.account``); coded streams are decoded to measure their entropy."""
        return account(self.encoded, path=str(self.path), file_bytes=self.file_bytes, header_bytes=self.header_bytes)


def open_file(path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION,
              max_memory: int | None = None) -> CompressedFile:
    """Run every check that needs no decoding, in the documented order, and return the checked file.

    Order: size >= prefix -> magic -> version/flags -> header length (cap, inside the file; aligned in
    versions 1-2) -> inflate (bounded) -> UTF-8 -> entry count -> JSON (no duplicate keys, no NaN) ->
    schema, allowlists and bounds (each codec checks its entries; elements and rows against
    ``max_expansion``, decoding memory against ``max_memory``) -> sections tile the payload -> no
    trailing bytes -> CRC32 of the payload (of every section in 1-2) -> the tied-weight map and the
    dataset record.

    Args:
        max_expansion: decoded elements allowed per file byte (plus ``EXPANSION_ALLOWANCE``); the
            default covers every real file measured (see docs/format.md). Raise it only for files you trust.
        max_memory: if given, the most bytes decoding may take (``decode_memory``), checked before
            anything is decoded.

    Raises:
        HeaderTooSmall, BadMagic, UnsupportedVersion, HeaderTooLarge, InvalidHeader, TensorInfoMismatch,
        InvalidOffset, TrailingBytes, ChecksumMismatch (all ``FormatError``), CodecError for coder
        params the coder rejects, ConfigError for bad bounds.
    """
    path = Path(path)
    if not is_int(max_expansion) or max_expansion < 0:
        raise ConfigError(f"max_expansion must be an integer >= 0, got {max_expansion!r}")
    if max_memory is not None and (not is_int(max_memory) or max_memory < 0):
        raise ConfigError(f"max_memory must be a number of bytes >= 0 or None, got {max_memory!r}")
    try:
        data = _contents(path)
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
    # 3. inflate (bounded), strict UTF-8, a bounded number of entries, JSON without duplicate keys or NaN,
    # then the schema
    header_bytes = data[PREFIX_SIZE : PREFIX_SIZE + header_len]
    if flags & FLAG_DEFLATED_HEADER:
        header_bytes = _inflate_header(header_bytes, where, padded=version in LEGACY_VERSIONS,
                                       dictionary=version >= 4)
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidHeader(f"{where}: header is not UTF-8 ({e.reason} at byte {e.start})") from None
    entries = text.count('"codec"')  # every tensor entry has one key "codec": an upper bound, counted in C
    if entries > MAX_TENSORS:
        raise HeaderTooLarge(f"{where}: the header holds about {entries} tensor entries, more than the format's "
                             f"{MAX_TENSORS}")
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except InvalidHeader as e:
        raise InvalidHeader(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise InvalidHeader(f"{where}: header is not valid JSON ({e})") from None
    payload = memoryview(data)[PREFIX_SIZE + header_len :]
    sections = _check_schema(header, where, len(data), max_expansion, version, max_memory)
    # 4. sections tile the payload: sorted, from 0, aligned (1-2) or packed (3-4), zero padding, no overlap,
    # no trailing bytes
    _check_tiling(sections.items, payload, where, 1 if sections.packed else ALIGN)
    # 5. checksums
    if sections.packed:
        crc = _crc(payload)
        if crc != header["payload_crc32"]:
            raise ChecksumMismatch(f"{where}: payload CRC32 {crc:#010x}, header says {header['payload_crc32']:#010x}")
    for s in sections.items:
        if s.crc32 is not None and (crc := _crc(payload[s.begin : s.end])) != s.crc32:
            raise ChecksumMismatch(f"{where}: section {s.label} CRC32 {crc:#010x}, header says {s.crc32:#010x}")
    # 6. what the metadata promises about the tensors and the data
    tied = _tied_aliases(header, where)
    dataset = header["meta"].get(DATASET_KEY)
    if dataset is not None:
        check_dataset_record(dataset, f"{where}: meta {DATASET_KEY!r}", InvalidHeader, stored=True)
    spans = {s.label: s for s in sections.items}

    def span(label: str) -> memoryview:
        return payload[spans[label].begin : spans[label].end]

    encoded = {name: CODECS[entry["codec"]].view(name, entry, span, f"{where}: tensor {name!r}")
               for name, entry in sorted(header["tensors"].items())}
    return CompressedFile(path, len(data), PREFIX_SIZE + header_len, header, encoded, tied, dataset,
                          {label: (s.begin, s.end) for label, s in spans.items()})


#: Files at least this large are memory-mapped, not read: their pages are the page cache's (the kernel
#: can drop them), not a second copy of the file held by the process; each encoded tensor views them
MMAP_MIN_BYTES = 16 << 20


def _contents(path: Path) -> bytes | mmap.mmap:
    """The file's bytes: read whole when small, mapped read-only when large. A mapped file truncated by
    another process while open makes the next access fail with SIGBUS, as any memory-mapped loader does."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < MMAP_MIN_BYTES or size == 0:  # an empty file cannot be mapped
            return f.read()
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


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
    codecs = codecs_in(version)
    elements = raw_bytes = 0
    for name in sorted(header["tensors"]):  # the order sections are packed in
        entry = header["tensors"][name]
        at = f"{where}: tensor {name!r}"
        expect(bool(name), where, "empty tensor name")
        expect(isinstance(entry, dict) and one_of(entry.get("codec"), codecs), at,
               f"'codec' must be one of {codecs} in a version-{version} file")
        decoded, copied = CODECS[entry["codec"]].check(entry, name, at, sections)
        shape = entry["shape"]  # checked by the codec
        elements += decoded + (shape[0] if len(shape) >= 2 else 0)  # a constant's elements count too; and rows
        raw_bytes += copied
    limit = EXPANSION_ALLOWANCE + max_expansion * file_bytes
    expect(elements <= limit, where, f"coded and constant tensors decode to {elements} elements and rows, more "
           f"than {limit} allowed for a {file_bytes}-byte file (max_expansion={max_expansion}; raise it only for "
           "files you trust)", TensorInfoMismatch)
    need = decode_memory(elements, raw_bytes)
    if max_memory is not None and need > max_memory:
        raise TensorInfoMismatch(f"{where}: decoding needs about {need:,} bytes ({elements:,} coded elements and "
                                 f"rows x {DECODE_BYTES_PER_ELEMENT} + {raw_bytes:,} raw bytes), more than "
                                 f"max_memory={max_memory:,}")
    return sections


def decode_memory(elements: int, raw_bytes: int) -> int:
    """Bytes decoding may hold at its peak beyond the file itself: what ``max_memory`` is compared with."""
    return DECODE_BYTES_PER_ELEMENT * elements + raw_bytes


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


def _tied_aliases(header: dict, where: str) -> dict[str, str]:
    """The file's ``{alias: first name}`` map, checked against its tensors (InvalidHeader: not a map of
    names, an alias that is also stored, or a first name not stored)."""
    tied = header["meta"].get(TIED_KEY, {})
    expect(isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()),
           where, f"meta {TIED_KEY!r} must map tensor names to tensor names")
    stored = header["tensors"]
    for alias, first in tied.items():
        expect(alias not in stored, where, f"meta {TIED_KEY!r}: {alias!r} is stored and also tied to {first!r}")
        expect(first in stored, where, f"meta {TIED_KEY!r}: {alias!r} is tied to {first!r}, which is not stored")
    return dict(tied)


def read_header(path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION,
                max_memory: int | None = None) -> dict:
    """Validate a file without decoding (``open_file``) and return its JSON header."""
    return open_file(path, max_expansion=max_expansion, max_memory=max_memory).header


def read_file(path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION,
              max_memory: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validate (``open_file``), then decode every stored tensor.

    Returns:
        (header, tensors): tensors in the stored dtype (quantized weights float32), CPU, in name order;
        tied aliases are not repeated (``CompressedFile.with_aliases`` adds them).

    Raises:
        every error of ``open_file``; CodecError for a malformed stream; TensorInfoMismatch when
        decoded symbols are out of range or positions fall outside the tensor.
    """
    file = open_file(path, max_expansion=max_expansion, max_memory=max_memory)
    return file.header, file.decode_all()


def inspect_file(path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION) -> FileReport:
    """Per-tensor accounting of a file on disk (``CompressedFile.report``): every coded stream is decoded
    once to measure its entropy, which also verifies the streams.

    Raises:
        the errors of ``read_file``.
    """
    return open_file(path, max_expansion=max_expansion).report()
