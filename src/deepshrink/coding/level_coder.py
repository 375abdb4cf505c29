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
# s & 1 and moves to _DQ_NEXT[s, |k| & 1] after coding level k
_DQ_NEXT = np.array([[0, 2], [7, 5], [1, 3], [6, 4], [2, 0], [5, 7], [3, 1], [4, 6]], dtype=np.int64)
_WINDOW = 8  # the significance context counts the non-zeros among this many previous levels of the row
_PARAM_KEYS = {"row_length", "max_abs", "num_gt", "prob_bits", "shifts", "init_prob", "context_model"}

_OK, _BAD_LEVEL, _BAD_START = 0, 1, 2
# The adaptation shifts min(1 + floor(log2(n + 1)), cap) of a context seen n times: from n = 63 on both
# are at their caps, so the kernels stop counting there (the format's n saturates at 255: the same shifts)
_SEEN_CAP = 63
_FAST_SHIFT = np.array([min(1 + int(np.log2(n + 1)), SHIFTS[0]) for n in range(_SEEN_CAP + 1)], dtype=np.int32)
_SLOW_SHIFT = np.array([min(1 + int(np.log2(n + 1)), SHIFTS[1]) for n in range(_SEEN_CAP + 1)], dtype=np.int32)
_HISTORY = 1 << _WINDOW  # a row's non-zero flags of its last _WINDOW levels, bit 0 the level just before


def _significance_contexts() -> np.ndarray:
    """[rules, col_class * _HISTORY + history] -> significance context, for rules 0 (version 2's, without
    ``left``) and 1 (the others')."""
    history = np.arange(_HISTORY)
    window = np.minimum(np.array([bin(h).count("1") for h in history]), 3)
    col_class = np.arange(3)[:, None]
    legacy = 4 * col_class + window
    with_left = 8 * col_class + 4 * (history & 1) + window
    return np.stack([legacy.reshape(-1), with_left.reshape(-1)]).astype(np.int32)


_SIG_CONTEXT = _significance_contexts()


# Kernel conventions: every index is cast to unsigned (numba wraps negative signed indices, a compare
# and an add per access), coder state lives in local variables, and the level loops run row by row,
# the significance bin of a zero level being the hot path (90% and more of the levels of a pruned layer).


@numba.njit(cache=True, nogil=True, inline="always")
def _u(index):
    return np.uint64(index)


# --- context rules (docs/format.md), shared by encoder and decoder so that they cannot drift apart -----


@numba.njit(cache=True, nogil=True, inline="always")
def _layout(model):
    """The context rules' constants of a model: (rules, sign base, sign weight of ``left``, gt base,
    gt stride, gt weights of the sign, of near_k and of ``|left| > k``)."""
    if model == 0:
        return 0, _SIGN[0], 0, _GT[0], _GT_STRIDE[0], 3, 1, 0
    return 1, _SIGN[model], 9, _GT[model], _GT_STRIDE[model], 6, 2, 1


@numba.njit(cache=True, nogil=True, inline="always")
def _sig_context(sig_contexts, seen, row, history):
    """Significance: how dense column j has been in the rows before (never / in under 1/8 of them /
    more) x the row's recent non-zeros."""
    col_class = 0 if seen == 0 else (1 if 8 * seen < row else 2)
    return sig_contexts[_u(col_class * _HISTORY + history)]


@numba.njit(cache=True, nogil=True, inline="always")
def _sign_class(v):
    return 0 if v == 0 else (1 if v < 0 else 2)


@numba.njit(cache=True, nogil=True, inline="always")
def _sign_context(sign_base, sign_left, left, column, row_last):
    return sign_base + sign_left * _sign_class(left) + 3 * _sign_class(column) + _sign_class(row_last)


@numba.njit(cache=True, nogil=True, inline="always")
def _gt_context(base, k, stride, near, near_row, near_col, near_left, gt_left):
    """Flag "|level| > k": ``base`` holds the model's base, the sign's and the quantizer's part."""
    return base + stride * (k - 1) + near * ((near_row > k) + (near_col > k)) + gt_left * (near_left > k)


# --- probability model ---------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _fresh_estimates(contexts):
    """Context c at [4c: 4c + 3]: the fast and slow estimate of P(1), the times seen (capped at _SEEN_CAP)."""
    estimates = np.full(4 * contexts, INIT_PROB, dtype=np.int32)
    estimates[2::4] = 0
    return estimates


@numba.njit(cache=True, nogil=True, inline="always")
def _prob(estimates, ctx):
    return np.int64(estimates[_u(4 * ctx)] + estimates[_u(4 * ctx + 1)]) >> 2


@numba.njit(cache=True, nogil=True, inline="always")
def _adapted(fast, slow, seen, bit):
    """A context's (fast, slow, seen) after coding ``bit``."""
    if bit:
        fast += (65536 - fast) >> _FAST_SHIFT[_u(seen)]
        slow += (65536 - slow) >> _SLOW_SHIFT[_u(seen)]
    else:
        fast -= fast >> _FAST_SHIFT[_u(seen)]
        slow -= slow >> _SLOW_SHIFT[_u(seen)]
    return fast, slow, (seen + 1 if seen < _SEEN_CAP else seen)


@numba.njit(cache=True, nogil=True, inline="always")
def _adapt(estimates, ctx, bit):
    at = _u(4 * ctx)
    fast, slow, seen = _adapted(estimates[at], estimates[at + 1], estimates[at + 2], bit)
    estimates[at], estimates[at + 1], estimates[at + 2] = fast, slow, seen


@numba.njit(cache=True, nogil=True, inline="always")
def _swap_context(estimates, held, fast, slow, seen, ctx):
    """Store the estimates of context ``held`` (kept in variables while it repeats), load those of ``ctx``."""
    at = _u(4 * held)
    estimates[at], estimates[at + 1], estimates[at + 2] = fast, slow, seen
    at = _u(4 * ctx)
    return estimates[at], estimates[at + 1], estimates[at + 2]


# --- dependent quantization ----------------------------------------------------------------------


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
        state = _DQ_NEXT[state, abs(k) & 1]
    return -1


# --- encoder ------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _shift_low(low, cache, pending, pos, out):
    """Move the top byte of ``low`` out through the one-byte ``cache`` that absorbs carries (``pending``
    counts the cache and the 0xFF bytes behind it); returns (low, cache, pending, pos)."""
    if low < 0xFF000000 or low >= (1 << 32):
        carry = low >> 32
        byte = cache
        while pending > 0:
            out[_u(pos)] = np.uint8((byte + carry) & 0xFF)
            pos += 1
            byte = 0xFF
            pending -= 1
        cache = (low >> 24) & 0xFF
    return (low & 0x00FFFFFF) << 8, cache, pending + 1, pos


@numba.njit(cache=True, nogil=True, inline="always")
def _encode_bin(bit, p, low, rng, cache, pending, pos, out):
    """Code ``bit`` with P(1) = p / 2**15 (the 1 takes the lower part of the range); returns the coder state."""
    bound = (rng >> PROB_BITS) * p
    if bit:
        rng = bound
    else:
        low += bound
        rng -= bound
    while rng < _TOP:
        rng <<= 8
        low, cache, pending, pos = _shift_low(low, cache, pending, pos, out)
    return low, rng, cache, pending, pos


@numba.njit(cache=True, nogil=True)
def _grown(out, pos, needed):
    """``out`` with room for ``needed`` more bytes after ``pos`` (a new array when it had none)."""
    if pos + needed <= out.shape[0]:
        return out
    bigger = np.empty(2 * out.shape[0] + needed, dtype=np.uint8)
    bigger[:pos] = out[:pos]
    return bigger


@numba.njit(cache=True, nogil=True)
def _encode(levels, row_length, max_abs, num_gt, model):
    """Code ``levels``; returns the payload bytes as uint8 (leading zero byte dropped, trailing zeros stripped)."""
    n = levels.shape[0]
    rules, sign_base, sign_left, gt_base, gt_stride, gt_neg, gt_near, gt_left = _layout(model)
    sig_contexts = _SIG_CONTEXT[rules]
    estimates = _fresh_estimates(gt_base + gt_stride * num_gt)
    low, rng, cache, pending, pos = np.int64(0), np.int64(0xFFFFFFFF), np.int64(0), np.int64(1), np.int64(0)
    out = np.empty(n // 8 + 1024, dtype=np.uint8)
    # the bytes one level can emit at most: 2 per bin (p >= 35 / 2**15 leaves range >= 2**14), over at
    # most 2 + num_gt + 2 * 17 bins (an Exp-Golomb remainder is below 2**17), besides those pending
    level_bytes = 2 * (2 + num_gt + 2 * 17) + 16
    last = min(num_gt, max_abs - 1)  # T: the unary code's last flag
    col_last = np.zeros(min(row_length, n), dtype=np.int32)  # last non-zero level of each column
    col_count = np.zeros(min(row_length, n), dtype=np.int32)  # non-zeros of each column so far
    dq_state = 0  # the dependent quantizer's (model 2)
    # a zero level's significance context mostly repeats: its estimates stay in variables while it does
    held = 0
    fast, slow, times = estimates[0], estimates[1], estimates[2]
    for row in range((n + row_length - 1) // row_length if max_abs > 0 else 0):
        start = row * row_length
        row_levels = levels[start: min(start + row_length, n)]
        history = 0  # bit b: level col - 1 - b of the row is non-zero
        left = 0  # the level just before in the row (while history & 1)
        row_last = 0  # the row's last non-zero level
        for col in range(row_levels.shape[0]):
            if pos + pending + level_bytes > out.shape[0]:
                out = _grown(out, pos, pending + level_bytes)
            v = np.int64(row_levels[_u(col)])
            seen = col_count[_u(col)]
            ctx = _sig_context(sig_contexts, seen, row, history)
            if ctx != held:
                fast, slow, times = _swap_context(estimates, held, fast, slow, times, ctx)
                held = ctx
            sig = 1 if v != 0 else 0
            low, rng, cache, pending, pos = _encode_bin(sig, (fast + slow) >> 2, low, rng, cache, pending, pos, out)
            fast, slow, times = _adapted(fast, slow, times, sig)
            if sig == 0:
                history = (history << 1) & (_HISTORY - 1)
                if model == 2:
                    dq_state = _DQ_NEXT[_u(dq_state), 0]
                continue
            if history & 1 == 0:
                left = 0
            negative = 1 if v < 0 else 0
            column = np.int64(col_last[_u(col)])
            ctx = _sign_context(sign_base, sign_left, left, column, row_last)
            low, rng, cache, pending, pos = _encode_bin(negative, _prob(estimates, ctx), low, rng, cache, pending,
                                                        pos, out)
            _adapt(estimates, ctx, negative)
            magnitude = -v if negative else v
            near_row, near_col, near_left = abs(row_last), abs(column), abs(left)
            base = gt_base + 12 * (dq_state & 1) + gt_neg * negative
            k = 1
            while k <= last:
                flag = 1 if magnitude > k else 0
                ctx = _gt_context(base, k, gt_stride, gt_near, near_row, near_col, near_left, gt_left)
                low, rng, cache, pending, pos = _encode_bin(flag, _prob(estimates, ctx), low, rng, cache, pending,
                                                            pos, out)
                _adapt(estimates, ctx, flag)
                if flag == 0:
                    break
                k += 1
            if magnitude > last and last < max_abs - 1:
                value = magnitude - last  # remainder + 1 >= 1
                width = 0
                while (value >> (width + 1)) > 0:
                    width += 1
                for _ in range(width):
                    low, rng, cache, pending, pos = _encode_bin(1, _HALF, low, rng, cache, pending, pos, out)
                low, rng, cache, pending, pos = _encode_bin(0, _HALF, low, rng, cache, pending, pos, out)
                for b in range(width - 1, -1, -1):
                    low, rng, cache, pending, pos = _encode_bin((value >> b) & 1, _HALF, low, rng, cache, pending,
                                                                pos, out)
            col_last[_u(col)] = v
            col_count[_u(col)] = seen + 1
            row_last = v
            left = v
            history = ((history << 1) | 1) & (_HISTORY - 1)
            if model == 2:
                dq_state = _DQ_NEXT[_u(dq_state), magnitude & 1]
    # flush: the value in [low, low + range) with the most trailing zero bits, then strip them
    for bits in range(32, -1, -1):
        mask = (np.int64(1) << bits) - 1
        value = (low + mask) & ~mask
        if value < low + rng:
            low = value
            break
    out = _grown(out, pos, pending + 16)
    for _ in range(5):
        low, cache, pending, pos = _shift_low(low, cache, pending, pos, out)
    end = pos
    while end > 1 and out[end - 1] == 0:
        end -= 1
    return out[1:end].copy()  # the first byte is the initial cache, always 0


# --- decoder ------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _decode_bin(p, rng, code, pos, data):
    """Decode one bin with P(1) = p / 2**15; bytes past the payload read as zero (and are counted).
    Returns (bit, rng, code, pos)."""
    bound = (rng >> PROB_BITS) * p
    if code < bound:
        rng = bound
        bit = 1
    else:
        code -= bound
        rng -= bound
        bit = 0
    while rng < _TOP:
        byte = np.int64(data[_u(pos)]) if pos < data.shape[0] else np.int64(0)
        rng <<= 8
        code = (code << 8) | byte
        pos += 1
    return bit, rng, code, pos


@numba.njit(cache=True, nogil=True)
def _decode(data, count, row_length, max_abs, num_gt, model, out):
    """Decode ``count`` levels into ``out``, which holds zeros (model 2: the reconstruction levels j);
    returns (status, bytes read including zeros past the end)."""
    rules, sign_base, sign_left, gt_base, gt_stride, gt_neg, gt_near, gt_left = _layout(model)
    sig_contexts = _SIG_CONTEXT[rules]
    estimates = _fresh_estimates(gt_base + gt_stride * num_gt)
    rng = np.int64(0xFFFFFFFF)
    code = np.int64(0)
    for j in range(4):
        code = (code << 8) | (np.int64(data[j]) if j < data.shape[0] else np.int64(0))
    pos = np.int64(4)
    if code >= rng:
        return _BAD_START, pos
    last = min(num_gt, max_abs - 1)
    max_width = 0
    while (max_abs >> (max_width + 1)) > 0:
        max_width += 1
    col_last = np.zeros(min(row_length, count), dtype=np.int32)
    col_count = np.zeros(min(row_length, count), dtype=np.int32)
    dq_state = 0
    # a zero level's significance context mostly repeats: its estimates stay in variables while it does
    held = 0
    fast, slow, times = estimates[0], estimates[1], estimates[2]
    for row in range((count + row_length - 1) // row_length if max_abs > 0 else 0):
        start = row * row_length
        row_out = out[start: min(start + row_length, count)]
        history = 0
        left = 0
        row_last = 0
        for col in range(row_out.shape[0]):
            seen = col_count[_u(col)]
            ctx = _sig_context(sig_contexts, seen, row, history)
            if ctx != held:
                fast, slow, times = _swap_context(estimates, held, fast, slow, times, ctx)
                held = ctx
            sig, rng, code, pos = _decode_bin((fast + slow) >> 2, rng, code, pos, data)
            fast, slow, times = _adapted(fast, slow, times, sig)
            if sig == 0:
                history = (history << 1) & (_HISTORY - 1)
                if model == 2:
                    dq_state = _DQ_NEXT[_u(dq_state), 0]
                continue
            if history & 1 == 0:
                left = 0
            column = np.int64(col_last[_u(col)])
            ctx = _sign_context(sign_base, sign_left, left, column, row_last)
            negative, rng, code, pos = _decode_bin(_prob(estimates, ctx), rng, code, pos, data)
            _adapt(estimates, ctx, negative)
            near_row, near_col, near_left = abs(row_last), abs(column), abs(left)
            quantizer = dq_state & 1
            base = gt_base + 12 * quantizer + gt_neg * negative
            magnitude = 1
            k = 1
            while k <= last:
                ctx = _gt_context(base, k, gt_stride, gt_near, near_row, near_col, near_left, gt_left)
                flag, rng, code, pos = _decode_bin(_prob(estimates, ctx), rng, code, pos, data)
                _adapt(estimates, ctx, flag)
                if flag == 0:
                    break
                magnitude += 1
                k += 1
            if magnitude > last and last < max_abs - 1:
                width = 0
                while True:
                    one, rng, code, pos = _decode_bin(_HALF, rng, code, pos, data)
                    if not one:
                        break
                    width += 1
                    if width > max_width:  # remainder + 1 <= max_abs needs at most max_width ones
                        return _BAD_LEVEL, pos
                value = 1
                for _ in range(width):
                    bit, rng, code, pos = _decode_bin(_HALF, rng, code, pos, data)
                    value = (value << 1) | bit
                magnitude = last + value
                if magnitude > max_abs:
                    return _BAD_LEVEL, pos
            v = -magnitude if negative else magnitude
            if model == 2:  # the output is j = 2k - sign(k) * quantizer; the contexts go on with k
                row_out[_u(col)] = 2 * v - quantizer if negative == 0 else 2 * v + quantizer
                dq_state = _DQ_NEXT[_u(dq_state), magnitude & 1]
            else:
                row_out[_u(col)] = v
            col_last[_u(col)] = v
            col_count[_u(col)] = seen + 1
            row_last = v
            left = v
            history = ((history << 1) | 1) & (_HISTORY - 1)
    return _OK, pos


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
    max_abs = max(-int(array.min()), int(array.max())) if array.size else 0
    params = make_params(row_length, max_abs, num_gt, context_model)
    payload = _encode(array, params["row_length"], max_abs, params["num_gt"], CONTEXT_MODELS[context_model])
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
    out = np.zeros(count, dtype=np.int32)  # the kernel writes the non-zero levels only
    status, read = _decode(data, count, row_length, max_abs, num_gt, model, out)
    if status == _BAD_START:
        raise CodecError("cabac payload starts with a value outside the coder's range")
    if status == _BAD_LEVEL:
        raise CodecError(f"cabac payload codes a level beyond max_abs={max_abs} (at byte {read})")
    if read < data.size:
        raise CodecError(f"cabac payload has {data.size - read} trailing bytes after {count} levels")
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
