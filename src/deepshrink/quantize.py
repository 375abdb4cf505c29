"""Stage 3: trained quantization by per-layer weight sharing: k-means, entropy-constrained (ECSQ) or uniform.

A quantized weight is ``codebook[indices]`` where index 0 is the pruned value (exactly zero) and
indices 1..K point at the K trainable centroids. Gradients reach each centroid as the sum of its
weights' gradients (the paper's Eq. 3) through the gather's backward; assignments never change.
Fine-tuning the centroids therefore needs nothing beyond an optimizer over the model's parameters::

    layers = quantize_model(model, QuantizeConfig(bits=4))      # {fqn: {"bits", "mse", ...}}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    for x, y in batches:                                        # your loop, unchanged
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

The clustering core is exact 1-D Lloyd k-means on the sorted non-zero values: with prefix sums, one
iteration costs O(k log n) (k-1 binary searches for the boundaries between clusters, then k segment
means), not the O(nk) of a general k-means.

Rate-aware methods (``QuantizeConfig(method="ecsq" | "uniform" | "dq", lam=...)``) trade distortion for the
file's size: each weight takes the level minimising squared error (optionally Fisher-weighted,
``hessian=True``) plus ``lam`` times the level's code length. Zero is one of the levels: weights sent
there become pruned (index 0) and stay zero through training, like pruned ones.
"""

from __future__ import annotations

import logging
import numbers
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from . import trellis
from .parametrizations import GradientMode, Masked, SharedWeights, fold_zero_centroids, index_dtype, shared_weights_of
from .config import check_bits, check_lam, check_patterns_match, enum_value, first_match, pattern_values
from .codecs.common import row_length_of
from .errors import ConfigError
from .layers import (MIN_DIMS, WeightRef, as_kinds, as_patterns, by_kind, kind_pairs, resolve, select_weights,
                     tie_parametrizations)

logger = logging.getLogger(__name__)



class CentroidInit(str, Enum):
    """Where Lloyd's iterations start (Han et al. 2016, Sec. 3.2).

    RANDOM: Forgy; k distinct values drawn at random from the layer's weights.
    DENSITY: equal steps on the weights' CDF (the quantiles at levels (i + 1/2) / k).
    LINEAR: equal steps between the smallest and largest weight; keeps the rare large weights
        represented, the paper's best.
    KMEANS_PP: k-means++ seeding (each next centroid drawn with probability ~ squared distance).
    """

    RANDOM = "random"
    DENSITY = "density"
    LINEAR = "linear"
    KMEANS_PP = "kmeans++"


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
# Functional core: 1-D k-means on plain numpy arrays.
# ---------------------------------------------------------------------------------------------------


class _SortedValues:
    """Sorted float64 values with prefix sums, so any run's count, sum and SSE cost O(1)."""

    def __init__(self, x: np.ndarray):
        self.x = x  # sorted float64
        self.n = x.size
        self.s1 = np.empty(self.n + 1)
        self.s1[0] = 0.0
        np.cumsum(x, out=self.s1[1:])
        self._s2: np.ndarray | None = None

    @property
    def s2(self) -> np.ndarray:
        # only k-means++ and the split fallback of empty-cluster repair need squares: computed on first use
        if self._s2 is None:
            self._s2 = np.empty(self.n + 1)
            self._s2[0] = 0.0
            np.cumsum(np.square(self.x), out=self._s2[1:])
        return self._s2

    def means(self, bounds: np.ndarray) -> np.ndarray:
        hi, lo = bounds[1:], bounds[:-1]
        return (self.s1[hi] - self.s1[lo]) / (hi - lo)

    def sse(self, bounds: np.ndarray, centers: np.ndarray) -> np.ndarray:
        """Sum of squared distances of each run [bounds[j], bounds[j+1]) to ``centers[j]``."""
        lo, hi = bounds[:-1], bounds[1:]
        total = self.s2[hi] - self.s2[lo] - 2 * centers * (self.s1[hi] - self.s1[lo]) + (hi - lo) * centers**2
        return np.maximum(total, 0.0)  # rounding can dip below zero for tight runs

    def assign(self, centers: np.ndarray) -> np.ndarray:
        """Run boundaries of the nearest-centroid partition (sorted centers; ties go to the lower one)."""
        mids = 0.5 * (centers[:-1] + centers[1:])
        return np.concatenate(([0], np.searchsorted(self.x, mids, side="right"), [self.n]))


def _check_values(values, what: str = "values") -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise ConfigError(f"{what} must be a 1-D array, got shape {values.shape}")
    if values.size == 0:
        raise ConfigError(f"{what} is empty; there is nothing to cluster")
    if not np.issubdtype(values.dtype, np.floating):
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
            raise ConfigError(f"{what} must be real numbers, got dtype {values.dtype}")
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise ConfigError(f"{what}: {bad} of {values.size} values are NaN/inf; k-means needs finite values")
    return values


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"k (number of centroids) must be an integer >= 1, got {k!r}")
    return int(k)


def _distinct(sorted_values: np.ndarray) -> np.ndarray:
    keep = np.empty(sorted_values.size, dtype=bool)
    keep[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=keep[1:])
    return sorted_values[keep]


def _init_linear(sv: _SortedValues, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.linspace(sv.x[0], sv.x[-1], k)


def _init_density(sv: _SortedValues, k: int, rng: np.random.Generator) -> np.ndarray:
    # quantile at level (i + 1/2) / k, linearly interpolated between order statistics
    pos = (np.arange(k) + 0.5) / k * (sv.n - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, sv.n - 1)
    frac = pos - lo
    return sv.x[lo] + frac * (sv.x[hi] - sv.x[lo])


def _init_random(sv: _SortedValues, k: int, rng: np.random.Generator) -> np.ndarray:
    picked = np.unique(sv.x[rng.choice(sv.n, size=min(k, sv.n), replace=False)])
    if picked.size < k:  # repeated values were drawn: top up from the distinct values not yet taken
        rest = np.setdiff1d(_distinct(sv.x), picked, assume_unique=True)
        extra = rng.choice(rest.size, size=min(k - picked.size, rest.size), replace=False)
        picked = np.union1d(picked, rest[extra])
    return picked


def _init_kmeans_pp(sv: _SortedValues, k: int, rng: np.random.Generator) -> np.ndarray:
    x, s1, s2 = sv.x, sv.s1, sv.s2
    centers = np.array([x[rng.integers(sv.n)]])
    while centers.size < k:
        # potential (squared distance to the nearest center) summed over each run, from prefix sums
        bounds = sv.assign(centers)
        costs = sv.sse(bounds, centers)
        total = costs.sum()
        if not total > 0:
            break  # every distinct value is already a center
        cum = np.cumsum(costs)
        j = min(int(np.searchsorted(cum, rng.random() * total, side="right")), costs.size - 1)
        target = rng.random() * costs[j]
        lo, hi, c = int(bounds[j]), int(bounds[j + 1]), centers[j]

        def cost_upto(e: int) -> float:  # potential of x[lo:e] around c
            return s2[e] - s2[lo] - 2 * c * (s1[e] - s1[lo]) + (e - lo) * c * c

        a, b = lo, hi - 1  # smallest index i with cost_upto(i + 1) > target
        while a < b:
            m = (a + b) // 2
            if cost_upto(m + 1) > target:
                b = m
            else:
                a = m + 1
        pick = x[a]
        if np.any(centers == pick):  # rounding led to a zero-potential point: take the farthest instead
            ends = np.concatenate((x[bounds[:-1]], x[bounds[1:] - 1]))
            far = np.abs(ends - np.concatenate((centers, centers)))
            if not far.max() > 0:
                break
            pick = ends[int(np.argmax(far))]
        centers = np.sort(np.append(centers, pick))
    return centers


#: Centroid initialisers: sorted values, k, random generator -> initial centroids (float64).
CENTROID_INITS: dict[CentroidInit, Callable[[_SortedValues, int, np.random.Generator], np.ndarray]] = {
    CentroidInit.RANDOM: _init_random,
    CentroidInit.DENSITY: _init_density,
    CentroidInit.LINEAR: _init_linear,
    CentroidInit.KMEANS_PP: _init_kmeans_pp,
}


def _sorted_values(values: np.ndarray) -> tuple[np.ndarray, _SortedValues]:
    # sort in the input dtype (float32 sorts ~2x faster), then widen: float32 -> float64 is exact
    sorted_native = np.sort(values)
    return sorted_native, _SortedValues(sorted_native.astype(np.float64))


def init_centroids(values: np.ndarray, k: int, init: str, seed: int = 0) -> np.ndarray:
    """Initial centroids for clustering ``values`` into ``k`` groups.

    Args:
        values: 1-D array of finite numbers.
        k: number of centroids (>= 1).
        init: a ``CentroidInit`` value ("random", "density", "linear", "kmeans++").
        seed: seeds "random" and "kmeans++" (deterministic per seed).

    Returns:
        sorted float64 array; k entries, except that "random" and "kmeans++" stop at the number of
        distinct values when there are fewer than k. "linear" and "density" may repeat values.

    Raises:
        ConfigError: empty or non-finite values, k < 1, unknown init.
    """
    values = _check_values(values)
    k = _check_k(k)
    method = CentroidInit(enum_value(CentroidInit, init, "centroid init"))
    _, sv = _sorted_values(values)
    return CENTROID_INITS[method](sv, k, np.random.default_rng(seed))


def _split_largest(sv: _SortedValues, bounds: np.ndarray, k: int) -> np.ndarray:
    """Split the run with the largest SSE (at its mean) until there are k runs (needs k distinct values)."""
    x = sv.x
    while bounds.size - 1 < k:
        lo, hi = bounds[:-1], bounds[1:]
        means = sv.means(bounds)
        spread = x[hi - 1] - x[lo]
        score = np.where(spread > 0, sv.sse(bounds, means), -1.0)  # a run of one repeated value cannot split
        if not score.max() > 0:
            score = np.where(spread > 0, spread, -1.0)  # SSE lost to rounding: fall back to the widest run
        j = int(np.argmax(score))
        a, b = int(lo[j]), int(hi[j])
        cut = a + int(np.searchsorted(x[a:b], means[j], side="right"))
        if not a < cut < b:  # the mean rounded onto an end value: cut after the first value's run
            cut = a + int(np.searchsorted(x[a:b], x[a], side="right"))
        bounds = np.insert(bounds, j + 1, cut)
    return bounds


def _reseed_empty(sv: _SortedValues, bounds: np.ndarray, centers: np.ndarray, k: int) -> np.ndarray:
    """Re-seed missing clusters with the values farthest from their current centers (as scikit-learn does).

    ``bounds`` (from ``assign(centers)``) may hold empty runs and fewer than k runs. With m clusters
    missing, the m values farthest from their run's center lie at run ends; each is cut off as a run
    of its own. The result can still have fewer than k runs (a whole run was taken): the next
    iteration re-seeds again. Cuts fall only between different values, so a value's run can be
    recovered from the value alone. Needs more than k distinct values.
    """
    nonempty = np.diff(bounds) > 0
    m = k - int(np.count_nonzero(nonempty))
    if m == 0:
        return bounds if nonempty.all() else np.unique(bounds)
    x = sv.x
    lo, hi, owner = bounds[:-1][nonempty], bounds[1:][nonempty], centers[nonempty]
    # candidates: the m values at each end of each run (the distance to a run's center grows outwards)
    steps = np.arange(m)
    cand = np.concatenate([np.minimum(lo[:, None] + steps, hi[:, None] - 1).ravel(),
                           np.maximum(hi[:, None] - 1 - steps, lo[:, None]).ravel()])
    run = np.concatenate([np.repeat(np.arange(lo.size), m)] * 2)
    cand, first = np.unique(cand, return_index=True)
    dist = (x[cand] - owner[run[first]]) ** 2
    far = x[cand[np.argsort(-dist, kind="stable")[:m]]]
    cuts = [lo, [sv.n], np.searchsorted(x, far, side="left"), np.searchsorted(x, far, side="right")]
    return np.unique(np.concatenate(cuts))


def _complete(sv: _SortedValues, bounds: np.ndarray, centers: np.ndarray, k: int) -> np.ndarray:
    """Final assignment: re-seed until there are exactly k runs (needs more than k distinct values)."""
    bounds = _reseed_empty(sv, bounds, centers, k)
    while bounds.size - 1 < k:
        more = _reseed_empty(sv, bounds, sv.means(bounds), k)
        bounds = more if more.size > bounds.size else _split_largest(sv, bounds, k)
    return bounds


def _labels(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each value, the number of thresholds strictly below it (its cluster index)."""
    thresholds = thresholds.astype(values.dtype)  # exact: the thresholds are values of this array
    if thresholds.size > 128:
        return np.searchsorted(thresholds, values, side="left")
    # few thresholds: k vectorised compares over cache-sized chunks beat a per-value binary search 3-5x
    chunk = 1 << 15
    out = np.empty(values.size, dtype=np.uint8)
    scratch = np.empty(min(chunk, values.size), dtype=bool)
    for start in range(0, values.size, chunk):
        part = values[start:start + chunk]
        acc = out[start:start + chunk]
        acc.fill(0)
        above = scratch[:part.size]
        for t in thresholds:
            np.greater(part, t, out=above)
            np.add(acc, above, out=acc)
    return out


def kmeans_1d(
    values: np.ndarray,
    k: int,
    init: str = "linear",
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, exact and O(k log n) per iteration.

    Stops when no assignment changes, when the centroids move less than ``tol`` (sum of squared
    shifts relative to the variance of ``values``, as scikit-learn counts it) or after ``max_iter``
    iterations. A last assignment step follows, and the returned centroids are the means of their
    clusters. A cluster left empty is re-seeded with the values farthest from their centroids, as
    scikit-learn does (deterministic), falling back to splitting the run with the largest squared
    error at its mean when that cannot produce k clusters.

    Args:
        values: 1-D array of finite numbers.
        k: number of centroids (>= 1).
        init: a ``CentroidInit`` value.
        seed: seeds "random" and "kmeans++".
        max_iter: most Lloyd iterations (>= 1).
        tol: relative convergence tolerance (>= 0).

    Returns:
        (centroids, labels): sorted float64 centroids of shape (k',) where k' = min(k, number of
        distinct values) (with fewer distinct values than k they are exactly those values), and each
        value's cluster index (uint8 when k' <= 129, else intp).

    Raises:
        ConfigError: empty or non-finite values, k < 1, unknown init, max_iter < 1, tol < 0.
    """
    values = _check_values(values)
    k = _check_k(k)
    method = CentroidInit(enum_value(CentroidInit, init, "centroid init"))
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ConfigError(f"tol must be a number >= 0, got {tol!r}")

    sorted_native, sv = _sorted_values(values)
    # a strided sample with more than k distinct values settles it without a pass over all n
    if _distinct(sorted_native[:: max(1, sv.n // (4 * k))]).size <= k:
        distinct = _distinct(sorted_native)
        if distinct.size <= k:
            return distinct.astype(np.float64), _labels(values, distinct[:-1])

    mean = sv.s1[-1] / sv.n
    variance = float(np.dot(sv.x, sv.x)) / sv.n - mean * mean  # one fast pass; exact enough unless |mean| >> std
    if not variance > 1e-6 * mean * mean:
        variance = float(np.var(sv.x))
    tol_abs = tol * variance
    centers = np.sort(CENTROID_INITS[method](sv, k, np.random.default_rng(seed)))
    bounds = None
    for _ in range(max_iter):
        new_bounds = sv.assign(centers)
        if centers.size < k or not (new_bounds[1:] > new_bounds[:-1]).all():
            new_bounds = _reseed_empty(sv, new_bounds, centers, k)
        if bounds is not None and new_bounds.size == bounds.size and (new_bounds == bounds).all():
            break  # no assignment changed: centers already are the means of these runs
        new_centers = sv.means(new_bounds)
        shift = float(np.sum((new_centers - centers) ** 2)) if new_centers.size == centers.size else np.inf
        centers, bounds = new_centers, new_bounds
        if shift <= tol_abs:
            break
    bounds = _complete(sv, sv.assign(centers), centers, k)
    centers = sv.means(bounds)
    return centers, _labels(values, sorted_native[bounds[1:-1] - 1])


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
    values = _check_values(values)
    k = _check_k(num_levels)
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
    values = _check_values(values)
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
    x = _check_values(values).astype(np.float64)
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


# ---------------------------------------------------------------------------------------------------
# Model layer
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one weight-sharing step (``dataclasses.asdict`` goes into checkpoint meta)."""

    bits: int = 4  # 16 shared values per layer: the lab's setting, small codebooks, little accuracy loss
    bits_conv: int | None = None  # conv layers; None = ``bits`` (the paper used 8 for AlexNet's convs)
    bits_fc: int | None = None  # fully connected layers; None = ``bits`` (the paper used 5)
    bits_by_pattern: tuple[tuple[str, int], ...] = ()  # FQN glob -> bits; first match wins, beats kinds
    bits_by_kind: tuple[tuple[str, int], ...] = ()  # (kind, bits), e.g. ("attention", 6); beats bits_conv/fc
    init: str = "linear"  # a CentroidInit value; linear keeps large weights represented (paper's best)
    seed: int = 0  # seeds random/kmeans++ inits; each layer derives its own seed from this and its FQN
    max_iter: int = 100  # Lloyd iterations per layer; 1-D k-means rarely needs more
    include: tuple[str, ...] | None = None  # FQN globs; None = every weight of the selected kinds
    exclude: tuple[str, ...] = ()  # FQN globs removed after include
    kinds: tuple[str, ...] | None = None  # weight kinds (layers.KINDS); None = all
    gradient: str = "sum"  # a GradientMode value; sum is the paper's Eq. 3
    min_dims: int = MIN_DIMS  # floating parameters with at least this many dims are compressible
    min_numel: int = 1  # ... and at least this many elements
    method: str = "kmeans"  # a QuantizeMethod value; kmeans is the paper's (no rate term)
    lam: float = 0.0  # ecsq/uniform: bits traded per unit of relative squared error; 0 = distortion only
    hessian: bool = False  # ecsq/uniform: weight the error by a diagonal Fisher estimate (fisher_diagonal)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once here (lists from YAML become tuples)
        set_(self, "method", enum_value(QuantizeMethod, self.method, "quantization method"))
        set_(self, "lam", check_lam(self.lam))
        if not isinstance(self.hessian, bool):
            raise ConfigError(f"hessian must be true or false, got {self.hessian!r}")
        if self.method == QuantizeMethod.KMEANS.value and (self.lam > 0 or self.hessian):
            raise ConfigError(f"method 'kmeans' has no rate term: lam={self.lam} and hessian={self.hessian} "
                              "apply to method 'ecsq' or 'uniform'")
        set_(self, "bits", check_bits(self.bits))
        for name in ("bits_conv", "bits_fc"):
            value = getattr(self, name)
            set_(self, name, None if value is None else check_bits(value, name))
        set_(self, "bits_by_pattern", pattern_values(self.bits_by_pattern, "bits_by_pattern", check_bits))
        set_(self, "init", enum_value(CentroidInit, self.init, "centroid init"))
        set_(self, "gradient", enum_value(GradientMode, self.gradient, "gradient mode"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ConfigError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        set_(self, "include", None if self.include is None else as_patterns(self.include, "include"))
        set_(self, "exclude", as_patterns(self.exclude, "exclude"))
        set_(self, "kinds", None if self.kinds is None else as_kinds(self.kinds))
        set_(self, "bits_by_kind", kind_pairs(self.bits_by_kind, "bits_by_kind", check_bits))


def bits_for(ref: WeightRef, config: QuantizeConfig) -> int:
    """Bits for one weight: first matching ``bits_by_pattern`` glob, else ``bits_by_kind``, else
    ``bits_conv``/``bits_fc`` by kind when set, else ``bits``."""
    bits = first_match(ref.fqn, config.bits_by_pattern)
    if bits is not None:
        return bits
    kind_bits = by_kind(ref.kind, config.bits_by_kind)
    if kind_bits is None:
        kind_bits = {"conv": config.bits_conv, "fc": config.bits_fc}.get(ref.kind)
    return config.bits if kind_bits is None else kind_bits


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    init: str = "linear",
    seed: int = 0,
    max_iter: int = 100,
    *,
    method: str = "kmeans",
    lam: float = 0.0,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the non-zero entries of ``weight`` to at most ``2**bits`` shared non-zero values.

    Zeros stay at index 0 (pruned). With the rate-aware methods, non-zero weights that the
    rate-distortion assignment sends to the zero level join them: they are pruned from here on.

    Args:
        method: a ``QuantizeMethod`` value ("kmeans", "ecsq", "uniform", "dq").
        lam: rate weight of the rate-aware methods (see ``ecsq_1d``).
        importance: per-weight h_i shaped like ``weight`` (e.g. from ``fisher_diagonal``); None = 1.

    Returns:
        (centroids, indices): float32 centroids of shape (K,), K <= 2**bits (fewer when there are fewer
        distinct non-zero values or levels dropped out; 0 for an all-zero weight), and integer indices
        shaped like ``weight``: 0 = zero (pruned), 1..K elsewhere. Both on ``weight``'s device. A
        centroid that lands exactly on 0 is dropped and its weights get index 0: they are pruned
        (``parametrizations.fold_zero_centroids``).

    Raises:
        ConfigError: bits outside 1..16, NaN/inf entries, unknown init or method, bad lam or importance.
    """
    bits = check_bits(bits)
    method = QuantizeMethod(enum_value(QuantizeMethod, method, "quantization method"))
    flat = weight.detach().reshape(-1).to("cpu", torch.float32)
    keep = flat != 0
    values = flat[keep].numpy()
    h = None
    if importance is not None:
        if tuple(importance.shape) != tuple(weight.shape):
            raise ConfigError(f"importance has shape {tuple(importance.shape)}, the weight {tuple(weight.shape)}")
        h = importance.detach().reshape(-1).to("cpu", torch.float64)[keep].numpy()
    zeros = int(flat.numel() - values.size)
    if values.size == 0:
        levels, labels = np.zeros(0), np.zeros(0, dtype=np.intp)
    elif method is QuantizeMethod.KMEANS:
        levels, labels = kmeans_1d(values, 2**bits, init, seed=seed, max_iter=max_iter)
    elif method is QuantizeMethod.ECSQ:
        levels, labels = ecsq_1d(values, 2**bits, lam, h, init=init, iters=max_iter, seed=seed, zeros=zeros)
    elif method is QuantizeMethod.DQ:
        # the trellis runs over the whole tensor in scan order (pruned zeros included: the state machine
        # moves through them); the codebook is every grid level between the extremes in index order, so
        # that a weight's index gives back its level j and the coder can follow the state machine
        full_h = None if importance is None else importance.detach().reshape(-1).to("cpu", torch.float64).numpy()
        step, j = dependent_1d(flat.numpy(), max(2, 2**bits - 2), lam, full_h, row_length=row_length_of(weight.shape),
                               iters=min(max_iter, 4))
        grid = np.arange(int(j.min()), int(j.max()) + 1)
        levels = grid * step
        labels = (j - grid[0])[keep.numpy()]
    else:
        # 2^bits - 2 non-zero levels (+-L): with the zero level, indices still fit in ``bits`` bits
        step, q = uniform_1d(values, max(2, 2**bits - 2), lam, h, iters=max_iter, zeros=zeros)
        ints, labels = np.unique(q, return_inverse=True)
        levels = ints * step
    # levels exactly 0.0 (the zero level) become index 0; the others 1..K in sorted order
    nonzero_level = levels != 0 if method is not QuantizeMethod.KMEANS else np.ones(levels.size, dtype=bool)
    renumber = np.where(nonzero_level, np.cumsum(nonzero_level), 0)
    centroids = torch.from_numpy(levels[nonzero_level]).float()
    indices = torch.zeros(flat.numel(), dtype=index_dtype(centroids.numel()))
    indices[keep] = torch.from_numpy(renumber[np.asarray(labels, dtype=np.intp)]).to(indices.dtype)
    centroids, indices = fold_zero_centroids(centroids, indices)
    return centroids.to(weight.device), indices.view(weight.shape).to(weight.device)


def fisher_diagonal(
    model: nn.Module,
    data,
    *,
    batches: int = 32,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    kinds: tuple[str, ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher estimate per selected weight: mean squared minibatch gradient of the loss.

    The importance h_i of Hessian-weighted quantization (Choi et al. 2017, Sec. 3.3): the squared
    gradient approximates the loss's second derivative at a trained minimum. Gradients are those of the
    effective weight (a pruned entry's is reported but never used: quantizing keeps it at zero). The
    model runs in eval mode (BatchNorm statistics untouched) and is left unchanged.

    Args:
        data: an ``ImageData`` (a training split: the test split never chooses anything).
        batches: minibatches averaged (drawn in a seeded shuffled order).

    Returns:
        ``{fqn: float32 tensor shaped like the weight}`` on the CPU.
    """
    import torch.nn.functional as F

    from .data import Batches

    if isinstance(batches, bool) or not isinstance(batches, numbers.Integral) or batches < 1:
        raise ConfigError(f"batches must be an integer >= 1, got {batches!r}")
    device = torch.device(device)
    refs = select_weights(model, include, exclude, kinds)
    tensors = {}
    for ref in refs:
        module, name = resolve(model, ref.fqn)
        # the stored tensor: a masked weight's gradient reaches its original through the mask
        tensors[ref.fqn] = (module.parametrizations[name].original if parametrize.is_parametrized(module, name)
                            else getattr(module, name))
    was_training = model.training
    model.to(device).eval()
    sums = {fqn: torch.zeros_like(t, dtype=torch.float32) for fqn, t in tensors.items()}
    flags = {fqn: t.requires_grad for fqn, t in tensors.items()}
    count = 0
    try:
        for t in tensors.values():
            t.requires_grad_(True)
        for x, y in Batches(data, batch_size, shuffle=True, device=device, seed=seed):
            loss = F.cross_entropy(model(x).float(), y)
            grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
            for fqn, g in zip(tensors, grads):
                if g is not None:
                    sums[fqn] += g.float().square()
            count += 1
            if count == batches:
                break
    finally:
        for fqn, t in tensors.items():
            t.requires_grad_(flags[fqn])
        model.train(was_training)
    return {fqn: (s / max(count, 1)).cpu() for fqn, s in sums.items()}


def _layer_seed(seed: int, fqn: str) -> int:
    # from the name, not the position: adding a layer to the selection does not reseed the others
    return (seed + zlib.crc32(fqn.encode())) % 2**32


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig = QuantizeConfig(),
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict]:
    """Share weights in every selected layer: k-means (or ECSQ, or a uniform grid) on its non-zero
    *effective* entries.

    A layer's ``Masked`` mask is baked in first, so its zeros form the pruned set (index 0);
    ``SharedWeights`` is attached instead and the stored original is frozen (``requires_grad=False``):
    train the centroids with a fresh optimizer. All layers are clustered before any is changed, so an
    error leaves the model as it was.

    With "ecsq"/"uniform", weights sent to the zero level become pruned (index 0), exactly as
    pruned weights: they stay zero through any training.

    Args:
        importance: ``{fqn: h}`` per-weight importances (``fisher_diagonal``); required when
            ``config.hessian``, refused otherwise.

    Returns:
        ``{fqn: {"bits", "num_centroids", "mse", "nonzero", "numel", "zeroed"}}`` in module order; mse
        is the mean squared quantization error over the weights that were non-zero before, zeroed
        the number of them the quantizer sent to zero.

    Raises:
        ConfigError: a selected weight is already quantized, carries a foreign parametrization or holds
        NaN/inf, a bits setting is out of range, a pattern matches nothing, importances are missing
        for ``hessian=True`` (or given without it) or do not fit a weight.
    """
    if config.hessian and importance is None:
        raise ConfigError("hessian=True needs importances: pass importance=fisher_diagonal(model, train_data)")
    if importance is not None and not config.hessian:
        raise ConfigError("importances were given but hessian=False; set hessian=True to use them")
    refs = select_weights(model, config.include, config.exclude, config.kinds,
                          min_dims=config.min_dims, min_numel=config.min_numel)
    fqns = [r.fqn for r in refs]
    check_patterns_match(config.bits_by_pattern, fqns, "bits_by_pattern")
    if not refs:
        logger.warning("quantize_model: the model has no weights of kinds %s", list(config.kinds or ("any",)))
        return {}

    plans = []
    for ref in refs:
        module, name = resolve(model, ref.fqn)
        shared = shared_weights_of(module, name)
        if shared is not None:
            raise ConfigError(f"{ref.fqn} is already quantized ({shared.bits} bits); strip() the model to re-quantize")
        if parametrize.is_parametrized(module, name):
            # only masks get baked in
            foreign = [type(p).__name__ for p in module.parametrizations[name] if not isinstance(p, Masked)]
            if foreign:
                raise ConfigError(f"{ref.fqn} carries parametrizations deepshrink did not attach "
                                  f"({', '.join(foreign)}); remove them first")
        bits = bits_for(ref, config)
        with torch.no_grad():
            weight = getattr(module, name).detach()
        if not weight.is_floating_point():
            raise ConfigError(f"{ref.fqn}: expected a floating-point weight, got {weight.dtype}")
        h = None
        if importance is not None:
            if ref.fqn not in importance:
                raise ConfigError(f"{ref.fqn}: no importance given for this weight")
            h = importance[ref.fqn]
        try:
            seed = _layer_seed(config.seed, ref.fqn)
            centroids, indices = quantize_weight(weight, bits, config.init, seed, config.max_iter,
                                                 method=config.method, lam=config.lam, importance=h)
        except ConfigError as e:
            raise ConfigError(f"{ref.fqn}: {e}") from None
        nonzero = indices != 0
        was_nonzero = weight != 0
        with torch.no_grad():
            codebook = torch.cat([centroids.new_zeros(1), centroids]).double()
            err = codebook[indices.long()][was_nonzero] - weight.double()[was_nonzero]
            mse = float(err.square().mean()) if err.numel() else 0.0
        info = {"bits": bits, "num_centroids": centroids.numel(), "mse": mse,
                "nonzero": int(nonzero.sum()), "numel": weight.numel(),
                "zeroed": int((was_nonzero & ~nonzero).sum())}
        plans.append((ref.fqn, module, name, centroids, indices, info))

    layers = {}
    for fqn, module, name, centroids, indices, info in plans:
        if parametrize.is_parametrized(module, name):
            # leave_parametrized: the Parameter object stays, now holding the masked values
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        shared = SharedWeights(centroids, indices, info["bits"], config.gradient)
        parametrize.register_parametrization(module, name, shared)
        module.parametrizations[name].original.requires_grad_(False)
        layers[fqn] = info
        logger.debug("quantized %s: %d centroids (%d bits), mse %.3g over %d non-zero weights",
                     fqn, info["num_centroids"], info["bits"], info["mse"], info["nonzero"])
    tie_parametrizations(model)
    logger.info("quantized %d weights (%s, %s init%s)", len(layers), config.method, config.init,
                f", lambda {config.lam:g}" if config.method != QuantizeMethod.KMEANS.value else "")
    return layers


def codebooks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``{fqn: (centroids, indices, bits)}`` of every quantized weight (centroids detached, not copied)."""
    out = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in module.parametrizations.keys():
            shared = shared_weights_of(module, name)
            if shared is not None:
                fqn = f"{module_name}.{name}" if module_name else name
                out[fqn] = (shared.centroids.detach(), shared.indices, shared.bits)
    return out
