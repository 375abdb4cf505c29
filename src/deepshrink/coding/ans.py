"""Near-entropy coding with asymmetric numeral systems (``constriction.stream.stack.AnsCoder``).

The model is a table of integer frequencies stored in ``params``, so the encoder and decoder build
the same model and neither depends on how constriction quantizes floats:

- Model index 0 is a reserved marker with frequency 1 that is never encoded, and symbol ``s`` is
  model index ``s + 1`` (``symbol_offset``). Why: constriction's empty coder has state 0, which
  decodes to index 0 and maps back to itself. Unshifted, a final run of symbol 0 would cost nothing,
  so a wrong ``count`` would go unnoticed. With the shift, decoding past the end yields the marker
  and is rejected.
- ``frequencies`` lists symbols 0..m-1 (m <= alphabet_size; the encoder stops at the largest
  symbol present, so symbols from m on cannot occur). Each is >= 1, and they sum to
  ``2**precision - 1`` (the marker takes the last unit). The encoder picks ``precision`` (``ceil(log2(alphabet_size +
  1))``..24) to minimise payload bits plus the table's size as JSON digits, so short streams get a
  coarse, short table and long streams a precise one.
- constriction's categorical model has a fixed precision of 24 bits (``model_precision``). It gets
  ``[1, *frequencies] * 2**(24 - precision) - 1`` as float weights with ``perfect=False``. Its fast
  quantizer gives every index 1 plus ``floor`` of its scaled cumulative weight, and here the scale
  is exactly 1.0, so it reproduces our table bit for bit.
- The coder uses 32-bit words and a 64-bit state. The payload is the compressed words as
  little-endian uint32. Symbols are pushed with ``encode_reverse``, so ``decode`` pops them in order.
- After decoding ``count`` symbols the coder must be empty and no marker may have been decoded.
  Otherwise the payload was truncated or corrupted, had extra words, or ``count`` is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import constriction
import numpy as np

from deepshrink.coding import CoderName, as_payload, as_symbols, check_alphabet_size, check_count, histogram, register
from deepshrink.errors import CodecError

MODEL_PRECISION = 24  # constriction's Categorical model: probabilities are multiples of 2**-24
WORD_BITS = 32  # constriction.stream.stack.AnsCoder: uint32 words...
STATE_BITS = 64  # ...and a uint64 state
PERFECT = False  # the fast quantizer, which maps our integer table onto itself exactly (see module docstring)
SYMBOL_OFFSET = 1  # model index of symbol 0; index 0 is the reserved marker
# counts * 2**24 must fit int64 when quantizing
_MAX_STREAM = 1 << 38
_PARAM_KEYS = {"precision", "frequencies", "symbol_offset", "model_precision", "word_bits", "state_bits", "perfect"}


def quantize_frequencies(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer frequencies >= 1 summing to ``total``, proportional to ``counts`` (uniform if all are 0).

    Each symbol gets 1 plus its share of the remaining ``total - n``, rounded down. The units left
    over go to the largest remainders, with ties broken by symbol order.

    Raises:
        CodecError: ``total`` is smaller than the number of symbols, or the stream is too long.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.size
    if n > total:
        raise CodecError(f"a table of total {total} cannot give {n} symbols a nonzero frequency")
    stream = int(counts.sum())
    if stream >= _MAX_STREAM:
        raise CodecError(f"stream of {stream} symbols is too long for the ANS frequency table")
    if stream == 0:
        counts, stream = np.ones(n, dtype=np.int64), n
    scaled = counts * (total - n)
    freqs = scaled // stream + 1
    remainder = scaled % stream
    deficit = total - int(freqs.sum())  # in [0, n): each floor loses less than one unit
    freqs[np.argsort(-remainder, kind="stable")[:deficit]] += 1
    return freqs


def _table_cost_bits(counts: np.ndarray, freqs: np.ndarray, precision: int) -> float:
    """Ideal payload bits under ``freqs`` plus the table written as JSON (digits and a separator each)."""
    used = counts > 0
    payload = float(-(counts[used] * (np.log2(freqs[used]) - precision)).sum())
    digits = np.floor(np.log10(freqs)).astype(np.int64) + 2
    return payload + 8.0 * float(digits.sum())


def choose_frequencies(counts: np.ndarray) -> tuple[int, np.ndarray]:
    """(precision, frequencies) minimising payload plus table size over precisions up to MODEL_PRECISION.

    The frequencies sum to ``2**precision - 1``; the missing unit is the reserved marker's.
    """
    lowest = max(1, math.ceil(math.log2(counts.size + 1)))
    best = None
    for precision in range(lowest, MODEL_PRECISION + 1):
        freqs = quantize_frequencies(counts, (1 << precision) - 1)
        cost = _table_cost_bits(counts, freqs, precision)
        if best is None or cost < best[0]:
            best = (cost, precision, freqs)
    return best[1], best[2]


def _frequencies_from_params(params: dict, alphabet_size: int) -> tuple[int, np.ndarray]:
    if not isinstance(params, dict):
        raise CodecError(f"ans params must be a dict, got {type(params).__name__}")
    if set(params) != _PARAM_KEYS:
        raise CodecError(f"ans params must have keys {sorted(_PARAM_KEYS)}, got {sorted(map(str, params))}")
    fixed = {
        "symbol_offset": SYMBOL_OFFSET,
        "model_precision": MODEL_PRECISION,
        "word_bits": WORD_BITS,
        "state_bits": STATE_BITS,
        "perfect": PERFECT,
    }
    for key, expected in fixed.items():
        value = params[key]
        if type(value) is not type(expected) or value != expected:
            raise CodecError(f"ans param {key} must be {expected!r} (the only supported value), got {value!r}")
    precision = params["precision"]
    if type(precision) is not int or not 1 <= precision <= MODEL_PRECISION:
        raise CodecError(f"ans precision must be an int in 1..{MODEL_PRECISION}, got {precision!r}")
    raw = params["frequencies"]
    if not isinstance(raw, (list, tuple)):
        raise CodecError(f"ans frequencies must be a list, got {type(raw).__name__}")
    if not 1 <= len(raw) <= alphabet_size:
        raise CodecError(f"ans frequencies has {len(raw)} entries, expected 1..alphabet_size={alphabet_size}")
    if not all(type(x) is int for x in raw):
        raise CodecError("ans frequencies must all be ints")
    bad = next((x for x in raw if not 1 <= x <= (1 << precision)), None)
    if bad is not None:
        raise CodecError(f"ans frequency {bad} is outside 1..2**{precision}")
    freqs = np.array(raw, dtype=np.int64)
    if int(freqs.sum()) != (1 << precision) - 1:
        raise CodecError(
            f"ans frequencies sum to {int(freqs.sum())}, expected 2**{precision} - 1 = {(1 << precision) - 1}"
        )
    return precision, freqs


def _model(freqs: np.ndarray, precision: int) -> constriction.stream.model.Categorical:
    """constriction model whose 24-bit table is exactly ``[1, *freqs] * 2**(24 - precision)`` (index 0: the marker)."""
    table = np.concatenate([[1], freqs]).astype(np.float64)
    weights = table * float(1 << (MODEL_PRECISION - precision)) - 1.0
    return constriction.stream.model.Categorical(weights, perfect=PERFECT, lazy=False)


@register(CoderName.ANS)
@dataclasses.dataclass(frozen=True)
class AnsCoder:
    """ANS coder with a stored integer frequency table; see the module docstring for the exact bitstream."""

    name: ClassVar[str] = CoderName.ANS.value
    min_bits_per_symbol: ClassVar[float] = 0.0  # a near-certain symbol costs almost nothing: no bound

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> tuple[bytes, dict]:
        """Encode 1-D symbols < alphabet_size; returns (payload, params with the frequency table)."""
        alphabet_size = check_alphabet_size(alphabet_size)
        array = as_symbols(symbols, alphabet_size)
        counts = histogram(array, alphabet_size)
        present = np.flatnonzero(counts)
        # symbols above the largest one present get no table entry (and so cannot be decoded)
        precision, freqs = choose_frequencies(counts[: int(present[-1]) + 1 if present.size else 1])
        params = {
            "precision": precision,
            "frequencies": freqs.tolist(),
            "symbol_offset": SYMBOL_OFFSET,
            "model_precision": MODEL_PRECISION,
            "word_bits": WORD_BITS,
            "state_bits": STATE_BITS,
            "perfect": PERFECT,
        }
        if array.size == 0:
            return b"", params
        coder = constriction.stream.stack.AnsCoder()
        # symbols < 2**16, so int32 (constriction's symbol dtype) holds the shifted indices
        shifted = array.astype(np.int32)
        shifted += SYMBOL_OFFSET  # in place: one temporary the size of the stream
        coder.encode_reverse(shifted, _model(freqs, precision))
        return coder.get_compressed().astype("<u4").tobytes(), params

    def validate_params(self, params: dict, alphabet_size: int) -> None:
        """Raise CodecError unless ``params`` is a well-formed frequency table for at most ``alphabet_size`` symbols."""
        _frequencies_from_params(params, check_alphabet_size(alphabet_size))

    def decode(self, payload: bytes, params: dict, count: int, alphabet_size: int) -> np.ndarray:
        """Decode ``count`` symbols; returns uint32 (count,).

        Raises:
            CodecError: bad params, a payload that is not whole words, or that does not end exactly
                where ``count`` symbols do (truncated, corrupted, extra words or a wrong count).
                Work and memory grow with ``count``, which the caller bounds.
        """
        alphabet_size = check_alphabet_size(alphabet_size)
        count = check_count(count)
        precision, freqs = _frequencies_from_params(params, alphabet_size)
        data = as_payload(payload)
        if count == 0:
            if len(data):
                raise CodecError(f"ans payload holds {len(data)} bytes but count is 0")
            return np.zeros(0, dtype=np.uint32)
        if len(data) % (WORD_BITS // 8):
            raise CodecError(f"ans payload of {len(data)} bytes is not a whole number of 32-bit words")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        try:
            coder = constriction.stream.stack.AnsCoder(words)
            out = coder.decode(_model(freqs, precision), count)
        except (ValueError, RuntimeError, TypeError) as error:
            raise CodecError(f"ans payload rejected by the decoder: {error}") from error
        if out.shape != (count,):
            raise CodecError(f"ans decoder returned {out.shape[0]} symbols, expected {count}")
        if not coder.is_empty() or (out < SYMBOL_OFFSET).any():
            raise CodecError(
                f"ans payload does not end where {count} symbols do "
                "(truncated, corrupted, trailing words or wrong count)"
            )
        out -= SYMBOL_OFFSET  # in place: every index is >= SYMBOL_OFFSET (checked above)
        return out.astype(np.uint32, copy=False)
