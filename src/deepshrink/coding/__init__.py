"""Stage 4: entropy coders that turn a whole array of small unsigned symbols into bytes and back.

Every coder follows the same contract (`Coder`): ``encode(symbols, alphabet_size) -> (payload,
params)`` and ``decode(payload, params, count, alphabet_size) -> uint32 array``. ``params`` is a
small JSON-able dict holding everything the decoder needs besides ``count`` and ``alphabet_size``,
with every bitstream-affecting setting written out, so a file never depends on a library default.

Coders are registered by name in `CODERS` (``@register("name")`` on a class in its own module);
a file names its coder, and the loader, the CLI's ``--coder`` and the tests take the list from the
registry. Both built-in coders build their model from the same symbol histogram (`histogram`), so
switching between them is a one-name change:

>>> import numpy as np
>>> payload, params = get_coder("huffman").encode(np.array([0, 0, 0, 1, 2]), alphabet_size=3)
>>> get_coder("huffman").decode(payload, params, count=5, alphabet_size=3).tolist()
[0, 0, 0, 1, 2]
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Callable, Protocol, runtime_checkable

import numba
import numpy as np

from deepshrink.errors import CodecError, ConfigError

# Largest alphabet a coder accepts: per-layer code tables stay small and every length fits a uint16 index.
MAX_ALPHABET_SIZE = 1 << 16


class CoderName(str, Enum):
    """Entropy coders.

    HUFFMAN: canonical, length-limited Huffman code (the paper's choice; the default).
    ANS: asymmetric numeral systems via ``constriction``, within a few bits of the entropy.
    """

    HUFFMAN = "huffman"
    ANS = "ans"


@runtime_checkable
class Coder(Protocol):
    """A whole-array entropy coder; see the module docstring for the contract.

    ``min_bits_per_symbol`` is the least any symbol can cost in this coder's streams: the loader
    rejects a stream of B bytes that claims more than 8 * B / min_bits_per_symbol symbols before
    decoding it. 0 means no such bound (ANS: a near-certain symbol costs almost nothing), and the
    tensor's element count bounds the work instead.
    """

    name: str
    min_bits_per_symbol: float

    def encode(self, symbols: np.ndarray, alphabet_size: int) -> tuple[bytes, dict]: ...

    def decode(self, payload: bytes, params: dict, count: int, alphabet_size: int) -> np.ndarray: ...

    def validate_params(self, params: dict, alphabet_size: int) -> None: ...


CODERS: dict[str, Coder] = {}


def register(name: str | CoderName) -> Callable[[type], type]:
    """Class decorator: instantiate the coder with its defaults and add it to `CODERS` under ``name``.

    Raises:
        ConfigError: ``name`` is taken, or the instance does not follow the `Coder` protocol.
    """
    key = name.value if isinstance(name, CoderName) else name

    def add(cls: type) -> type:
        if not isinstance(key, str) or not key or key in CODERS:
            raise ConfigError(f"coder name {key!r} is empty or already registered")
        coder = cls()
        if not isinstance(coder, Coder):
            raise ConfigError(f"{cls.__name__} does not follow the Coder protocol (name, min_bits_per_symbol, "
                              "encode, decode, validate_params)")
        CODERS[key] = coder
        return cls

    return add


def get_coder(name: str | CoderName) -> Coder:
    """The registered coder called ``name``.

    Raises:
        ConfigError: ``name`` is not a registered coder (the message lists the valid names).
    """
    key = name.value if isinstance(name, CoderName) else name
    if not isinstance(key, str) or key not in CODERS:
        raise ConfigError(f"unknown entropy coder {name!r}; expected one of {sorted(CODERS)}")
    return CODERS[key]


def check_alphabet_size(alphabet_size: Any) -> int:
    """Return ``alphabet_size`` as an int after checking 1 <= size <= MAX_ALPHABET_SIZE (CodecError otherwise)."""
    if isinstance(alphabet_size, (bool, np.bool_)) or not isinstance(alphabet_size, (int, np.integer)):
        raise CodecError(f"alphabet_size must be an int, got {type(alphabet_size).__name__}")
    if not 1 <= int(alphabet_size) <= MAX_ALPHABET_SIZE:
        raise CodecError(f"alphabet_size must be in 1..{MAX_ALPHABET_SIZE}, got {alphabet_size}")
    return int(alphabet_size)


def check_count(count: Any) -> int:
    """Return the symbol ``count`` as an int after checking it is a non-negative integer (CodecError otherwise)."""
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or count < 0:
        raise CodecError(f"symbol count must be a non-negative int, got {count!r}")
    return int(count)


def as_payload(payload: Any) -> memoryview:
    """``payload`` as a flat byte view (CodecError if it is not bytes-like)."""
    try:
        return memoryview(payload).cast("B")
    except TypeError as error:
        raise CodecError(f"payload must be bytes-like, got {type(payload).__name__}") from error


def as_symbols(symbols: Any, alphabet_size: int) -> np.ndarray:
    """Contiguous uint32 copy/view of ``symbols`` after checking it is 1-D integers in [0, alphabet_size).

    Raises:
        CodecError: wrong rank or dtype, or a symbol outside the alphabet.
    """
    alphabet_size = check_alphabet_size(alphabet_size)
    return int_array(symbols, "symbols", 0, alphabet_size - 1, np.uint32)


def int_array(values: Any, what: str, low: int, high: int, dtype) -> np.ndarray:
    """Contiguous ``dtype`` copy/view of ``values`` after checking it is 1-D integers in [low, high].

    Raises:
        CodecError: wrong rank or dtype, or a value outside the range (the message names ``what``).
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise CodecError(f"{what} must be a 1-D array, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise CodecError(f"{what} must have an integer dtype, got {array.dtype}")
    if array.size:
        least, most = int(array.min()), int(array.max())
        if least < low or most > high:
            raise CodecError(f"{what} must lie in [{low}, {high}], got values in [{least}, {most}]")
    return np.ascontiguousarray(array, dtype=dtype)


@numba.njit(cache=True, nogil=True)
def _count(symbols, counts):
    for i in range(symbols.shape[0]):
        counts[symbols[i]] += 1


def row_length_of(shape: tuple[int, ...]) -> int:
    """Levels per output row/filter (the context coder's geometry, which the dependent quantizer's rate model
    follows too): prod(shape[1:]) for 2-D and up, else every element (at least 1)."""
    numel = math.prod(shape)
    return max(1, numel // shape[0] if len(shape) >= 2 and shape[0] else numel)


def histogram(symbols: Any, alphabet_size: int) -> np.ndarray:
    """int64 (alphabet_size,) count of each symbol: the shared model both coders start from."""
    array = as_symbols(symbols, alphabet_size)
    counts = np.zeros(alphabet_size, dtype=np.int64)
    _count(array, counts)  # np.bincount would first copy the symbols to intp
    return counts


def count_values(values: np.ndarray, size: int) -> np.ndarray:
    """int64 (size,) count of each value of an integer array within [0, size): ``histogram`` without its
    uint32 copy of the symbols (a uint8 index array stays as it is).

    Raises:
        CodecError: a value outside [0, size).
    """
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype.kind not in "iu":
        raise CodecError(f"values to count must be integers, got {flat.dtype}")
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= size):
        raise CodecError(f"values must lie in [0, {size}), got values in [{int(flat.min())}, {int(flat.max())}]")
    counts = np.zeros(size, dtype=np.int64)
    _count(flat, counts)
    return counts


def entropy_bits(symbols: Any, alphabet_size: int) -> float:
    """Empirical Shannon entropy times the symbol count: the lower bound on any coder's payload in bits."""
    return entropy_of_counts(histogram(symbols, alphabet_size))


def entropy_of_counts(counts: np.ndarray) -> float:
    """``entropy_bits`` of the symbols a histogram counts (int64 counts, symbol order)."""
    total = int(counts.sum())
    used = counts[counts > 0].astype(np.float64)
    if total == 0:
        return 0.0
    return float(-(used * np.log2(used / total)).sum())


# Imported last: the coder modules use the helpers above and register themselves into CODERS.
from deepshrink.coding import ans, huffman  # noqa: E402,F401

__all__ = [
    "CODERS",
    "Coder",
    "CoderName",
    "MAX_ALPHABET_SIZE",
    "entropy_bits",
    "get_coder",
    "histogram",
]
