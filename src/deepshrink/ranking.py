"""Stage 1's exact selection: the k smallest magnitudes over several weights, a chunk at a time.

``smallest_magnitudes`` finds the k-th smallest |score| by a most-significant-digit radix select over
the magnitudes' float bit patterns (which sort as integers), then marks everything below it and the
first entries equal to it (ties by weight order, then flat index). No concatenated copy of the weights
is made, and every pass goes ``CHUNK`` elements at a time, so its temporaries stay a few chunks. CPU
float32 chunks go through numba kernels that read the bits in place (no temporaries at all) on every
core; anything else (GPU tensors, float64 scores) through the same steps in torch.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .parallel import map_in_order

#: Elements ranked or checked at a time: the temporaries of a large layer stay a few of these
CHUNK = 1 << 22
_DIGIT = 16  # radix-select digit width: 2**16 histogram bins per pass, 2 passes for float32 magnitudes
_NO_MASK = np.zeros(0, dtype=np.bool_)


def flat_chunks(t: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``t`` flattened, ``CHUNK`` elements each (a copy only where ``t`` is not contiguous)."""
    flat = t.reshape(-1)
    return [flat[start:start + CHUNK] for start in range(0, flat.numel(), CHUNK)]


def _fast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().view(np.uint32)


def _mask(m: torch.Tensor | None) -> np.ndarray:
    return _NO_MASK if m is None else m.cpu().numpy()


def count_nonfinite(t: torch.Tensor, alive: torch.Tensor | None = None) -> int:
    """NaN/inf entries of ``t`` where ``alive`` (all when None), counted a chunk at a time."""
    if not t.is_floating_point():
        return 0
    masks = [None] * len(flat_chunks(t)) if alive is None else flat_chunks(alive)

    def count(pair) -> int:
        values, mask = pair
        if _fast(values):
            return int(_nonfinite(_bits(values), _mask(mask)))
        nonfinite = ~torch.isfinite(values)
        return int(torch.count_nonzero(nonfinite if mask is None else nonfinite & mask))

    return sum(map_in_order(count, zip(flat_chunks(t), masks)))


def _magnitude_keys(scores: torch.Tensor, key_dtype: torch.dtype) -> torch.Tensor:
    """Flat integer keys ordered like ``|scores|``: bit patterns of non-negative floats sort as integers."""
    float_dtype = torch.float64 if key_dtype == torch.int64 else torch.float32
    return scores.abs().reshape(-1).to(float_dtype).view(key_dtype)  # abs clears the sign bit of -0.0


def smallest_magnitudes(ranked: list[tuple[torch.Tensor, torch.Tensor | None]], k: int) -> list[torch.Tensor]:
    """Bool masks marking the ``k`` smallest magnitudes among kept entries (``(scores, keep mask or None)``
    per weight; NaN/inf scores not expected where kept), ties by (weight, flat index)."""
    prune = [torch.zeros(sc.shape, dtype=torch.bool, device=sc.device) for sc, _ in ranked]
    if k <= 0:
        return prune
    # float64 keys only when some input needs them; float16/bfloat16/int widen exactly to float32
    key_dtype = torch.int64 if any(sc.dtype == torch.float64 for sc, _ in ranked) else torch.int32
    kept_count = sum(sc.numel() if m is None else int(torch.count_nonzero(m)) for sc, m in ranked)
    if k >= kept_count:
        return [torch.ones_like(p) if m is None else m.clone() for p, (_, m) in zip(prune, ranked)]
    # (scores, mask or None, the output's view) of each chunk, in (weight, index) order
    chunks = [(sc_part, m_part, out_part) for (sc, m), out in zip(ranked, prune)
              for sc_part, m_part, out_part in zip(flat_chunks(sc), flat_chunks(m) if m is not None else
                                                   [None] * len(flat_chunks(sc)), flat_chunks(out))]
    nbits = 32 if key_dtype == torch.int32 else 64
    threshold = _kth_smallest_key(chunks, k, nbits, key_dtype)

    def below(chunk) -> int:
        sc, m, out = chunk
        if _fast(sc) and nbits == 32:
            return int(_mark_below(_bits(sc), _mask(m), threshold, out.numpy()))
        marked = _magnitude_keys(sc, key_dtype) < threshold
        if m is not None:
            marked &= m
        out.copy_(marked)
        return int(torch.count_nonzero(marked))

    remaining = k - sum(map_in_order(below, chunks))
    for sc, m, out in chunks:  # the threshold value itself: first entries by (weight, index)
        if remaining == 0:
            break
        if _fast(sc) and nbits == 32:
            remaining -= int(_mark_equal(_bits(sc), _mask(m), threshold, out.numpy(), remaining))
            continue
        at = _magnitude_keys(sc, key_dtype) == threshold
        if m is not None:
            at &= m
        idx = at.nonzero().reshape(-1)[:remaining]
        out[idx] = True
        remaining -= idx.numel()
    return prune


def _kth_smallest_key(chunks: list, k: int, nbits: int, key_dtype: torch.dtype) -> int:
    """Exact k-th smallest (1-based) non-negative integer key across chunks, by most-significant-digit
    radix select: each pass histograms one 16-bit digit of the keys that share the prefix found so far."""
    prefix = 0
    for shift in range(nbits - _DIGIT, -1, -_DIGIT):
        prefix_shift = shift + _DIGIT  # == nbits: no prefix yet

        def histogram(chunk, shift=shift, prefix_shift=prefix_shift, prefix=prefix) -> torch.Tensor:
            sc, m, _ = chunk
            if _fast(sc) and nbits == 32:
                counts = np.zeros(1 << _DIGIT, dtype=np.int64)
                _digit_histogram(_bits(sc), _mask(m), shift, prefix_shift, prefix, counts)
                return torch.from_numpy(counts)
            keys = _magnitude_keys(sc, key_dtype)
            if m is not None:
                keys = keys[m]
            if prefix_shift < nbits:
                keys = keys[(keys >> prefix_shift) == prefix]
            return torch.bincount((keys >> shift) & (2**_DIGIT - 1), minlength=2**_DIGIT).cpu()

        counts = sum(map_in_order(histogram, chunks))
        cumulative = counts.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor([k]))[0])
        k -= int(cumulative[digit - 1]) if digit > 0 else 0
        prefix = (prefix << _DIGIT) | digit
    return prefix


# ---------------------------------------------------------------- kernels on float32 bits, in place

_MAGNITUDE = np.uint32(0x7FFFFFFF)  # the bits of |x|: a float32 without its sign bit
_EXPONENT = np.uint32(0x7F800000)  # all ones: inf or NaN


@numba.njit(cache=True, nogil=True)
def _nonfinite(bits, mask):
    use_mask = mask.shape[0] > 0
    count = 0
    for i in range(bits.shape[0]):
        if (bits[i] & _EXPONENT) == _EXPONENT and (not use_mask or mask[i]):
            count += 1
    return count


@numba.njit(cache=True, nogil=True)
def _digit_histogram(bits, mask, shift, prefix_shift, prefix, counts):
    """counts[(key >> shift) & 0xFFFF] over the kept keys whose ``key >> prefix_shift`` is ``prefix``."""
    use_mask = mask.shape[0] > 0
    for i in range(bits.shape[0]):
        if use_mask and not mask[i]:
            continue
        key = np.int64(bits[i] & _MAGNITUDE)
        if prefix_shift < 32 and (key >> prefix_shift) != prefix:
            continue
        counts[(key >> shift) & 0xFFFF] += 1


@numba.njit(cache=True, nogil=True)
def _mark_below(bits, mask, threshold, out):
    use_mask = mask.shape[0] > 0
    count = 0
    for i in range(bits.shape[0]):
        marked = np.int64(bits[i] & _MAGNITUDE) < threshold and (not use_mask or mask[i])
        out[i] = marked
        count += marked
    return count


@numba.njit(cache=True, nogil=True)
def _mark_equal(bits, mask, threshold, out, limit):
    use_mask = mask.shape[0] > 0
    count = 0
    for i in range(bits.shape[0]):
        if count == limit:
            break
        if np.int64(bits[i] & _MAGNITUDE) == threshold and (not use_mask or mask[i]):
            out[i] = True
            count += 1
    return count

