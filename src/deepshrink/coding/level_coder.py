"""Context-adaptive binary arithmetic coding of one quantized tensor's signed levels (DeepCABAC-like).

A tensor is a 1-D stream of integer levels in scan order (C order of the weight), zeros included,
with ``|level| <= max_abs``. ``row_length`` (the elements of one output row/filter) gives the
context geometry: column j of row r is level ``r * row_length + j``. Nothing is stored but the
bits and a few constants (``params``); the bit probabilities adapt as the stream is coded, so a long
run of zeros costs a small fraction of a bit per level.

Context state, all from levels already coded: ``window`` = non-zeros among the previous 8 levels of
the row; ``left`` = the level just before in the row (0 at its start); ``row_last`` = the row's last
non-zero level so far (0 if none); ``column`` = column j's last non-zero level in earlier rows (0 if
none); ``seen`` = column j's non-zeros in earlier rows. Binarisation of a level v (M = max_abs,
T = min(num_gt, M - 1)); nothing at all is coded when M == 0. Context model
``sig24-sign27-gt12k-eg0-warmup`` (written since format version 3; ``left`` is what it adds, because
neighbouring weights of a layer that sees neighbouring pixels are alike: 7-8% fewer bytes on
LeNet-300-100, about 1% on convolutions):

1. ``sig`` = v != 0, context ``8 * col_class + 4 * (left != 0) + min(window, 3)`` with col_class 0 if
   seen == 0, 1 if 8 * seen < r (row r, so a column that was non-zero in under 1/8 of the earlier
   rows), else 2 (24 contexts).
2. ``sign`` = v < 0, context ``24 + 9 * sign_class(left) + 3 * sign_class(column) + sign_class(row_last)``,
   sign_class 0 for zero, 1 for negative, 2 for positive (27 contexts).
3. ``gt_k`` = |v| > k for k = 1..T, stopping after the first 0, context
   ``51 + 12 * (k - 1) + 6 * (v < 0) + 2 * ((|row_last| > k) + (|column| > k)) + (|left| > k)``.
4. If |v| > T: when T == M - 1 the unary code was truncated and |v| == M; otherwise the remainder
   |v| - T - 1 follows as order-0 Exp-Golomb in bypass bins (n ones, a zero, then the n bits of
   remainder + 1 below its leading one, most significant first).

Model ``sig24-sign27-gt24k-eg0-warmup-dq8`` codes the levels j of dependent (trellis-coded)
quantization: an 8-state machine (NNC's) starts in state 0 and moves on the parity of each coded k;
state s quantizes with quantizer q = s & 1, which makes even j (q = 0) or odd j and 0 (q = 1), and
the stream codes k with j = 2k - sign(k) q by the rules above applied to k, the ``gt_k`` context
becoming ``51 + 24 (k - 1) + 12 q + ...`` (the rest as above). ``encode`` refuses levels off the machine.

The earlier model ``sig12-sign9-gt6k-eg0-warmup`` (format version 2) is the same without ``left``:
contexts ``4 * col_class + min(window, 3)``, ``12 + 3 * sign_class(column) + sign_class(row_last)``
and ``21 + 6 * (k - 1) + 3 * (v < 0) + (|row_last| > k) + (|column| > k)``; both decode.

Bins go through a range coder with 32-bit range and carry propagation (the LZMA design). Each
context holds two 16-bit estimates of P(bin = 1) and a count n of its bins (saturating at 255);
each bin moves them towards 0 or 65536 by the difference shifted right by min(r, 4) and min(r, 7),
r = 1 + floor(log2(n + 1)) (a running mean while the context is young, then fixed rates), and
their sum shifted right by 2 is the 15-bit probability; a bypass bin is a bin with the fixed probability 2**14 / 2**15 and no
adaptation. docs/format.md specifies every step; the constants below are written into ``params``
and checked on decode, so a file never depends on a library default.
"""

from __future__ import annotations

import numba
import numpy as np

from deepshrink.coding import as_payload, check_count, int_array
from deepshrink.errors import CodecError

# --- the bitstream's constants (all written into params and checked on decode) -----------------
PROB_BITS = 15  # coding probability precision: bound = (range >> 15) * p
SHIFTS = (4, 7)  # adaptation rates of the two estimates (fast, slow)
INIT_PROB = 1 << 15  # each 16-bit estimate starts at P(1) = 1/2
#: levels of a dependent (trellis-coded) quantizer: model 1's rules on the coded k, plus the quantizer in use
DEPENDENT_CONTEXT_MODEL = "sig24-sign27-gt24k-eg0-warmup-dq8"
#: the context rules of this docstring / docs/format.md, by name: 0 = version 2's, 1 = with ``left``, 2 = dq
CONTEXT_MODELS = {"sig12-sign9-gt6k-eg0-warmup": 0, "sig24-sign27-gt12k-eg0-warmup": 1,
                  DEPENDENT_CONTEXT_MODEL: 2}
CONTEXT_MODEL = "sig24-sign27-gt12k-eg0-warmup"  # what the encoder writes
LEGACY_CONTEXT_MODEL = "sig12-sign9-gt6k-eg0-warmup"  # the only one format version 2 readers know
DEFAULT_NUM_GT = 32  # unary "greater than k" flags before the Exp-Golomb remainder
MAX_NUM_GT = 64  # bounds the bins per level a hostile header can ask for
MAX_ABS = 1 << 16  # the format's largest alphabet is 2**16 centroids
MAX_ROW_LENGTH = 1 << 31

_TOP = 1 << 24  # the range is renormalised (shifted by a byte) while it is below this
_HALF = 1 << (PROB_BITS - 1)  # bypass probability
_SIGN = (12, 24, 24)  # context index bases by model (significance starts at 0)
_GT = (21, 51, 51)
_GT_STRIDE = (6, 12, 24)  # contexts per "greater than k" flag
# dependent quantization's 8-state machine (NNC's, ISO/IEC 15938-17): state s quantizes with quantizer
# s & 1 and moves to DQ_NEXT[s, |k| & 1] after coding level k
DQ_NEXT = np.array([[0, 2], [7, 5], [1, 3], [6, 4], [2, 0], [5, 7], [3, 1], [4, 6]], dtype=np.int64)
_WINDOW = 8  # the significance context counts the non-zeros among this many previous levels of the row
_PARAM_KEYS = {"row_length", "max_abs", "num_gt", "prob_bits", "shifts", "init_prob", "context_model"}

_OK, _BAD_LEVEL, _BAD_START = 0, 1, 2
# 1 + floor(log2(n + 1)) for a context seen n = 0..255 times (the warm-up adaptation shift before its cap)
_RATE = np.array([1 + int(np.log2(n + 1)) for n in range(256)], dtype=np.int64)


# --- encoder ------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _shift_low(state, out):
    """Move the top byte of ``low`` out (through the one-byte cache that absorbs carries); returns ``out``."""
    low = state[0]
    if low < 0xFF000000 or low >= (1 << 32):
        carry = low >> 32
        byte = state[2]
        pos = state[4]
        if pos + state[3] + 8 > out.shape[0]:
            bigger = np.empty(2 * out.shape[0] + state[3] + 64, dtype=np.uint8)
            bigger[:pos] = out[:pos]
            out = bigger
        while state[3] > 0:
            out[pos] = np.uint8((byte + carry) & 0xFF)
            pos += 1
            byte = 0xFF
            state[3] -= 1
        state[4] = pos
        state[2] = (low >> 24) & 0xFF
    state[3] += 1
    state[0] = (low & 0x00FFFFFF) << 8
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _put(state, out, bit, p):
    """Code ``bit`` with P(1) = p / 2**15: the 1 takes the lower part of the range."""
    bound = (state[1] >> PROB_BITS) * p
    if bit:
        state[1] = bound
    else:
        state[0] += bound
        state[1] -= bound
    while state[1] < _TOP:
        state[1] <<= 8
        out = _shift_low(state, out)
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _prob(probs, ctx):
    return (probs[ctx, 0] + probs[ctx, 1]) >> 2


@numba.njit(cache=True, nogil=True, inline="always")
def _adapt(probs, ctx, bit, fast, slow):
    # warm-up: a context seen n times adapts with shift min(1 + floor(log2(n + 1)), cap), so its
    # first bins move the estimate like a running mean and later ones like a fixed-rate average
    seen = probs[ctx, 2]
    rate = _RATE[seen] if _RATE[seen] < slow else slow
    rate_fast = rate if rate < fast else fast
    if bit:
        probs[ctx, 0] += (65536 - probs[ctx, 0]) >> rate_fast
        probs[ctx, 1] += (65536 - probs[ctx, 1]) >> rate
    else:
        probs[ctx, 0] -= probs[ctx, 0] >> rate_fast
        probs[ctx, 1] -= probs[ctx, 1] >> rate
    if seen < 255:
        probs[ctx, 2] = seen + 1


@numba.njit(cache=True, nogil=True, inline="always")
def _sign_class(v):
    return 0 if v == 0 else (1 if v < 0 else 2)


# The context rules (docs/format.md), one function each so that encoder and decoder cannot drift apart.
@numba.njit(cache=True, nogil=True, inline="always")
def _row_window(levels, i, col, window):
    """The non-zeros among the previous _WINDOW levels of the row, slid forward to position i (column col)."""
    if col == 0:
        return 0
    window += levels[i - 1] != 0
    if col > _WINDOW:
        window -= levels[i - 1 - _WINDOW] != 0
    return window


@numba.njit(cache=True, nogil=True, inline="always")
def _sig_context(seen, i, row_length, window, left, model):
    """Significance: how dense this column has been so far (never / sparse / dense) x non-zeros in the row
    window (x whether the level just before is non-zero)."""
    col_class = 0 if seen == 0 else (1 if 8 * seen < i // row_length else 2)
    if model == 0:
        return 4 * col_class + min(window, 3)
    return 8 * col_class + 4 * (left != 0) + min(window, 3)


@numba.njit(cache=True, nogil=True, inline="always")
def _sign_context(column, row_last, left, model):
    """Sign: the signs of the column's and the row's last non-zero levels (and of the level just before)."""
    if model == 0:
        return _SIGN[0] + 3 * _sign_class(column) + _sign_class(row_last)
    return _SIGN[model] + 9 * _sign_class(left) + 3 * _sign_class(column) + _sign_class(row_last)


@numba.njit(cache=True, nogil=True, inline="always")
def _gt_context(k, negative, near_row, near_col, near_left, quantizer, model):
    """Flag "|level| > k": k, the sign, and whether the row's and column's last non-zeros (and the level
    just before) exceed k (and the dependent quantizer in use)."""
    if model == 0:
        return _GT[0] + 6 * (k - 1) + 3 * negative + (near_row > k) + (near_col > k)
    return (_GT[model] + _GT_STRIDE[model] * (k - 1) + 12 * quantizer + 6 * negative
            + 2 * ((near_row > k) + (near_col > k)) + (near_left > k))


@numba.njit(cache=True, nogil=True, inline="always")
def _next_state(state, levels, i, model):
    """The dependent quantizer's state at position i, from the state at i - 1 and the level coded there
    (always 0 outside model 2)."""
    if model != 2 or i == 0:
        return 0
    return DQ_NEXT[state, abs(np.int64(levels[i - 1])) & 1]


@numba.njit(cache=True, nogil=True)
def _dependent_to_coded(levels, out):
    """The coded level k of each reconstruction level j (j = 2k - sign(k) * quantizer) along the state
    machine; returns the first position whose j its state's quantizer cannot make (-1 if none)."""
    state = 0
    for i in range(levels.shape[0]):
        j = np.int64(levels[i])
        if j == 0:
            k = 0
        elif (state & 1) == 0:
            if j & 1:
                return i  # quantizer 0 makes even multiples of the step only
            k = j // 2
        else:
            if (j & 1) == 0:
                return i  # quantizer 1 makes odd multiples (and zero)
            k = (j + 1) // 2 if j > 0 else (j - 1) // 2
        out[i] = k
        state = DQ_NEXT[state, abs(k) & 1]
    return -1


@numba.njit(cache=True, nogil=True)
def _coded_to_dependent(levels):
    """In place: each coded level k becomes its reconstruction level j = 2k - sign(k) * quantizer."""
    state = 0
    for i in range(levels.shape[0]):
        k = np.int64(levels[i])
        quantizer = state & 1
        state = DQ_NEXT[state, abs(k) & 1]
        if k > 0:
            levels[i] = 2 * k - quantizer
        elif k < 0:
            levels[i] = 2 * k + quantizer


@numba.njit(cache=True, nogil=True)
def _encode(levels, row_length, max_abs, num_gt, fast, slow, init_prob, model):
    """Code ``levels``; returns the payload bytes as uint8 (leading zero byte dropped, trailing zeros stripped)."""
    n = levels.shape[0]
    probs = np.full((_GT[model] + _GT_STRIDE[model] * num_gt, 3), init_prob, dtype=np.int64)
    probs[:, 2] = 0  # times seen
    state = np.zeros(5, dtype=np.int64)  # low, range, cache, cache_size, pos
    state[1] = 0xFFFFFFFF
    state[3] = 1
    out = np.empty(n // 4 + 64, dtype=np.uint8)
    last = min(num_gt, max_abs - 1)  # T: the unary code's last flag
    col_last = np.zeros(min(row_length, n), dtype=np.int64)  # last non-zero level of each column
    col_count = np.zeros(min(row_length, n), dtype=np.int64)  # non-zeros of each column so far
    col = 0
    row_last = np.int64(0)  # last non-zero level of the current row
    window = 0  # non-zeros among the previous WINDOW levels of the row
    dq_state = 0  # the dependent quantizer's (model 2)
    for i in range(n if max_abs > 0 else 0):
        if col == 0:
            row_last = 0
        window = _row_window(levels, i, col, window)
        dq_state = _next_state(dq_state, levels, i, model)
        quantizer = dq_state & 1
        column = col_last[col]
        seen = col_count[col]
        left = np.int64(levels[i - 1]) if col > 0 else np.int64(0)
        ctx = _sig_context(seen, i, row_length, window, left, model)
        v = np.int64(levels[i])
        sig = 1 if v != 0 else 0
        out = _put(state, out, sig, _prob(probs, ctx))
        _adapt(probs, ctx, sig, fast, slow)
        if sig == 0:
            col += 1
            if col == row_length:
                col = 0
            continue
        negative = 1 if v < 0 else 0
        ctx = _sign_context(column, row_last, left, model)
        out = _put(state, out, negative, _prob(probs, ctx))
        _adapt(probs, ctx, negative, fast, slow)
        magnitude = -v if negative else v
        near_row = abs(row_last)
        near_col = abs(column)
        col_last[col] = v
        col_count[col] += 1
        row_last = v
        col += 1
        if col == row_length:
            col = 0
        k = 1
        while k <= last:
            flag = 1 if magnitude > k else 0
            ctx = _gt_context(k, negative, near_row, near_col, abs(left), quantizer, model)
            out = _put(state, out, flag, _prob(probs, ctx))
            _adapt(probs, ctx, flag, fast, slow)
            if flag == 0:
                break
            k += 1
        if magnitude > last and last < max_abs - 1:
            value = magnitude - last  # remainder + 1 >= 1
            width = 0
            while (value >> (width + 1)) > 0:
                width += 1
            for _ in range(width):
                out = _put(state, out, 1, _HALF)
            out = _put(state, out, 0, _HALF)
            for b in range(width - 1, -1, -1):
                out = _put(state, out, (value >> b) & 1, _HALF)
    # flush: the value in [low, low + range) with the most trailing zero bits, then strip them
    low, rng = state[0], state[1]
    for bits in range(32, -1, -1):
        mask = (np.int64(1) << bits) - 1
        value = (low + mask) & ~mask
        if value < low + rng:
            state[0] = value
            break
    for _ in range(5):
        out = _shift_low(state, out)
    end = state[4]
    while end > 1 and out[end - 1] == 0:
        end -= 1
    return out[1:end].copy()  # the first byte is the initial cache, always 0


# --- decoder ------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _get(state, data, p):
    """Decode one bin with P(1) = p / 2**15; bytes past the payload read as zero (and are counted)."""
    bound = (state[0] >> PROB_BITS) * p
    if state[1] < bound:
        state[0] = bound
        bit = 1
    else:
        state[1] -= bound
        state[0] -= bound
        bit = 0
    while state[0] < _TOP:
        pos = state[2]
        byte = np.int64(data[pos]) if pos < data.shape[0] else 0
        state[0] <<= 8
        state[1] = (state[1] << 8) | byte
        state[2] = pos + 1
    return bit


@numba.njit(cache=True, nogil=True)
def _decode(data, count, row_length, max_abs, num_gt, fast, slow, init_prob, model, out):
    """Decode ``count`` levels into ``out``; returns (status, bytes read including zeros past the end)."""
    probs = np.full((_GT[model] + _GT_STRIDE[model] * num_gt, 3), init_prob, dtype=np.int64)
    probs[:, 2] = 0  # times seen
    state = np.zeros(3, dtype=np.int64)  # range, code, pos
    state[0] = 0xFFFFFFFF
    code = 0
    for j in range(4):
        code = (code << 8) | (np.int64(data[j]) if j < data.shape[0] else 0)
    state[1] = code
    state[2] = 4
    if code >= state[0]:
        return _BAD_START, 4
    if max_abs == 0:
        out[:count] = 0
        return _OK, 4
    last = min(num_gt, max_abs - 1)
    max_width = 0
    while (max_abs >> (max_width + 1)) > 0:
        max_width += 1
    col_last = np.zeros(min(row_length, count), dtype=np.int64)
    col_count = np.zeros(min(row_length, count), dtype=np.int64)
    col = 0
    row_last = np.int64(0)
    window = 0
    dq_state = 0
    for i in range(count):
        if col == 0:
            row_last = 0
        window = _row_window(out, i, col, window)
        dq_state = _next_state(dq_state, out, i, model)
        quantizer = dq_state & 1
        column = col_last[col]
        seen = col_count[col]
        left = np.int64(out[i - 1]) if col > 0 else np.int64(0)
        ctx = _sig_context(seen, i, row_length, window, left, model)
        sig = _get(state, data, _prob(probs, ctx))
        _adapt(probs, ctx, sig, fast, slow)
        if sig == 0:
            out[i] = 0
            col += 1
            if col == row_length:
                col = 0
            continue
        ctx = _sign_context(column, row_last, left, model)
        negative = _get(state, data, _prob(probs, ctx))
        _adapt(probs, ctx, negative, fast, slow)
        near_row = abs(row_last)
        near_col = abs(column)
        here = col
        col += 1
        if col == row_length:
            col = 0
        magnitude = 1
        k = 1
        while k <= last:
            ctx = _gt_context(k, negative, near_row, near_col, abs(left), quantizer, model)
            flag = _get(state, data, _prob(probs, ctx))
            _adapt(probs, ctx, flag, fast, slow)
            if flag == 0:
                break
            magnitude += 1
            k += 1
        if magnitude > last and last < max_abs - 1:
            width = 0
            while _get(state, data, _HALF):
                width += 1
                if width > max_width:  # remainder + 1 <= max_abs needs at most max_width ones
                    return _BAD_LEVEL, state[2]
            value = 1
            for _ in range(width):
                value = (value << 1) | _get(state, data, _HALF)
            magnitude = last + value
            if magnitude > max_abs:
                return _BAD_LEVEL, state[2]
        v = -magnitude if negative else magnitude
        out[i] = v
        col_last[here] = v
        col_count[here] += 1
        row_last = v
    return _OK, state[2]


# --- API ----------------------------------------------------------------------------------------


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CodecError(f"cabac {name} must be an int, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise CodecError(f"cabac {name} must be in {low}..{high}, got {value}")
    return int(value)


def make_params(row_length: int, max_abs: int, num_gt: int = DEFAULT_NUM_GT,
                context_model: str = CONTEXT_MODEL) -> dict:
    """The params dict for a stream: geometry, alphabet and every bitstream constant."""
    params = {
        "row_length": row_length, "max_abs": max_abs, "num_gt": num_gt, "prob_bits": PROB_BITS,
        "shifts": list(SHIFTS), "init_prob": INIT_PROB, "context_model": context_model,
    }
    validate_params(params)
    return params


def validate_params(params: dict) -> tuple[int, int, int, int]:
    """(row_length, max_abs, num_gt, context model number) after checking ``params`` (CodecError names the bad key)."""
    if not isinstance(params, dict):
        raise CodecError(f"cabac params must be a dict, got {type(params).__name__}")
    if set(params) != _PARAM_KEYS:
        raise CodecError(f"cabac params must have keys {sorted(_PARAM_KEYS)}, got {sorted(map(str, params))}")
    model = params["context_model"]
    if not isinstance(model, str) or model not in CONTEXT_MODELS:
        raise CodecError(f"cabac param context_model must be one of {sorted(CONTEXT_MODELS)}, got {model!r}")
    fixed = {"prob_bits": PROB_BITS, "shifts": list(SHIFTS), "init_prob": INIT_PROB}
    for key, expected in fixed.items():
        value = params[key]
        if type(value) is not type(expected) or value != expected or (
            isinstance(value, list) and any(type(x) is not int for x in value)
        ):
            raise CodecError(f"cabac param {key} must be {expected!r} (the only supported value), got {value!r}")
    row_length = _check_int(params["row_length"], "row_length", 1, MAX_ROW_LENGTH)
    # dependent levels j = 2k - sign(k) * quantizer stay within MAX_ABS: their coded k within half of it
    max_abs = _check_int(params["max_abs"], "max_abs", 0, MAX_ABS // 2 if model == DEPENDENT_CONTEXT_MODEL else MAX_ABS)
    num_gt = _check_int(params["num_gt"], "num_gt", 0, MAX_NUM_GT)
    return row_length, max_abs, num_gt, CONTEXT_MODELS[model]


def as_levels(levels) -> np.ndarray:
    """1-D int32 copy/view of ``levels`` after checking rank, dtype and |level| <= MAX_ABS (CodecError)."""
    return int_array(levels, "levels", -MAX_ABS, MAX_ABS, np.int32)


def encode(levels, row_length: int, num_gt: int = DEFAULT_NUM_GT,
           context_model: str = CONTEXT_MODEL) -> tuple[bytes, dict]:
    """Code 1-D signed ``levels`` (scan order) whose rows hold ``row_length`` levels; returns (payload, params).
    ``context_model=LEGACY_CONTEXT_MODEL`` writes what format version 2 readers decode.

    >>> payload, params = encode(np.array([0, 0, 3, -1, 0, 0]), row_length=3)
    >>> decode(payload, params, 6).tolist()
    [0, 0, 3, -1, 0, 0]

    Raises:
        CodecError: levels not 1-D integers within MAX_ABS, or a bad row_length/num_gt.
    """
    array = as_levels(levels)
    if context_model == DEPENDENT_CONTEXT_MODEL:
        array = coded_levels(array)
    max_abs = int(np.abs(array.astype(np.int64)).max()) if array.size else 0
    params = make_params(row_length, max_abs, num_gt, context_model)
    payload = _encode(array, params["row_length"], max_abs, params["num_gt"], SHIFTS[0], SHIFTS[1], INIT_PROB,
                      CONTEXT_MODELS[context_model])
    return payload.tobytes(), params


def decode(payload, params: dict, count: int) -> np.ndarray:
    """Decode ``count`` levels (int32) from ``payload``; ``count`` comes from the caller (the file's header).

    Raises:
        CodecError: bad params or count, or a payload that is not exactly the coding of ``count``
            levels within ``max_abs`` (a bad start, an Exp-Golomb prefix or level out of range,
            bytes left over, a trailing zero byte the encoder would have stripped).
    """
    row_length, max_abs, num_gt, model = validate_params(params)
    count = check_count(count)
    data = np.frombuffer(as_payload(payload), dtype=np.uint8)
    if data.size and data[-1] == 0:
        raise CodecError("cabac payload ends with a zero byte (the encoder strips them)")
    if count == 0 or max_abs == 0:
        if data.size:
            raise CodecError(f"cabac payload holds {data.size} bytes but codes no bins (count {count}, max_abs {max_abs})")
        return np.zeros(count, dtype=np.int32)
    out = np.empty(count, dtype=np.int32)
    status, read = _decode(data, count, row_length, max_abs, num_gt, SHIFTS[0], SHIFTS[1], INIT_PROB, model, out)
    if status == _BAD_START:
        raise CodecError("cabac payload starts with a value outside the coder's range")
    if status == _BAD_LEVEL:
        raise CodecError(f"cabac payload codes a level beyond max_abs={max_abs} (at byte {read})")
    if read < data.size:
        raise CodecError(f"cabac payload has {data.size - read} trailing bytes after {count} levels")
    if model == 2:
        _coded_to_dependent(out)
    return out


def coded_levels(levels) -> np.ndarray:
    """The levels k that ``DEPENDENT_CONTEXT_MODEL`` codes for reconstruction levels j (int32, 1-D).

    Dependent quantization (trellis-coded, as in NNC and VVC) alternates two quantizers along the scan:
    quantizer 0 makes the even multiples of the step (j = 2k), quantizer 1 the odd ones and zero
    (j = 2k - sign(k)); which one quantizes a weight is the state of an 8-state machine driven by the
    parity of the previous k. Only ``quantize.dependent_1d`` (the trellis) makes such sequences.

    Raises:
        CodecError: a level that the quantizer of its state cannot make (levels not from the trellis).
    """
    array = as_levels(levels)
    coded = np.empty_like(array)
    bad = _dependent_to_coded(array, coded)
    if bad >= 0:
        raise CodecError(f"level {int(array[bad])} at position {bad} is not on the dependent quantizer of "
                         "its state: these levels were not made by dependent quantization")
    return coded


def is_dependent(levels) -> bool:
    """Whether ``levels`` (1-D integers) have a non-zero and follow dependent quantization's state machine."""
    array = as_levels(levels)
    return bool(array.size and array.any() and _dependent_to_coded(array, np.empty_like(array)) < 0)
