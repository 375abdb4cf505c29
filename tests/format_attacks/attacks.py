"""Hostile compressed files, one per loader check: docs/format.md's threat model, made executable.

``ATTACKS`` maps a name to an ``Attack``: the error the loader must raise, the stage that must catch
it ("header": ``read_header`` already rejects it; "decode": only decoding can tell), and a function
that turns the valid ``base_file()`` into the crafted bytes. ``tests/test_format.py`` runs them all.
To look at the files themselves::

    python tests/format_attacks/attacks.py OUTDIR     # writes OUTDIR/<name>.dsz
"""

from __future__ import annotations

import json
import zlib
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from deepshrink import errors
from deepshrink.coding import get_coder
from deepshrink.coding import level_coder
from deepshrink.codecs.cabac import CabacTensor, encode_levels
from deepshrink.codecs.deep_compression import CodedTensor, encode_quantized
from deepshrink.codecs.grid import encode_grid
from deepshrink.codecs.raw import ConstantTensor, RawTensor
from deepshrink.format import FLAG_DEFLATED_HEADER, HEADER_DICTIONARY, MAGIC, PREFIX_SIZE, VERSIONS, serialize


def _coded(shape, positions, symbols, codebook, bits, index_bits, coder="huffman") -> CodedTensor:
    indices = np.zeros(int(np.prod(shape)), dtype=np.int64)
    indices[np.asarray(positions)] = np.asarray(symbols) + 1
    return encode_quantized(indices.reshape(shape), np.asarray(codebook, np.float32), bits, index_bits, coder)


def base_tensors(version: int = 2) -> dict:
    """The valid file's tensors; each one is there for some attack (see comments)."""
    rng = np.random.default_rng(0)
    dense = rng.random((8, 50)) < 0.2
    ans_positions = np.flatnonzero(rng.random(240) < 0.3)
    return {
        "a.bias": RawTensor(np.arange(8, dtype="<f4")),  # the first section: 32 bytes at offset 0
        # 3 centroids = 12 bytes, so 4 bytes of alignment padding follow the codebook
        "a.weight": _coded((8, 50), np.flatnonzero(dense), rng.integers(0, 3, dense.sum()), [-0.5, 0.25, 1.0], 2, 3),
        # cabac (version 2): levels -2..2 over a sorted 4-value codebook, rows of 40
        "c.weight": encode_levels(np.where(rng.random((6, 40)) < 0.3, rng.integers(1, 5, (6, 40)), 0),
                                  np.array([0.7, -0.1, 0.2, -0.5], np.float32), 2),
        "bn.num_batches_tracked": RawTensor(np.array(7, dtype="<i8")),
        # a constant (version 3; written raw in version 2): 4 float16 ones, no payload bytes
        "bn.running_var": ConstantTensor((4,), np.dtype("<f2"), 1.0),
        "p.weight": _coded((100,), [10, 90], [0, 1], [-1.0, 1.0], 1, 8),  # last non-zero at 90
        # ANS, named last so that its positions stream is the payload's last section
        "z.weight": _coded((6, 40), ans_positions, rng.integers(0, 4, len(ans_positions)), [0.1, 0.2, 0.3, 0.4],
                           2, 4, "ans"),
        # a grid (version 4): 30 values on an 8-bit grid, some exactly zero
        **({"g.bias": encode_grid(np.where(rng.random(30) < 0.2, 0, rng.normal(0, 0.1, 30)), 8)} if version >= 4 else {}),
    }


FIXTURES = Path(__file__).resolve().parent.parent / "format_fixtures"


def base_file(version: int = 2) -> bytes:
    """The valid file the attacks edit: version 2 (stated offsets, a CRC32 per section), 3 (packed) or 4
    (the header deflated with the preset dictionary, and a grid tensor). deepshrink writes only the
    current version: the older ones are committed files, written by the writers of their time from
    ``base_tensors(version)``."""
    if version < 4:
        return (FIXTURES / f"attack-base-v{version}.dsz").read_bytes()
    return b"".join(serialize(base_tensors(version), None, {"dataset": {"name": "synthetic"}}))


# ---------------------------------------------------------------- editing helpers


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, payload) of a valid file."""
    version, flags, header_len = struct.unpack_from("<HHQ", data, 8)
    header = data[PREFIX_SIZE : PREFIX_SIZE + header_len]
    if flags & FLAG_DEFLATED_HEADER:
        header = zlib.decompressobj(**({"zdict": HEADER_DICTIONARY} if version >= 4 else {})).decompress(header)
    return json.loads(header), data[PREFIX_SIZE + header_len :]


def join(header: dict | str | bytes, payload: bytes, magic: bytes = MAGIC, version: int | None = None,
         flags: int = 0, header_len: int | None = None) -> bytes:
    """A file from a header (dict, or exact text/bytes), padded so the payload stays 8-aligned.

    The prefix version defaults to the header's own where that is a known version, else 1."""
    if version is None:
        version = header.get("version") if isinstance(header, dict) and header.get("version") in VERSIONS else 1
    if isinstance(header, dict):
        header = json.dumps(header, sort_keys=True, separators=(",", ":"))
    raw = header.encode() if isinstance(header, str) else header
    raw += b" " * (-(PREFIX_SIZE + len(raw)) % 8)
    return struct.pack("<8sHHQ", magic, version, flags, len(raw) if header_len is None else header_len) + raw + payload


def edit(fn: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    """Craft function that applies ``fn`` to the parsed header and keeps the payload."""

    def craft(data: bytes) -> bytes:
        header, payload = split(data)
        fn(header)
        return join(header, payload)

    return craft


def edit_text(fn: Callable[[str], str]) -> Callable[[bytes], bytes]:
    """Craft function that rewrites the header's JSON text (for what a dict cannot express)."""

    def craft(data: bytes) -> bytes:
        header, payload = split(data)
        return join(fn(json.dumps(header, sort_keys=True, separators=(",", ":"))), payload)

    return craft


def prefix(**fields) -> Callable[[bytes], bytes]:
    def craft(data: bytes) -> bytes:
        header, payload = split(data)
        return join(header, payload, **fields)

    return craft


def _deflated(compress: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Craft function that stores ``compress(header JSON)`` as a deflated header."""

    def craft(data: bytes) -> bytes:
        header, payload = split(data)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        raw = compress(text)
        raw += bytes(-(PREFIX_SIZE + len(raw)) % 8)
        return struct.pack("<8sHHQ", MAGIC, header["version"], FLAG_DEFLATED_HEADER, len(raw)) + raw + payload

    return craft


def payload_byte(locate: Callable[[dict], int], xor: int = 1) -> Callable[[bytes], bytes]:
    """Flip bits of one payload byte at ``locate(header)`` (an offset relative to the payload)."""

    def craft(data: bytes) -> bytes:
        header, payload = split(data)
        out = bytearray(data)
        out[len(data) - len(payload) + locate(header)] ^= xor
        return bytes(out)

    return craft


def tensors(header: dict) -> dict:
    return header["tensors"]


def _set(path: str, value) -> Callable[[dict], None]:
    """Edit helper: ``_set("a.bias/shape", [9])`` sets header["tensors"]["a.bias"]["shape"]."""
    name, *keys = path.split("/")

    def apply(header: dict) -> None:
        obj = header["tensors"][name]
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value(obj[keys[-1]]) if callable(value) else value

    return apply


def _entry(name: str, entry: dict) -> Callable[[dict], None]:
    """Edit helper: replace a tensor's whole header entry."""
    return lambda header: header["tensors"].update({name: entry})


def _stream_len(header: dict, name: str, stream: str) -> int:
    begin, end = header["tensors"][name][stream]["offsets"]
    return end - begin


def _inflate_count(header: dict) -> None:
    entry = header["tensors"]["a.weight"]
    entry["shape"] = [8, 5000]  # room for many fillers, so only the payload-size rule can object
    entry["num_entries"] = 8 * _stream_len(header, "a.weight", "positions_stream") + 1


def _own_file(tensors_: dict) -> Callable[[bytes], bytes]:
    return lambda _data: b"".join(serialize(tensors_, None, None))


def _hand_coded(entries: list[int], symbols: list[int], numel: int, index_bits: int) -> CodedTensor:
    """A coded tensor with hand-written streams (what a buggy or hostile writer could produce)."""
    huffman = get_coder("huffman")
    w_stream, w_params = huffman.encode(np.array(symbols), 2)
    p_stream, p_params = huffman.encode(np.array(entries), 1 << index_bits)
    return CodedTensor((numel,), 1, index_bits, "huffman", np.array([-1.0, 1.0], np.float32), len(symbols),
                       len(entries), w_stream, p_stream, {"weights": w_params, "positions": p_params})


# ---------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Attack:
    error: type[Exception]
    stage: str  # "header": read_header rejects it; "decode": only read_file can
    craft: Callable[[bytes], bytes]
    abuse: str
    version: int = 2  # the base file it edits


def _cabac_levels(levels: list[int], stream_suffix: bytes = b"", context_model: str = level_coder.CONTEXT_MODEL,
                  **changes) -> CabacTensor:
    """A cabac tensor over the codebook [-1, 1] with a hand-picked level stream (and header fields)."""
    stream, params = level_coder.encode(np.array(levels), len(levels), context_model=context_model)
    fields = dict(shape=(len(levels),), bits=1, codebook=np.array([-1.0, 1.0], np.float32), num_negative=1,
                  num_nonzero=int(np.count_nonzero(levels)), stream=stream + stream_suffix, coder_params=params)
    return CabacTensor(**{**fields, **changes})


def _as_version_1(header: dict) -> None:
    header["version"] = 1


def _pad_after_codebook(header: dict) -> int:
    return header["tensors"]["a.weight"]["codebook"]["offsets"][1]  # 12-byte codebook: padding follows


E = errors
ATTACKS: dict[str, Attack] = {
    # the fixed prefix
    "empty_file": Attack(E.HeaderTooSmall, "header", lambda d: b"", "no prefix at all"),
    "shorter_than_prefix": Attack(E.HeaderTooSmall, "header", lambda d: d[: PREFIX_SIZE - 1], "truncated prefix"),
    "bad_magic": Attack(E.BadMagic, "header", lambda d: b"PK\x03\x04" + d[4:], "another format (a zip)"),
    "bad_version": Attack(E.UnsupportedVersion, "header", prefix(version=5), "a future version"),
    "unknown_flags": Attack(E.UnsupportedVersion, "header", prefix(flags=2), "reserved flags set"),
    "deflated_header_corrupt": Attack(E.InvalidHeader, "header", prefix(flags=1), "plain JSON flagged as deflated"),
    "deflated_header_bomb": Attack(E.HeaderTooLarge, "header", _deflated(lambda h: zlib.compress(b" " * (17 << 20), 9)),
                                   "a few KiB that inflate past the 16 MiB cap"),
    "deflated_header_truncated": Attack(E.InvalidHeader, "header", _deflated(lambda h: zlib.compress(h)[:-9]),
                                        "compressed stream cut short"),
    "deflated_header_trailing": Attack(E.InvalidHeader, "header", _deflated(lambda h: zlib.compress(h) + b"junk"),
                                       "junk after the compressed stream"),
    # the header length
    "header_length_over_cap": Attack(E.HeaderTooLarge, "header", prefix(header_len=2**63), "u64 length of 8 EiB"),
    "header_length_past_eof": Attack(E.HeaderTooLarge, "header", lambda d: prefix(header_len=10 * len(d))(d),
                                     "length beyond the file"),
    "header_length_zero": Attack(E.HeaderTooSmall, "header", prefix(header_len=0), "empty header"),
    "header_length_unaligned": Attack(E.InvalidHeader, "header",
                                      lambda d: prefix(header_len=struct.unpack_from("<Q", d, 12)[0] + 1)(d),
                                      "payload start not 8-aligned"),
    # the JSON text
    "header_not_utf8": Attack(E.InvalidHeader, "header", lambda d: d[:PREFIX_SIZE] + b"\xff" + d[PREFIX_SIZE + 1 :],
                              "invalid UTF-8 byte"),
    "header_not_json": Attack(E.InvalidHeader, "header", lambda d: join("{not json", split(d)[1]), "garbage text"),
    "header_not_object": Attack(E.InvalidHeader, "header", lambda d: join("[1, 2]", split(d)[1]), "a JSON array"),
    "header_nan": Attack(E.InvalidHeader, "header", edit_text(lambda t: t.replace('"meta":{', '"meta":{"x":NaN,')),
                         "NaN is not JSON"),
    "header_deeply_nested": Attack(E.InvalidHeader, "header",
                                   edit_text(lambda t: t.replace('"meta":{', '"meta":{"x":' + "[" * 100_000 +
                                                                 "]" * 100_000 + ",")),
                                   "nesting that exhausts the parser's stack"),
    "duplicate_key": Attack(E.InvalidHeader, "header", edit_text(lambda t: '{"meta":{"evil":1},' + t[1:]),
                            "second 'meta' that a lenient parser would keep"),
    "duplicate_tensor": Attack(E.InvalidHeader, "header",
                               edit_text(lambda t: t.replace('"tensors":{', '"tensors":{"a.bias":{},', 1)),
                               "two entries with one name"),
    # the schema
    "unknown_top_key": Attack(E.InvalidHeader, "header", edit(lambda h: h.update(extra=1)), "unknown key"),
    "unknown_entry_key": Attack(E.InvalidHeader, "header", edit(_set("a.bias/strides", [1])),
                                "strides are not allowed"),
    "missing_entry_key": Attack(E.InvalidHeader, "header", edit(lambda h: tensors(h)["a.weight"].pop("num_entries")),
                                "count missing"),
    "wrong_format_name": Attack(E.InvalidHeader, "header", edit(lambda h: h.update(format="other")), "not ours"),
    "header_version_disagrees": Attack(E.UnsupportedVersion, "header", prefix(version=1),
                                       "header and prefix versions differ"),
    "model_spec_too_large": Attack(E.HeaderTooLarge, "header",
                                   edit(lambda h: h.update(model={"arch": "mlp", "kwargs": {"hidden": [1] * 10_000}})),
                                   "kwargs asking for 10,000 layers"),
    "tensors_not_object": Attack(E.InvalidHeader, "header", edit(lambda h: h.update(tensors=[])), "wrong type"),
    "unknown_codec": Attack(E.InvalidHeader, "header", edit(_set("a.bias/codec", "zip")), "unknown codec"),
    "bad_dtype": Attack(E.InvalidHeader, "header", edit(_set("a.bias/dtype", "float128")), "dtype not allowed"),
    "dtype_not_a_string": Attack(E.InvalidHeader, "header", edit(_set("a.bias/dtype", ["float32"])),
                                 "unhashable dtype"),
    "coded_dtype_not_float": Attack(E.InvalidHeader, "header", edit(_set("a.weight/dtype", "int64")),
                                    "coded tensors decode to float32"),
    "unknown_coder": Attack(E.InvalidHeader, "header", edit(_set("a.weight/coder", "lzma")), "coder not registered"),
    "negative_shape": Attack(E.InvalidHeader, "header", edit(_set("a.bias/shape", [-8])), "negative dimension"),
    "float_shape": Attack(E.InvalidHeader, "header", edit(_set("a.bias/shape", [8.0])), "non-integer dimension"),
    "bool_shape": Attack(E.InvalidHeader, "header", edit(_set("a.bias/shape", [True] * 8)), "true is not 1"),
    "too_many_dims": Attack(E.InvalidHeader, "header", edit(_set("a.bias/shape", [1] * 33 + [8])), "33+ dims"),
    "bits_not_int": Attack(E.InvalidHeader, "header", edit(_set("a.weight/bits", "2")), "string bits"),
    "offsets_not_integers": Attack(E.InvalidHeader, "header", edit(_set("a.bias/offsets", ["0", "32"])),
                                   "string offsets"),
    "crc_not_u32": Attack(E.InvalidHeader, "header", edit(_set("a.bias/crc32", 2**32)), "crc out of range"),
    # bounds: a tiny file must not claim a huge tensor
    "huge_shape": Attack(E.TensorInfoMismatch, "header", edit(_set("a.bias/shape", [2**40])), "2**40 elements"),
    "huge_shape_product": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/shape", [2**16, 2**16])),
                                 "product over 2**31"),
    "coded_expansion": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/shape", [2**30])),
                              "a 1 KiB file that would decode to 4 GiB of zeros"),
    "bits_out_of_range": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/bits", 17)), "bits > 16"),
    "index_bits_zero": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/index_bits", 0)), "no positions"),
    "codebook_too_big_for_bits": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/codebook/size", 5)),
                                        "5 centroids in 2 bits"),
    "codebook_length_mismatch": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/codebook/size", 4)),
                                       "size disagrees with section"),
    "raw_length_mismatch": Attack(E.TensorInfoMismatch, "header", edit(_set("a.bias/shape", [9])),
                                  "shape x itemsize != span"),
    "raw_dtype_length_mismatch": Attack(E.TensorInfoMismatch, "header", edit(_set("a.bias/dtype", "float64")),
                                        "itemsize changes the span"),
    "nonzero_exceeds_numel": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/num_nonzero", 401)),
                                    "more non-zeros than elements"),
    "entries_exceed_bound": Attack(E.TensorInfoMismatch, "header", edit(_set("a.weight/num_entries", 10**9)),
                                   "more fillers than zeros"),
    "count_exceeds_payload": Attack(E.TensorInfoMismatch, "header", edit(_inflate_count),
                                    "more Huffman symbols than payload bits"),
    "coder_params_not_kraft": Attack(E.CodecError, "header",
                                     edit(_set("a.weight/coder_params/weights/code_lengths", "111")),
                                     "lengths that are no prefix code"),
    "coder_params_wrong_alphabet": Attack(E.CodecError, "header",
                                          edit(_set("a.weight/coder_params/weights/code_lengths", "2222" + "0" * 300)),
                                          "table for another alphabet"),
    "ans_frequencies_bad_sum": Attack(E.CodecError, "header",
                                      edit(_set("z.weight/coder_params/weights/frequencies",
                                                lambda f: [f[0] + 1] + f[1:])), "frequencies not 2**precision"),
    # cabac entries
    "cabac_in_version_1": Attack(E.InvalidHeader, "header", edit(_as_version_1), "a codec version 1 does not have"),
    "cabac_params_bad_shifts": Attack(E.CodecError, "header", edit(_set("c.weight/coder_params/shifts", [5, 7])),
                                      "adaptation rates this decoder does not implement"),
    "cabac_params_many_flags": Attack(E.CodecError, "header", edit(_set("c.weight/coder_params/num_gt", 10**6)),
                                      "a million bins per level"),
    "cabac_row_length_mismatch": Attack(E.TensorInfoMismatch, "header",
                                        edit(_set("c.weight/coder_params/row_length", 7)),
                                        "context geometry other than the shape's rows"),
    "cabac_max_abs_beyond_codebook": Attack(E.TensorInfoMismatch, "header",
                                            edit(_set("c.weight/coder_params/max_abs", 3)),
                                            "levels the codebook cannot resolve"),
    "cabac_negatives_exceed_codebook": Attack(E.TensorInfoMismatch, "header", edit(_set("c.weight/num_negative", 5)),
                                              "more negative values than the codebook has"),
    "cabac_nonzero_exceeds_numel": Attack(E.TensorInfoMismatch, "header", edit(_set("c.weight/num_nonzero", 241)),
                                          "more non-zeros than elements"),
    "cabac_all_zero_with_bytes": Attack(E.TensorInfoMismatch, "header",
                                        _own_file({"w": _cabac_levels([0, 0, 0, 0], b"\x01")}),
                                        "an all-zero tensor with stream bytes"),
    "cabac_trailing_stream_bytes": Attack(E.CodecError, "decode",
                                          _own_file({"w": _cabac_levels([0, 1, -1, 0], b"\x01" * 64)}),
                                          "data after the coded levels"),
    "cabac_level_outside_codebook": Attack(E.TensorInfoMismatch, "decode",
                                           _own_file({"w": _cabac_levels([0, 1, -1, 0], num_negative=0)}),
                                           "a negative level with no negative value"),
    "cabac_nonzero_disagrees": Attack(E.TensorInfoMismatch, "decode",
                                      _own_file({"w": _cabac_levels([0, 1, -1, 0], num_nonzero=3)}),
                                      "header and stream count different non-zeros"),
    "checksum_levels_stream": Attack(E.ChecksumMismatch, "header",
                                     payload_byte(lambda h: h["tensors"]["c.weight"]["levels_stream"]["offsets"][0]),
                                     "bit rot in a levels stream"),
    # sections
    "offsets_reversed": Attack(E.InvalidOffset, "header", edit(_set("a.bias/offsets", [32, 0])), "end < begin"),
    "offsets_overlap": Attack(E.InvalidOffset, "header",
                              edit(_set("z.weight/codebook/offsets", lambda o: [0, o[1] - o[0]])),
                              "two tensors share bytes"),
    "offsets_gap": Attack(E.InvalidOffset, "header",
                          edit(_set("z.weight/positions_stream/offsets", lambda o: [o[0] + 8, o[1] + 8])),
                          "unexplained gap"),
    "offsets_past_end": Attack(E.InvalidOffset, "header",
                               edit(_set("z.weight/positions_stream/offsets", lambda o: [o[0], o[1] + 1000])),
                               "section beyond the file"),
    "section_unclaimed": Attack(E.InvalidOffset, "header", edit(lambda h: tensors(h).pop("a.bias")),
                                "bytes no entry claims (hidden data)"),
    "nonzero_padding": Attack(E.InvalidOffset, "header", payload_byte(_pad_after_codebook), "data in padding"),
    "trailing_bytes": Attack(E.TrailingBytes, "header", lambda d: d + bytes(8), "appended data"),
    "trailing_byte_unaligned": Attack(E.TrailingBytes, "header", lambda d: d + b"x", "one extra byte"),
    # checksums
    "checksum_data": Attack(E.ChecksumMismatch, "header",
                            payload_byte(lambda h: h["tensors"]["a.bias"]["offsets"][0] + 5), "bit rot in a tensor"),
    "checksum_stream": Attack(E.ChecksumMismatch, "header",
                              payload_byte(lambda h: h["tensors"]["z.weight"]["weights_stream"]["offsets"][0]),
                              "bit rot in a coded stream"),
    "checksum_field": Attack(E.ChecksumMismatch, "header", edit(_set("a.bias/crc32", lambda c: c ^ 1)), "wrong crc"),
    # only decoding can tell (CRCs are right: a hostile writer computes them)
    "positions_past_end": Attack(E.TensorInfoMismatch, "decode", edit(_set("p.weight/shape", [60])),
                                 "a weight placed at 90 in a 60-element tensor"),
    "trailing_filler": Attack(E.TensorInfoMismatch, "decode", _own_file({"w": _hand_coded([0, 7], [1], 100, 3)}),
                              "positions stream ends with a filler"),
    "positions_weights_disagree": Attack(E.TensorInfoMismatch, "decode",
                                         _own_file({"w": _hand_coded([0, 0, 0], [1, 0], 100, 3)}),
                                         "3 weights placed, 2 decoded"),
    "bool_not_0_or_1": Attack(E.TensorInfoMismatch, "decode",
                              _own_file({"m": RawTensor(np.array([1, 2], np.uint8).view(np.bool_))}),
                              "bool byte 2"),
    "new_contexts_in_version_2": Attack(E.InvalidHeader, "header",
                                        edit(_set("c.weight/coder_params/context_model", level_coder.CONTEXT_MODEL)),
                                        "version 3's cabac context model in a version-2 file"),
    "dependent_contexts_in_version_2": Attack(E.InvalidHeader, "header",
                                              edit(_set("c.weight/coder_params/context_model",
                                                        level_coder.DEPENDENT_CONTEXT_MODEL)),
                                              "the dependent-quantization context model in a version-2 file"),
    "constant_in_version_2": Attack(E.InvalidHeader, "header",
                                    edit(_entry("bn.running_var", {"codec": "constant", "dtype": "float16",
                                                                   "shape": [4], "value": 1.0})), "the constant codec is version 3's"),
}


def _v3(error: type[Exception], craft: Callable[[bytes], bytes], abuse: str, stage: str = "header") -> Attack:
    return Attack(error, stage, craft, abuse, version=3)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda header: header.pop(key)


def _padded_header(data: bytes) -> bytes:
    """The version-3 file with zero bytes between the compressed header and the payload."""
    header_len = struct.unpack_from("<Q", data, 12)[0]
    return data[:12] + struct.pack("<Q", header_len + 4) + data[20 : 20 + header_len] + bytes(4) + data[20 + header_len :]


ATTACKS.update({
    # version 3: packed sections, stream lengths, one payload CRC32, constants
    "v3_stated_offsets": _v3(E.InvalidHeader, edit(_set("a.bias/offsets", [0, 32])), "a version-2 key in version 3"),
    "v3_no_payload_crc": _v3(E.InvalidHeader, edit(_drop("payload_crc32")), "the payload checksum is missing"),
    "v3_payload_crc_not_u32": _v3(E.InvalidHeader, edit(lambda h: h.update(payload_crc32=-1)), "crc out of range"),
    "v3_bit_rot": _v3(E.ChecksumMismatch, payload_byte(lambda h: 5), "bit rot in the payload"),
    "v3_stream_bytes_negative": _v3(E.InvalidHeader, edit(_set("z.weight/positions_stream/bytes", -1)),
                                    "a negative stream length"),
    "v3_stream_bytes_not_int": _v3(E.InvalidHeader, edit(_set("a.weight/weights_stream/bytes", "7")),
                                   "a string stream length"),
    "v3_stream_longer": _v3(E.InvalidOffset, edit(_set("z.weight/positions_stream/bytes", lambda n: n + 1)),
                            "the sections need more bytes than the payload has"),
    "v3_stream_shorter": _v3(E.TrailingBytes, edit(_set("z.weight/positions_stream/bytes", lambda n: n - 1)),
                             "the sections leave a byte over"),
    "v3_padding_after_header": _v3(E.InvalidHeader, _padded_header, "zero bytes after the compressed header"),
    "v3_constant_inexact": _v3(E.TensorInfoMismatch, edit(_set("bn.running_var/value", 0.1)),
                               "0.1 is not a float16"),
    "v3_constant_out_of_range": _v3(E.TensorInfoMismatch,
                                    edit(_entry("bn.running_var", {"codec": "constant", "dtype": "int8", "shape": [4],
                                                                   "value": 300})), "300 in an int8"),
    "v3_constant_overflows": _v3(E.TensorInfoMismatch, edit(_set("bn.running_var/value", 1e300)),
                                 "1e300 overflows float16"),
    "v3_constant_wrong_type": _v3(E.TensorInfoMismatch, edit(_set("bn.running_var/value", "1")), "a string value"),
    "v3_constant_int_for_float": _v3(E.TensorInfoMismatch, edit(_set("bn.running_var/value", 1)),
                                     "an integer where the dtype is a float (JSON 1 vs 1.0)"),
    "v3_constant_huge": _v3(E.TensorInfoMismatch, edit(_set("bn.running_var/shape", [1 << 15, 1 << 15])),
                            "a tiny file claiming 2**30 constant elements"),
    "v3_constant_unknown_key": _v3(E.InvalidHeader, edit(_set("bn.running_var/crc32", 0)), "an unknown key"),
    # dependent quantization: max_abs bounds the coded k, and j = 2k - ... can reach past the codebook
    "v3_dependent_level_outside_codebook": _v3(
        E.TensorInfoMismatch, _own_file({"w": _cabac_levels([0, 2, 0, 0], context_model=level_coder.DEPENDENT_CONTEXT_MODEL)}),
        "a dependent stream whose k = 1 is the level j = 2 of a one-value side", stage="decode"),
    "v3_dependent_max_abs_too_large": _v3(
        E.CodecError, edit(lambda h: tensors(h)["c.weight"]["coder_params"].update(
            context_model=level_coder.DEPENDENT_CONTEXT_MODEL, max_abs=level_coder.MAX_ABS)),
        "a dependent stream whose levels j could pass 2**16"),
})


def _v4(error: type[Exception], craft: Callable[[bytes], bytes], abuse: str, stage: str = "header") -> Attack:
    return Attack(error, stage, craft, abuse, version=4)


def _deflated_with(zdict: bytes | None, version: int) -> Callable[[bytes], bytes]:
    """Craft function: the header deflated with ``zdict`` (None: no dictionary), stamped ``version``."""

    def compress(text: bytes) -> bytes:
        deflate = zlib.compressobj(9, **({"zdict": zdict} if zdict is not None else {}))
        return deflate.compress(text) + deflate.flush()

    def craft(data: bytes) -> bytes:
        header, payload = split(data)
        header["version"] = version
        raw = compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        return struct.pack("<8sHHQ", MAGIC, version, FLAG_DEFLATED_HEADER, len(raw)) + raw + payload

    return craft


ATTACKS.update({
    # version 4: the header's preset dictionary, grid tensors
    "v4_header_other_dictionary": _v4(E.InvalidHeader, _deflated_with(b'{"format":"other"}', 4),
                                      "a header deflated with another preset dictionary"),
    "v4_dictionary_in_version_3": _v4(E.InvalidHeader, _deflated_with(HEADER_DICTIONARY, 3),
                                      "version 4's dictionary in a version-3 file"),
    "v4_grid_in_version_3": _v4(E.InvalidHeader, _deflated_with(None, 3), "the grid codec in a version-3 file"),
    "v4_grid_step_not_float32": _v4(E.TensorInfoMismatch, edit(_set("g.bias/step", 0.1)),
                                    "a step float32 cannot hold (the decoded values would depend on rounding)"),
    "v4_grid_step_negative": _v4(E.TensorInfoMismatch, edit(_set("g.bias/step", -0.5)), "a negative step"),
    "v4_grid_step_integer": _v4(E.TensorInfoMismatch, edit(_set("g.bias/step", 1)), "an integer step"),
    "v4_grid_dependent_contexts": _v4(E.InvalidHeader, edit(_set("g.bias/coder_params/context_model",
                                                                 level_coder.DEPENDENT_CONTEXT_MODEL)),
                                      "dependent quantization's context model on a grid"),
    "v4_grid_row_length": _v4(E.TensorInfoMismatch, edit(_set("g.bias/coder_params/row_length", 10)),
                              "a context geometry other than the shape's"),
    "v4_grid_all_zero_with_bytes": _v4(E.TensorInfoMismatch, edit(lambda h: (
        _set("g.bias/num_nonzero", 0)(h), _set("g.bias/coder_params/max_abs", 0)(h))),
        "an all-zero grid whose stream still has bytes"),
    "v4_grid_nonzero_count": _v4(E.TensorInfoMismatch, edit(_set("g.bias/num_nonzero", lambda n: n - 1)),
                                 "one non-zero more than the header says", stage="decode"),
    "v4_grid_overflows": _v4(E.TensorInfoMismatch, edit(_set("g.bias/step", float(np.finfo(np.float32).max))),
                             "a step whose largest level overflows float32 (the tensor would hold inf)"),
    "v4_grid_huge": _v4(E.TensorInfoMismatch, edit(lambda h: (_set("g.bias/shape", [1 << 31])(h),
                                                              _set("g.bias/coder_params/row_length", 1 << 31)(h))),
                        "a tiny file claiming 2**31 grid elements"),
})


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = {version: base_file(version) for version in (2, 3, 4)}
    for version, data in bases.items():
        (out / f"valid-v{version}.dsz").write_bytes(data)
    for name, attack in ATTACKS.items():
        (out / f"{name}.dsz").write_bytes(attack.craft(bases[attack.version]))
    print(f"wrote {len(ATTACKS) + len(bases)} files to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "format_attack_files")
