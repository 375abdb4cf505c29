"""Stage 3, rate-aware: the trellis search of dependent (trellis-coded) quantization (``quantize.dependent_1d``).

Two uniform quantizers share one step: quantizer 0 makes the even multiples of the step, quantizer 1
the odd multiples and zero. Which one quantizes a weight is the state of an 8-state machine that
moves on the parity of the previous level k (NNC's, ISO/IEC 15938-17, and VVC's design); the context
coder (``coding.level_coder.DEPENDENT_CONTEXT_MODEL``) follows the same machine, so it codes k, about half
of |j|, while the reconstruction levels j = 2k - sign(k) * quantizer are as fine as a grid of the
step itself. The encoder chooses the whole sequence at once: a Viterbi search over the states
minimises ``sum_i h_i (x_i - j_i step)^2 / s + lam * bits(k_i)``.

``bits`` is an estimate of what the coder will spend: per quantizer, the significance flag's cost
given whether the previous level of the row is non-zero, and the cost of |k| (its sign included),
from the statistics of the previous pass (the first pass starts from plain rounding). The step is
refitted to the chosen levels by least squares after each pass, as in ``quantize.uniform_1d``.

Zeros of the input are pruned weights: they stay zero (the machine still moves through them).
"""

from __future__ import annotations

import numba
import numpy as np

from .coding.level_kernels import DQ_NEXT  # the state machine is the bitstream's: one definition

_NO_PATH = np.inf
_SMOOTHING = 0.5  # added to every count of the rate estimate, so an unseen event still has a finite cost


@numba.njit(cache=True, nogil=True, inline="always")
def _candidate(t, quantizer, which):
    """Reconstruction level j of candidate ``which`` (1: the quantizer's level at or below t = x / step,
    2: the one above) on ``quantizer``."""
    if quantizer == 0:
        low = 2 * np.floor(t / 2)
    else:
        low = 2 * np.floor((t - 1) / 2) + 1
    return np.int64(low) + (2 if which == 2 else 0)


@numba.njit(cache=True, nogil=True, inline="always")
def _coded_level(j, quantizer):
    """The level k that codes reconstruction level j on ``quantizer`` (j = 2k - sign(k) * quantizer)."""
    if j == 0:
        return 0
    return (j + quantizer) // 2 if j > 0 else (j - quantizer) // 2


@numba.njit(cache=True, nogil=True)
def viterbi(x, h, step, max_level, lam, row_length, sig_bits, mag_bits, out):
    """Fill ``out`` with the reconstruction levels j of the cheapest path; returns its cost.

    Cost of a path: ``sum_i h_i (x_i - j_i step)^2 + lam * bits``, bits from ``sig_bits[q, left != 0,
    sig]`` and ``mag_bits[q, min(|k|, top)]``. Each state offers zero and its quantizer's two levels
    around x (zero only where x == 0). Memory: one byte per weight and state for the decisions.
    """
    n = x.shape[0]
    decisions = np.zeros((n, 8), dtype=np.uint8)  # previous state * 4 + candidate (0: zero, 1, 2)
    cost = np.full(8, _NO_PATH)
    cost[0] = 0.0
    left = np.zeros(8, dtype=np.int64)  # whether each survivor's last level in the row is non-zero
    new_cost = np.empty(8)
    new_left = np.empty(8, dtype=np.int64)
    top_k = mag_bits.shape[1] - 1
    for i in range(n):
        new_cost[:] = _NO_PATH
        at_row_start = i % row_length == 0
        t = x[i] / step
        for s in range(8):
            if cost[s] == _NO_PATH:
                continue
            q = s & 1
            nz = 0 if at_row_start else left[s]
            for which in range(3 if x[i] != 0 else 1):
                if which == 0:
                    j = np.int64(0)
                else:
                    j = _candidate(t, q, which)
                    if j == 0 or abs(j) > max_level:
                        continue
                ak = abs(_coded_level(j, q))
                d = x[i] - j * step
                rate = sig_bits[q, nz, 1] + mag_bits[q, min(ak, top_k)] if ak else sig_bits[q, nz, 0]
                c = cost[s] + h[i] * d * d + lam * rate
                ns = DQ_NEXT[s, ak & 1]
                if c < new_cost[ns]:
                    new_cost[ns] = c
                    decisions[i, ns] = s * 4 + which
                    new_left[ns] = 1 if ak else 0
        cost[:] = new_cost
        left[:] = new_left
    best = 0
    for s in range(1, 8):
        if cost[s] < cost[best]:
            best = s
    total = cost[best]
    s = best
    for i in range(n - 1, -1, -1):
        d = np.int64(decisions[i, s])
        prev = d >> 2
        which = d & 3
        out[i] = 0 if which == 0 else _candidate(x[i] / step, prev & 1, which)
        s = prev
    return total


@numba.njit(cache=True, nogil=True)
def _statistics(levels, row_length, top_k, counts_sig, counts_mag):
    """Add the (quantizer, previous non-zero, significance) and (quantizer, |k|) counts of ``levels``."""
    state = 0
    for i in range(levels.shape[0]):
        j = levels[i]
        q = state & 1
        nz = 0 if i % row_length == 0 else (1 if levels[i - 1] != 0 else 0)
        ak = abs(_coded_level(j, q))
        counts_sig[q, nz, 1 if ak else 0] += 1
        if ak:
            counts_mag[q, min(ak, top_k)] += 1
        state = DQ_NEXT[state, ak & 1]


def rates(levels: np.ndarray, row_length: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Estimated bits of each decision, from the counts of ``levels`` (smoothed)."""
    counts_sig = np.full((2, 2, 2), _SMOOTHING)
    counts_mag = np.full((2, top_k + 1), _SMOOTHING)
    counts_mag[:, 0] = 0.0
    _statistics(levels, row_length, top_k, counts_sig, counts_mag)
    sig_bits = -np.log2(counts_sig / counts_sig.sum(axis=2, keepdims=True))
    mag = counts_mag[:, 1:]
    mag_bits = np.zeros_like(counts_mag)
    mag_bits[:, 1:] = 1.0 - np.log2(mag / mag.sum(axis=1, keepdims=True))  # + 1: the sign
    return sig_bits, mag_bits
