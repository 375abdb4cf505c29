"""The numba kernels of ``level_coder``: its range coder, context rules and level loops, and the
bitstream's numeric constants they implement (``level_coder`` writes them into every stream's params and
checks them on decode; its docstring and docs/format.md specify the format).

The kernels run without the GIL (``nogil``), so that a thread pool can code tensors in parallel. Conventions
that make them fast: every index is cast to unsigned (numba wraps negative signed indices, a compare and an
add per access), the coder's state lives in local variables, the level loops run row by row, and the
significance bin of a zero level, the hot path (90% and more of the levels of a pruned layer), keeps its
repeating context's estimates in variables.
"""

from __future__ import annotations

import numba
import numpy as np

PROB_BITS = 15  # coding probability precision: bound = (range >> 15) * p
SHIFTS = (4, 7)  # adaptation rates of the two estimates (fast, slow)
INIT_PROB = 1 << 15  # each 16-bit estimate starts at P(1) = 1/2

_TOP = 1 << 24  # the range is renormalised (shifted by a byte) while it is below this
_HALF = 1 << (PROB_BITS - 1)  # bypass probability
_SIGN = (12, 24, 24)  # context index bases by model (significance starts at 0)
_GT = (21, 51, 51)
_GT_STRIDE = (6, 12, 24)  # contexts per "greater than k" flag
# dependent quantization's 8-state machine (NNC's, ISO/IEC 15938-17): state s quantizes with quantizer
# s & 1 and moves to DQ_NEXT[s, |k| & 1] after coding level k
DQ_NEXT = np.array([[0, 2], [7, 5], [1, 3], [6, 4], [2, 0], [5, 7], [3, 1], [4, 6]], dtype=np.int64)
_WINDOW = 8  # the significance context counts the non-zeros among this many previous levels of the row

OK, BAD_LEVEL, BAD_START = 0, 1, 2  # decode_payload's status
# The adaptation shifts min(1 + floor(log2(n + 1)), cap) of a context seen n times (a young context's
# estimates move like a running mean, later ones like a fixed-rate average): from n = 63 on both are at
# their caps, so the kernels stop counting there (the format's n saturates at 255: the same shifts)
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


@numba.njit(cache=True, nogil=True, inline="always")
def _u(index):
    """``index`` unsigned: numba checks a signed index for wrapping around from the end."""
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
    """Sign: the signs of the column's and the row's last non-zero levels (and of the level just before)."""
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
    """The 15-bit P(1) of context ``ctx``: its two estimates' sum shifted right by 2."""
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
    """Context ``ctx``'s estimates, in place, after coding ``bit``."""
    at_fast, at_slow, at_seen = _u(4 * ctx), _u(4 * ctx + 1), _u(4 * ctx + 2)
    estimates[at_fast], estimates[at_slow], estimates[at_seen] = _adapted(estimates[at_fast], estimates[at_slow],
                                                                          estimates[at_seen], bit)


@numba.njit(cache=True, nogil=True, inline="always")
def _swap_context(estimates, held, fast, slow, seen, ctx):
    """Store the estimates of context ``held`` (kept in variables while it repeats), load those of ``ctx``."""
    estimates[_u(4 * held)], estimates[_u(4 * held + 1)], estimates[_u(4 * held + 2)] = fast, slow, seen
    return estimates[_u(4 * ctx)], estimates[_u(4 * ctx + 1)], estimates[_u(4 * ctx + 2)]


# --- dependent quantization ----------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def dependent_to_coded(levels, out):
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
        # _shift_low written out: numba counts references to an array handed through two inlined calls,
        # which would cost two atomic operations a bin
        if low < 0xFF000000 or low >= (1 << 32):
            carry = low >> 32
            byte = cache
            while pending > 0:
                out[_u(pos)] = np.uint8((byte + carry) & 0xFF)
                pos += 1
                byte = 0xFF
                pending -= 1
            cache = (low >> 24) & 0xFF
        low = (low & 0x00FFFFFF) << 8
        pending += 1
    return low, rng, cache, pending, pos


# The encoder codes the levels in chunks: before each one the output buffer gets room for the chunk's worst
# case, so that the hot loop never grows it (which would also make numba count references to it per bin).
# Between chunks the coder's state lives in an int64 array at these indices.
_CHUNK = 1 << 14
_LOW, _RANGE, _CACHE, _PENDING, _POS, _DQ_STATE, _ROW_HISTORY, _LEFT, _ROW_LAST = range(9)


@numba.njit(cache=True, nogil=True)
def _grown(out, pos, needed):
    """``out`` with room for ``needed`` more bytes after ``pos`` (a new array when it had none)."""
    if pos + needed <= out.shape[0]:
        return out
    bigger = np.empty(2 * out.shape[0] + needed, dtype=np.uint8)
    bigger[:pos] = out[:pos]
    return bigger


@numba.njit(cache=True, nogil=True)
def encode_payload(levels, row_length, max_abs, num_gt, model):
    """Code ``levels``; returns the payload bytes as uint8 (leading zero byte dropped, trailing zeros stripped)."""
    n = levels.shape[0]
    gt_base, gt_stride = _GT[model], _GT_STRIDE[model]
    estimates = _fresh_estimates(gt_base + gt_stride * num_gt)
    col_last = np.zeros(min(row_length, n), dtype=np.int32)  # last non-zero level of each column
    col_count = np.zeros(min(row_length, n), dtype=np.int32)  # non-zeros of each column so far
    coder = np.zeros(9, dtype=np.int64)
    coder[_RANGE] = 0xFFFFFFFF
    coder[_PENDING] = 1  # the cache's first byte, always 0
    # the bytes one level can emit at most: 2 per bin (p >= 35 / 2**15 leaves range >= 2**14), over at
    # most 2 + num_gt + 2 * 17 bins (an Exp-Golomb remainder is below 2**17), besides those pending
    level_bytes = 2 * (2 + num_gt + 2 * 17)
    out = np.empty(n // 8 + 1024, dtype=np.uint8)
    for begin in range(0, n if max_abs > 0 else 0, _CHUNK):
        end = min(begin + _CHUNK, n)
        out = _grown(out, coder[_POS], coder[_PENDING] + (end - begin) * level_bytes)
        _encode_chunk(levels, begin, end, row_length, max_abs, num_gt, model, estimates, col_last, col_count,
                      coder, out)
    low, rng, cache, pending, pos = coder[_LOW], coder[_RANGE], coder[_CACHE], coder[_PENDING], coder[_POS]
    # flush: the value in [low, low + range) with the most trailing zero bits, then strip them
    for bits in range(32, -1, -1):
        mask = (np.int64(1) << bits) - 1
        value = (low + mask) & ~mask
        if value < low + rng:
            low = value
            break
    out = _grown(out, pos, pending + 5)
    for _ in range(5):
        low, cache, pending, pos = _shift_low(low, cache, pending, pos, out)
    end = pos
    while end > 1 and out[end - 1] == 0:
        end -= 1
    return out[1:end].copy()  # the first byte is the initial cache, always 0


@numba.njit(cache=True, nogil=True)
def _encode_chunk(levels, begin, end, row_length, max_abs, num_gt, model, estimates, col_last, col_count, coder,
                  out):
    """Code levels[begin:end] into ``out`` (which has room for them), going on from the state in ``coder``."""
    rules, sign_base, sign_left, gt_base, gt_stride, gt_neg, gt_near, gt_left = _layout(model)
    sig_contexts = _SIG_CONTEXT[rules]
    last = min(num_gt, max_abs - 1)  # T: the unary code's last flag
    low, rng, cache, pending, pos = coder[_LOW], coder[_RANGE], coder[_CACHE], coder[_PENDING], coder[_POS]
    dq_state = coder[_DQ_STATE]  # the dependent quantizer's (model 2)
    history = coder[_ROW_HISTORY]  # bit b: level col - 1 - b of the row is non-zero
    left = coder[_LEFT]  # the level just before in the row (while history & 1)
    row_last = coder[_ROW_LAST]  # the row's last non-zero level
    # a zero level's significance context mostly repeats: its estimates stay in variables while it does
    held = 0
    fast, slow, times = estimates[0], estimates[1], estimates[2]
    i = begin
    while i < end:
        row = i // row_length
        row_start = row * row_length
        stop = min(row_length, end - row_start)
        for col in range(i - row_start, stop):
            v = np.int64(levels[_u(row_start + col)])
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
                    dq_state = DQ_NEXT[_u(dq_state), 0]
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
                dq_state = DQ_NEXT[_u(dq_state), magnitude & 1]
        i = row_start + stop
        if stop == row_length:  # the next row starts afresh
            history, left, row_last = 0, 0, 0
    _swap_context(estimates, held, fast, slow, times, 0)
    coder[_LOW], coder[_RANGE], coder[_CACHE], coder[_PENDING], coder[_POS] = low, rng, cache, pending, pos
    coder[_DQ_STATE], coder[_ROW_HISTORY], coder[_LEFT], coder[_ROW_LAST] = dq_state, history, left, row_last


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
def decode_payload(data, count, row_length, max_abs, num_gt, model, out):
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
        return BAD_START, pos
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
                    dq_state = DQ_NEXT[_u(dq_state), 0]
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
                        return BAD_LEVEL, pos
                value = 1
                for _ in range(width):
                    bit, rng, code, pos = _decode_bin(_HALF, rng, code, pos, data)
                    value = (value << 1) | bit
                magnitude = last + value
                if magnitude > max_abs:
                    return BAD_LEVEL, pos
            v = -magnitude if negative else magnitude
            if model == 2:  # the output is j = 2k - sign(k) * quantizer; the contexts go on with k
                row_out[_u(col)] = 2 * v - quantizer if negative == 0 else 2 * v + quantizer
                dq_state = DQ_NEXT[_u(dq_state), magnitude & 1]
            else:
                row_out[_u(col)] = v
            col_last[_u(col)] = v
            col_count[_u(col)] = seen + 1
            row_last = v
            left = v
            history = ((history << 1) | 1) & (_HISTORY - 1)
    return OK, pos
