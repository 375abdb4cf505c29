"""Stage 3's rate-aware quantizers on plain numpy arrays: levels chosen for the file's size, not only error.

Each value takes the level minimising squared error (optionally weighted by an importance, e.g. a
diagonal Fisher estimate) plus ``lam`` times the level's code length: ``ecsq_1d`` (entropy-constrained,
Choi et al. 2017, on k-means levels), ``uniform_1d`` (multiples of one step, as NNCodec) and
``dependent_1d`` (trellis-coded, ``deepshrink.trellis``). ``QuantizeMethod`` names them and the paper's
k-means (``kmeans.py``); ``quantize.py`` applies them to a model's weights.
"""

from __future__ import annotations

import numbers
from enum import Enum

import numpy as np

from . import trellis
from .config import check_lam
from .errors import ConfigError
from .kmeans import check_k, check_values, kmeans_1d

class QuantizeMethod(str, Enum):
    """How a layer's weights are mapped to shared values.

    KMEANS: 1-D k-means on the non-zero weights, 2^bits centroids (Han et al. 2016); no rate term.
    ECSQ: entropy-constrained scalar quantization (Choi et al. 2017): k-means, then levels chosen for
        distortion + lam * code length; levels drop out and weights may join the zero level (pruned).
    UNIFORM: integer multiples of a per-layer step (as NNCodec), with the same rate-distortion
        assignment; zero is always a level.
    DQ: dependent (trellis-coded) quantization (``deepshrink.trellis``): two interleaved uniform
        quantizers chosen along the scan by an 8-state machine, the levels by a Viterbi search over
        error + lam * estimated bits; written with ``cabac``'s dependent context model (NNC's design).
    """

    KMEANS = "kmeans"
    ECSQ = "ecsq"
    UNIFORM = "uniform"
    DQ = "dq"


# ---------------------------------------------------------------------------------------------------
# Functional core: rate-aware quantization (entropy-constrained and uniform) on plain numpy arrays.
#
# Both minimise, per value, ``h_i (w_i - c)^2 / s + lam * bits(c)``: squared error weighted by an
# importance h_i (1, or a diagonal Fisher estimate), divided by the layer's weighted mean square
# ``s = mean(h_i w_i^2)`` so that ``lam`` is dimensionless (the fraction of a typical weight's energy
# worth one bit, the same in every layer), plus the level's code length ``bits(c) = -log2 p(c)``
# under the current assignment, counted over the whole tensor (pruned zeros included): what a
# memoryless entropy coder of all level indices would pay.
# ---------------------------------------------------------------------------------------------------

#: Values per chunk of the rate-distortion assignment: bounds the (chunk, levels) cost matrix.
_RD_CHUNK = 1 << 16


def _check_iters(iters) -> int:
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ConfigError(f"iters must be an integer >= 1, got {iters!r}")
    return int(iters)


def _check_zeros(zeros) -> int | None:
    if zeros is None:
        return None
    if isinstance(zeros, bool) or not isinstance(zeros, numbers.Integral) or zeros < 0:
        raise ConfigError(f"zeros (count of already-zero weights) must be an integer >= 0 or None, got {zeros!r}")
    return int(zeros)


def _check_importance(weights, n: int) -> np.ndarray | None:
    """float64 importances, floored so every weighted mean and the scale stay defined."""
    if weights is None:
        return None
    h = np.asarray(weights, dtype=np.float64).reshape(-1) if np.ndim(weights) else None
    if h is None or h.size != n:
        raise ConfigError(f"weights (importances) must be a 1-D array of {n} entries, got shape {np.shape(weights)}")
    if not np.isfinite(h).all() or (h < 0).any():
        raise ConfigError("weights (importances) must be finite and >= 0")
    # an importance of exactly 0 (e.g. a weight on an always-black input pixel) would leave its level's
    # weighted mean undefined: floor at a millionth of the mean (1 when all are 0)
    mean = float(h.mean())
    return np.maximum(h, 1e-6 * mean if mean > 0 else 1.0)


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """-log2(count / total) per level, in bits; +inf for an empty level (it can take no value)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    with np.errstate(divide="ignore"):
        return np.where(counts > 0, -np.log2(counts / total), np.inf) if total > 0 else np.full(counts.shape, np.inf)


def rd_assign(values: np.ndarray, levels: np.ndarray, bits: np.ndarray, lam: float,
              importance: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """Index of the level minimising ``h_i (v_i - c)^2 / scale + lam * bits(c)`` for every value.

    Ties go to the lower index. Exhaustive over the levels, in chunks of ``_RD_CHUNK`` values: with
    importances the cheapest level is not the nearest one, so the sorted-run trick of k-means does
    not apply; O(n K) is a few hundred milliseconds for a million weights at 64 levels.

    Returns:
        intp array of shape ``values.shape``.
    """
    x = np.asarray(values, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    penalty = lam * np.asarray(bits, dtype=np.float64) if lam > 0 else np.where(np.isinf(bits), np.inf, 0.0)
    out = np.empty(x.size, dtype=np.intp)
    for start in range(0, x.size, _RD_CHUNK):
        part = x[start:start + _RD_CHUNK, None]
        cost = np.square(part - levels[None, :])
        if importance is not None:
            cost *= importance[start:start + _RD_CHUNK, None]
        cost /= scale
        cost += penalty[None, :]
        out[start:start + _RD_CHUNK] = np.argmin(cost, axis=1)
    return out


def _scale(x: np.ndarray, h: np.ndarray | None) -> float:
    s = float(np.mean(np.square(x) if h is None else h * np.square(x)))
    return s if s > 0 else 1.0


def ecsq_1d(
    values: np.ndarray,
    num_levels: int,
    lam: float,
    weights: np.ndarray | None = None,
    *,
    init: str = "linear",
    iters: int = 100,
    seed: int = 0,
    zeros: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Entropy-constrained scalar quantization (Choi, El-Khamy & Lee, ICLR 2017, Sec. 4).

    Starts from ``kmeans_1d(values, num_levels, init)``, then alternates (Chou, Lookabaugh & Gray's
    ECVQ iteration): each value takes the level minimising ``h_i (v_i - c)^2 / s + lam * bits(c)``
    (see the section comment), each free level moves to the h-weighted mean of its members, and a
    level that loses all its members drops out. Stops when no assignment changes or after ``iters``.

    With ``lam == 0`` and no ``weights`` the objective is k-means' own, and the result is exactly
    ``kmeans_1d``'s (same init, same centroids, same labels).

    Args:
        values: 1-D array of finite numbers (a layer's non-zero weights).
        num_levels: free levels at the start (k-means' k); fewer remain when levels drop out.
        lam: rate weight (>= 0), dimensionless; 0 = distortion only.
        weights: per-value importance h_i >= 0 (e.g. a diagonal Fisher estimate); None = 1.
        init, seed: k-means' initialisation (see ``kmeans_1d``).
        iters: most ECSQ iterations (>= 1).
        zeros: None for no zero level; else the number of weights already at zero (pruned): a level
            fixed at exactly 0.0 is offered to every value when ``lam > 0``, starting with that many
            members for the code lengths (at least one, so it never drops out). At ``lam == 0`` it is
            not offered: distortion alone keeps the k-means result, and only rate makes pruning pay.

    Returns:
        (levels, labels): sorted float64 levels (including 0.0 when the zero level was offered) and
        each value's level index (intp, or k-means' labels when they are returned unchanged).

    Raises:
        ConfigError: bad values, num_levels < 1, lam < 0 or not finite, bad weights, iters < 1, zeros < 0.
    """
    values = check_values(values)
    k = check_k(num_levels)
    lam = check_lam(lam)
    iters = _check_iters(iters)
    zeros = _check_zeros(zeros)
    h = _check_importance(weights, values.size)
    centers, labels = kmeans_1d(values, k, init, seed=seed)
    use_zero = zeros is not None and lam > 0
    if lam == 0 and h is None:
        return centers, labels  # ECSQ's objective at lam = 0 is k-means': its result, untouched

    x = values.astype(np.float64)
    scale = _scale(x, h)
    levels = centers.copy()
    labels = labels.astype(np.intp)
    if use_zero:
        levels = np.append(levels, 0.0)  # the last level is the fixed zero; it never moves or drops
    for _ in range(iters):
        counts = np.bincount(labels, minlength=levels.size).astype(np.float64)
        if use_zero:
            counts[-1] += max(zeros, 1)
        new_labels = rd_assign(x, levels, code_lengths(counts), lam, h, scale)
        changed = not np.array_equal(new_labels, labels)
        labels = new_labels
        levels, labels = _update_levels(x, h, levels, labels, use_zero)
        if not changed:
            break
    order = np.argsort(levels, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return levels[order], rank[labels]


def _update_levels(x, h, levels, labels, fixed_zero: bool):
    """Weighted means of the free levels' members; empty free levels drop out (labels renumbered)."""
    n_free = levels.size - 1 if fixed_zero else levels.size
    w = np.ones_like(x) if h is None else h
    mass = np.bincount(labels, weights=w, minlength=levels.size)
    moment = np.bincount(labels, weights=w * x, minlength=levels.size)
    keep = mass > 0
    if fixed_zero:
        keep[-1] = True
    new = levels.copy()
    free = np.arange(levels.size) < n_free
    live = free & (mass > 0)
    new[live] = moment[live] / mass[live]
    if keep.all():
        return new, labels
    renumber = np.cumsum(keep) - 1
    return new[keep], renumber[labels]


def uniform_1d(
    values: np.ndarray,
    num_levels: int,
    lam: float,
    weights: np.ndarray | None = None,
    *,
    iters: int = 100,
    zeros: int = 0,
) -> tuple[float, np.ndarray]:
    """Uniform quantization with a rate-distortion assignment: each value becomes ``q_i * step`` with an
    integer ``q_i`` in ``-L..L`` (L = num_levels // 2), zero always a level, as NNCodec does.

    Starts from ``step = max|v| / L`` (the largest weight lands on a level) and rounding, then
    alternates: each value takes the integer minimising ``h_i (v_i - q step)^2 / s + lam * bits(q)``
    (code lengths of the current assignment over the whole tensor, ``zeros`` included at q = 0), and
    the step becomes the least-squares fit ``sum h q v / sum h q^2`` of the non-zero assignments.

    Args:
        values: 1-D array of finite numbers (a layer's non-zero weights).
        num_levels: non-zero levels available (2 L of them; >= 2).
        lam: rate weight (>= 0); see ``ecsq_1d``.
        weights: per-value importance h_i >= 0; None = 1.
        iters: most iterations (>= 1).
        zeros: weights already at zero (pruned), counted at q = 0 for the code lengths.

    Returns:
        (step, q): the step (> 0; 1.0 when every value is zero) and each value's integer level (int64).

    Raises:
        ConfigError: bad values, num_levels < 2, lam/weights/iters/zeros out of range.
    """
    values = check_values(values)
    if isinstance(num_levels, bool) or not isinstance(num_levels, numbers.Integral) or num_levels < 2:
        raise ConfigError(f"num_levels of a uniform quantizer must be an integer >= 2, got {num_levels!r}")
    lam = check_lam(lam)
    iters = _check_iters(iters)
    zeros = _check_zeros(zeros) or 0
    h = _check_importance(weights, values.size)
    x = values.astype(np.float64)
    top = int(num_levels) // 2
    peak = float(np.max(np.abs(x)))
    if peak == 0:
        return 1.0, np.zeros(x.size, dtype=np.int64)
    step = peak / top
    ints = np.arange(-top, top + 1)
    q = np.clip(np.rint(x / step), -top, top).astype(np.int64)
    scale = _scale(x, h)
    w = np.ones_like(x) if h is None else h
    def assign(q: np.ndarray, step: float) -> np.ndarray:
        counts = np.bincount(q + top, minlength=ints.size).astype(np.float64)
        counts[top] = max(counts[top] + zeros, 1)  # zero never drops out
        # distortion only at lam = 0: every level stays on offer (plain rounding to the grid)
        bits = code_lengths(counts) if lam > 0 else np.zeros(ints.size)
        return ints[rd_assign(x, ints * step, bits, lam, h, scale)]

    for _ in range(iters):
        new_q = assign(q, step)
        if np.array_equal(new_q, q):
            break  # the step was fitted to this very assignment: a fixed point
        q = new_q
        denom = float(np.sum(w * q * q))
        if denom > 0:
            step = float(np.sum(w * q * x)) / denom
    else:
        q = assign(q, step)  # out of iterations: the returned levels are the assignment on the final grid
    return step, q


def dependent_1d(
    values: np.ndarray,
    num_levels: int,
    lam: float,
    weights: np.ndarray | None = None,
    *,
    row_length: int | None = None,
    step: float | None = None,
    iters: int = 4,
) -> tuple[float, np.ndarray]:
    """Dependent quantization of a flat tensor (scan order, zeros = pruned and kept).

    Args:
        values: 1-D finite numbers: the whole tensor in C order, pruned entries 0.
        num_levels: reconstruction levels j are limited to ``|j| <= num_levels // 2`` (>= 2).
        lam: rate weight (>= 0), on the same scale as ``quantize.uniform_1d``'s: squared error is
            divided by s = mean(h x^2) over the non-zero values.
        weights: per-value importance h_i >= 0 (None = 1).
        row_length: values per output row (the coder's geometry; the previous level's context resets
            at a row start); None = one row.
        step: the first pass's step; None = ``max|x| / (num_levels // 2)``.
        iters: passes (trellis, then step and rate refit), >= 1.

    Returns:
        (step, j): the step (> 0; 1.0 for an all-zero input) and the int64 reconstruction levels, a
        sequence ``coding.level_coder.coded_levels`` accepts; j == 0 wherever the input is 0.

    Raises:
        ConfigError: bad values, num_levels, lam, weights, row_length, step or iters.
    """
    x = check_values(values).astype(np.float64)
    if isinstance(num_levels, bool) or not isinstance(num_levels, numbers.Integral) or num_levels < 2:
        raise ConfigError(f"num_levels of a dependent quantizer must be an integer >= 2, got {num_levels!r}")
    lam = check_lam(lam)
    iters = _check_iters(iters)
    row_length = (x.size or 1) if row_length is None else row_length
    if isinstance(row_length, bool) or not isinstance(row_length, numbers.Integral) or row_length < 1:
        raise ConfigError(f"row_length must be an integer >= 1, got {row_length!r}")
    h = _check_importance(weights, x.size)
    max_level = int(num_levels) // 2
    nonzero = x != 0
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0:
        return 1.0, np.zeros(x.size, dtype=np.int64)
    if step is None:
        step = peak / max_level
    elif isinstance(step, bool) or not isinstance(step, numbers.Real) or not np.isfinite(step) or step <= 0:
        raise ConfigError(f"step must be a finite number > 0, got {step!r}")
    w = np.ones_like(x) if h is None else h
    scale = _scale(x[nonzero], None if h is None else h[nonzero])
    top_k = (max_level + 1) // 2
    levels = np.where(nonzero, np.clip(np.rint(x / step), -max_level, max_level), 0).astype(np.int64)
    for _ in range(iters):
        sig_bits, mag_bits = trellis.rates(levels, int(row_length), top_k)
        trellis.viterbi(x, w / scale, float(step), max_level, lam, int(row_length), sig_bits, mag_bits, levels)
        denom = float(np.sum(w * levels * levels))
        if denom == 0:
            break  # every weight went to zero: no step to fit
        step = float(np.sum(w * levels * x)) / denom
    return float(step), levels
