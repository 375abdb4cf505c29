"""Stage 3's clustering core: exact 1-D k-means on plain numpy arrays (the paper's weight sharing).

``kmeans_1d`` runs Lloyd's iterations on the sorted values: with prefix sums, one iteration costs
O(k log n) (k-1 binary searches for the boundaries between clusters, then k segment means), not the
O(nk) of a general k-means; ``init_centroids`` gives its starts (``CentroidInit``, Han et al. 2016,
Sec. 3.2). ``quantizers.py`` builds the rate-aware quantizers on it; ``quantize.py`` applies them to a
model's weights.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from enum import Enum

import numpy as np

from .config import enum_value
from .errors import ConfigError


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


def check_values(values, what: str = "values") -> np.ndarray:
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


def check_k(k) -> int:
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


def sorted_float64(values: np.ndarray) -> np.ndarray:
    """``values`` sorted, as float64: sorted in their own dtype (float32 sorts ~2x faster), then widened
    (float32 -> float64 is exact). What ``kmeans_sorted`` takes; the native copy is freed at once."""
    return np.sort(values).astype(np.float64)


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
    values = check_values(values)
    k = check_k(k)
    method = CentroidInit(enum_value(CentroidInit, init, "centroid init"))
    return CENTROID_INITS[method](_SortedValues(sorted_float64(values)), k, np.random.default_rng(seed))


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
    values = check_values(values)
    centers, thresholds = kmeans_sorted(sorted_float64(values), k, init, seed=seed, max_iter=max_iter, tol=tol)
    return centers, kmeans_labels(values, thresholds)


def kmeans_sorted(
    x: np.ndarray,
    k: int,
    init: str = "linear",
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray]:
    """``kmeans_1d`` on values already sorted (``sorted_float64``): its centroids, and the thresholds that
    give each value its label (``kmeans_labels``), so that the values themselves need not be held
    while it runs (a large layer labels them in chunks afterwards).

    Raises:
        ConfigError: k < 1, unknown init, max_iter < 1, tol < 0 (the values are not checked again).
    """
    k = check_k(k)
    method = CentroidInit(enum_value(CentroidInit, init, "centroid init"))
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ConfigError(f"tol must be a number >= 0, got {tol!r}")

    sv = _SortedValues(x)
    # a strided sample with more than k distinct values settles it without a pass over all n
    if _distinct(x[:: max(1, sv.n // (4 * k))]).size <= k:
        distinct = _distinct(x)
        if distinct.size <= k:
            return distinct, distinct[:-1]

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
    return sv.means(bounds), x[bounds[1:-1] - 1]


def kmeans_labels(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Each value's cluster: the number of ``thresholds`` (``kmeans_sorted``'s) strictly below it (uint8
    for up to 128 thresholds, else intp)."""
    return _labels(values, thresholds)
