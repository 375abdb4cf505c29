"""Canonical, length-limited Huffman coding (Deep Compression's stage 4), compiled with numba.

Bitstream (everything a decoder needs is in ``params``: ``{"code_lengths": "3321", "bit_order": "msb"}``):

- ``code_lengths`` is a string with one character per symbol 0..m-1 (m <= alphabet_size), the code
  length in base 25: ``0-9`` then ``a-o`` for 10..24, ``0`` meaning the symbol does not occur.
  Symbols from m on do not occur (the encoder drops trailing zeros). One byte per symbol keeps the
  table small next to a layer's payload: a JSON list of ints costs about three.
- Code lengths are optimal under a cap of ``max_code_length`` bits (24 by default), computed by
  package-merge (Larmore & Hirschberg 1990). When the cap does not bind, the total length equals
  plain Huffman's. Ties break deterministically: leaves are ordered by (count, symbol index), and a
  leaf comes before a package of equal weight.
- Symbols that never occur get length 0 (no code). If only one symbol occurs, it gets a 1-bit code
  ``0``, so every symbol costs at least one bit and ``count <= 8 * len(payload)`` always holds.
- Codes are canonical (as in DEFLATE): symbols sorted by (length, symbol index) receive consecutive
  code values, and the first code of each length is ``(first[l-1] + n[l-1]) << 1``.
- Bits are packed MSB-first: a code's first bit goes into the highest free bit of the current byte.
  The last byte is zero-padded. Decoding must end inside the last byte, and the padding must be zero.
  A payload with extra bytes, non-zero padding, or a code not in the table is rejected.
- Zero symbols give an empty payload.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numba
import numpy as np

from deepshrink.coding import CoderName, as_payload, as_symbols, check_alphabet_size, check_count, histogram, register
from deepshrink.errors import CodecError, ConfigError

# Longest code the decoder accepts: the packer's < 32 pending bits plus one code fit its 64-bit
# accumulator, and package-merge needs 2**limit >= alphabet size (at most 2**16).
MAX_CODE_LENGTH = 24
# Codes up to this length decode with one table lookup (2**11 entries stay in L1 cache); longer codes
# take a short canonical search.
TABLE_BITS = 11
BIT_ORDER = "msb"
_DIGITS = "0123456789abcdefghijklmno"  # code length l is written as _DIGITS[l]
_DIGIT_VALUE = np.full(256, -1, dtype=np.int64)
_DIGIT_VALUE[np.frombuffer(_DIGITS.encode("ascii"), dtype=np.uint8)] = np.arange(len(_DIGITS))
_PARAM_KEYS = {"code_lengths", "bit_order"}

# Status codes returned by the compiled decoder.
_OK, _BAD_CODE, _TRUNCATED = 0, 1, 2


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal code length per symbol, no longer than ``max_length``, by package-merge.

    Args:
        counts: (n,) non-negative symbol counts; symbols with count 0 get length 0.
        max_length: the cap on any code length.

    Returns:
        int64 (n,) lengths; Kraft sum is exactly 1 when two or more symbols occur, 1/2 for one symbol.

    Raises:
        ConfigError: ``max_length`` is outside 1..MAX_CODE_LENGTH or too small for the number of used symbols.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if not 1 <= max_length <= MAX_CODE_LENGTH:
        raise ConfigError(f"max_code_length must be in 1..{MAX_CODE_LENGTH}, got {max_length}")
    lengths = np.zeros(counts.shape[0], dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    n = used.size
    if n == 1:
        lengths[used] = 1
    if n <= 1:
        return lengths
    if n > (1 << max_length):
        raise ConfigError(f"{n} used symbols need codes longer than max_code_length={max_length}")
    # Leaves in (count, symbol) order; `used` is already sorted by symbol, so a stable sort keeps ties in order.
    leaf_order = used[np.argsort(counts[used], kind="stable")]
    leaf_weights = counts[leaf_order]

    # Level 1 holds coins of the smallest denomination (2**-max_length): the leaves themselves. Each
    # later level packages adjacent pairs of the previous one and merges the leaves back in.
    levels_is_leaf = [np.ones(n, dtype=bool)]
    levels_leaf_id = [np.arange(n)]
    weights = leaf_weights
    for _ in range(max_length - 1):
        packages = weights[0 : weights.size // 2 * 2 : 2] + weights[1 : weights.size // 2 * 2 : 2]
        merged = np.concatenate([leaf_weights, packages])
        # stable: on equal weight the leaf (concatenated first) precedes the package
        order = np.argsort(merged, kind="stable")
        weights = merged[order]
        levels_is_leaf.append(order < n)
        levels_leaf_id.append(np.where(order < n, order, -1))

    # Select the 2n-2 cheapest items of the last level; each selected package selects a prefix of the level below.
    take = 2 * n - 2
    leaf_lengths = np.zeros(n, dtype=np.int64)
    for is_leaf, leaf_id in zip(reversed(levels_is_leaf), reversed(levels_leaf_id)):
        chosen_leaf = is_leaf[:take]
        leaf_lengths[leaf_id[:take][chosen_leaf]] += 1
        take = 2 * int(take - chosen_leaf.sum())
    lengths[leaf_order] = leaf_lengths
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """uint64 code value per symbol for canonical ``lengths`` (0 where the length is 0)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.uint64)
    if not lengths.any():
        return codes
    max_len = int(lengths.max())
    per_length = np.bincount(lengths, minlength=max_len + 1)
    per_length[0] = 0
    first = np.zeros(max_len + 1, dtype=np.int64)
    for length in range(2, max_len + 1):
        first[length] = (first[length - 1] + per_length[length - 1]) << 1
    used = np.flatnonzero(lengths)
    order = used[np.argsort(lengths[used], kind="stable")]  # (length, symbol) order
    sorted_lengths = lengths[order]
    # rank of each symbol among the symbols of its length
    start_of_length = np.searchsorted(sorted_lengths, sorted_lengths, side="left")
    rank = np.arange(order.size) - start_of_length
    codes[order] = (first[sorted_lengths] + rank).astype(np.uint64)
    return codes


def kraft_excess(lengths: np.ndarray) -> int:
    """sum(2**(24 - l)) over l > 0 minus 2**24: positive when the lengths cannot form a prefix code."""
    lengths = np.asarray(lengths, dtype=np.int64)
    used = lengths[lengths > 0]
    return int((np.int64(1) << (MAX_CODE_LENGTH - used)).sum()) - (1 << MAX_CODE_LENGTH)


@numba.njit(cache=True, nogil=True)
def _pack(symbols, codes, lengths, out):
    """Write the codes of ``symbols`` MSB-first into ``out`` (sized exactly to the total bit count)."""
    acc = np.uint64(0)  # pending bits live in the low `pending` bits
    pending = 0
    pos = 0
    for i in range(symbols.shape[0]):
        s = symbols[i]
        length = lengths[s]
        acc = (acc << np.uint64(length)) | codes[s]
        pending += length
        if pending >= 32:  # < 32 + 24 bits pending, so nothing is lost from the 64-bit accumulator
            pending -= 32
            word = acc >> np.uint64(pending)
            out[pos] = np.uint8((word >> np.uint64(24)) & np.uint64(0xFF))
            out[pos + 1] = np.uint8((word >> np.uint64(16)) & np.uint64(0xFF))
            out[pos + 2] = np.uint8((word >> np.uint64(8)) & np.uint64(0xFF))
            out[pos + 3] = np.uint8(word & np.uint64(0xFF))
            pos += 4
    while pending >= 8:
        pending -= 8
        out[pos] = np.uint8((acc >> np.uint64(pending)) & np.uint64(0xFF))
        pos += 1
    if pending > 0:
        out[pos] = np.uint8((acc << np.uint64(8 - pending)) & np.uint64(0xFF))


@numba.njit(cache=True, nogil=True)
def _unpack(payload, count, max_len, table_bits, table_symbol, table_length, limit, first, offset, by_code, out):
    """Decode ``count`` symbols into ``out``; returns (status, bits consumed)."""
    nbytes = payload.shape[0]
    total_bits = nbytes * 8
    acc = np.uint64(0)  # left-aligned: the next unread bit is bit 63
    have = 0
    byte_pos = 0
    consumed = 0
    peek_shift = np.uint64(64 - max_len)
    table_shift = np.uint64(max_len - table_bits)
    for i in range(count):
        if have < max_len:
            if byte_pos + 8 <= nbytes and have <= 32:
                # fast refill: 4 bytes at once
                word = (
                    (np.uint64(payload[byte_pos]) << np.uint64(24))
                    | (np.uint64(payload[byte_pos + 1]) << np.uint64(16))
                    | (np.uint64(payload[byte_pos + 2]) << np.uint64(8))
                    | np.uint64(payload[byte_pos + 3])
                )
                acc |= word << np.uint64(32 - have)
                have += 32
                byte_pos += 4
            while have <= 56:
                if byte_pos < nbytes:
                    acc |= np.uint64(payload[byte_pos]) << np.uint64(56 - have)
                have += 8  # past the end reads zeros; `consumed` catches overruns below
                byte_pos += 1
        peek = acc >> peek_shift
        index = peek >> table_shift
        length = table_length[index]
        if length > 0:
            out[i] = table_symbol[index]
        else:
            length = table_bits + 1
            while length <= max_len and peek >= limit[length]:
                length += 1
            if length > max_len:
                return _BAD_CODE, consumed
            code = np.int64(peek >> np.uint64(max_len - length))
            out[i] = by_code[offset[length] + code - first[length]]
        acc <<= np.uint64(length)
        have -= length
        consumed += length
        if consumed > total_bits:
            return _TRUNCATED, consumed
    return _OK, consumed


def _decoder_tables(lengths: np.ndarray):
    """Lookup table for codes <= table_bits plus canonical limits for longer codes."""
    max_len = int(lengths.max())
    table_bits = min(max_len, TABLE_BITS)
    codes = canonical_codes(lengths)
    per_length = np.bincount(lengths, minlength=max_len + 2)
    per_length[0] = 0
    first = np.zeros(max_len + 2, dtype=np.int64)
    for length in range(2, max_len + 1):
        first[length] = (first[length - 1] + per_length[length - 1]) << 1
    # limit[l]: end of the length-l codes, left-aligned to max_len bits; left-aligned canonical codes
    # increase with length, so the first l with peek < limit[l] is the code's length.
    limit = np.zeros(max_len + 2, dtype=np.uint64)
    ends = first[1 : max_len + 1] + per_length[1 : max_len + 1]
    limit[1 : max_len + 1] = (ends << (max_len - np.arange(1, max_len + 1))).astype(np.uint64)
    used = np.flatnonzero(lengths)
    by_code = used[np.argsort(lengths[used], kind="stable")].astype(np.uint32)  # (length, symbol) order
    offset = np.zeros(max_len + 2, dtype=np.int64)
    offset[1:] = np.cumsum(per_length)[:-1]

    table_symbol = np.zeros(1 << table_bits, dtype=np.uint32)
    table_length = np.zeros(1 << table_bits, dtype=np.int64)
    short = used[lengths[used] <= table_bits]
    spans = np.left_shift(1, table_bits - lengths[short])
    starts = codes[short].astype(np.int64) << (table_bits - lengths[short])
    slots = np.repeat(starts, spans) + (np.arange(spans.sum()) - np.repeat(np.cumsum(spans) - spans, spans))
    table_symbol[slots] = np.repeat(short, spans)
    table_length[slots] = np.repeat(lengths[short], spans)
    return max_len, table_bits, table_symbol, table_length, limit, first, offset, by_code


def lengths_to_text(lengths: np.ndarray) -> str:
    """The compact ``code_lengths`` string: one base-25 digit per symbol, trailing unused symbols dropped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)
    m = int(used[-1]) + 1 if used.size else 0
    return "".join(_DIGITS[length] for length in lengths[:m].tolist())


def lengths_from_text(text: object, alphabet_size: int) -> np.ndarray:
    """int64 (alphabet_size,) code lengths parsed from a ``code_lengths`` string (CodecError if malformed)."""
    if not isinstance(text, str):
        raise CodecError(f"huffman code_lengths must be a string of base-25 digits, got {type(text).__name__}")
    if len(text) > alphabet_size:
        raise CodecError(f"huffman code_lengths has {len(text)} entries, more than alphabet_size={alphabet_size}")
    if not text.isascii():
        raise CodecError("huffman code_lengths holds a character outside 0-9a-o")
    digits = _DIGIT_VALUE[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    if digits.size and digits.min() < 0:
        bad = text[int(np.argmax(digits < 0))]
        raise CodecError(f"huffman code_lengths holds {bad!r}; lengths are digits 0-9a-o (0..{MAX_CODE_LENGTH})")
    lengths = np.zeros(alphabet_size, dtype=np.int64)
    lengths[: digits.size] = digits
    return lengths


def _lengths_from_params(params: dict, alphabet_size: int) -> np.ndarray:
    if not isinstance(params, dict):
        raise CodecError(f"huffman params must be a dict, got {type(params).__name__}")
    if set(params) != _PARAM_KEYS:
        raise CodecError(f"huffman params must have keys {sorted(_PARAM_KEYS)}, got {sorted(map(str, params))}")
    if params["bit_order"] != BIT_ORDER:
        raise CodecError(f"huffman bit_order must be {BIT_ORDER!r}, got {params['bit_order']!r}")
    lengths = lengths_from_text(params["code_lengths"], alphabet_size)
    excess = kraft_excess(lengths)
    if excess > 0:
        raise CodecError(
            f"huffman code_lengths violate the Kraft inequality: sum of 2**-length exceeds 1 by "
            f"{excess} / 2**{MAX_CODE_LENGTH}"
        )
    return lengths


@register(CoderName.HUFFMAN)
@dataclasses.dataclass(frozen=True)
class HuffmanCoder:
    """Canonical Huffman coder; see the module docstring for the exact bitstream."""

    name: ClassVar[str] = CoderName.HUFFMAN.value
    min_bits_per_symbol: ClassVar[float] = 1.0  # every codeword is at least one bit
    max_code_length: int = MAX_CODE_LENGTH  # what every decoder accepts; a lower cap can only cost compression

    def __post_init__(self):
        if isinstance(self.max_code_length, bool) or not isinstance(self.max_code_length, int):
            raise ConfigError(f"max_code_length must be an int, got {self.max_code_length!r}")
        if not 1 <= self.max_code_length <= MAX_CODE_LENGTH:
            raise ConfigError(f"max_code_length must be in 1..{MAX_CODE_LENGTH}, got {self.max_code_length}")

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> tuple[bytes, dict]:
        """Encode 1-D symbols < alphabet_size; returns (payload, {"code_lengths": "...", "bit_order": "msb"})."""
        alphabet_size = check_alphabet_size(alphabet_size)
        array = as_symbols(symbols, alphabet_size)
        counts = histogram(array, alphabet_size)
        lengths = code_lengths(counts, self.max_code_length)
        params = {"code_lengths": lengths_to_text(lengths), "bit_order": BIT_ORDER}
        if array.size == 0:
            return b"", params
        total_bits = int(counts @ lengths)
        out = np.zeros((total_bits + 7) // 8, dtype=np.uint8)
        _pack(array, canonical_codes(lengths), lengths, out)
        return out.tobytes(), params

    def validate_params(self, params: dict, alphabet_size: int) -> None:
        """Raise CodecError unless ``params`` is a well-formed code for ``alphabet_size`` symbols."""
        _lengths_from_params(params, check_alphabet_size(alphabet_size))

    def decode(self, payload: bytes, params: dict, count: int, alphabet_size: int) -> np.ndarray:
        """Decode ``count`` symbols; returns uint32 (count,).

        Raises:
            CodecError: bad params, a payload too short or too long for ``count`` symbols, a bit
                pattern that is no code, or non-zero padding.
        """
        alphabet_size = check_alphabet_size(alphabet_size)
        count = check_count(count)
        lengths = _lengths_from_params(params, alphabet_size)
        data = np.frombuffer(as_payload(payload), dtype=np.uint8)
        if count == 0:
            if data.size:
                raise CodecError(f"huffman payload holds {data.size} bytes but count is 0")
            return np.zeros(0, dtype=np.uint32)
        if not lengths.any():
            raise CodecError(f"huffman code_lengths are all 0 but count is {count}")
        # every code is at least one bit: reject before allocating `count` outputs
        if count > 8 * data.size:
            raise CodecError(f"huffman payload of {data.size} bytes is too short for {count} symbols")
        out = np.empty(count, dtype=np.uint32)
        status, consumed = _unpack(data, count, *_decoder_tables(lengths), out)
        if status == _BAD_CODE:
            raise CodecError(f"huffman payload holds a bit pattern that is no code (at bit {consumed})")
        if status == _TRUNCATED:
            raise CodecError(f"huffman payload of {data.size} bytes ends before symbol {count}")
        used_bytes = (consumed + 7) // 8
        if used_bytes != data.size:
            raise CodecError(f"huffman payload has {data.size - used_bytes} trailing bytes after {count} symbols")
        if consumed % 8 and data[-1] & ((1 << (8 - consumed % 8)) - 1):
            raise CodecError("huffman payload's padding bits are not zero")
        return out
