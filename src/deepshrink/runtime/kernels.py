"""The sparse runtime's functional core: a quantized weight as CSR codebook indices (``CsrCodebook``),
and the products that run on it without densifying (numba kernels over row ranges, on threads).

``"codebook"`` form: per non-zero a 1-byte cluster index (uint8 up to 256 centroids) and a 2-byte column
(uint16 up to 65,536 columns, else uint32), plus one row pointer per output. Batch-1 inference is
bound by memory traffic, and this form moves 3 bytes per kept weight against the dense layer's 4 bytes
per weight, kept or not. ``torch_csr`` builds the ``torch.sparse_csr_tensor`` form (float32 values,
int32 indices), the one used for unquantized weights and on CUDA.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import torch


#: ``CsrCodebook`` pads its index arrays to a multiple of this many entries: one uint64 word of uint8
#: codes, two of uint16 columns
PACK = 8


# ---------------------------------------------------------------- the compressed form (functional core)


@dataclass(frozen=True)
class CsrCodebook:
    """A quantized weight as a CSR matrix of codebook indices: never dense.

    The weight of shape ``shape`` is viewed as ``rows = shape[0]`` by ``cols = prod(shape[1:])``.
    Row ``r``'s non-zeros sit at ``crow[r]:crow[r+1]``: column ``col[j]``, value ``codebook[codes[j]]``.
    ``col`` and ``codes`` are zero-padded past ``nnz = crow[-1]`` to a multiple of ``PACK`` entries, so
    that the kernel can read them as whole uint64 words.
    """

    shape: tuple[int, ...]
    crow: np.ndarray  # (rows + 1,) uint64
    col: np.ndarray  # (nnz + padding,) uint16 when cols <= 65536, else uint32
    codes: np.ndarray  # (nnz + padding,) uint8 when <= 256 centroids, else uint16 (at most 2**16, see config.MAX_BITS)
    codebook: np.ndarray  # (K,) float32

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def nnz(self) -> int:
        return int(self.crow[-1])

    @property
    def nbytes(self) -> int:
        return self.crow.nbytes + self.col.nbytes + self.codes.nbytes + self.codebook.nbytes

    def values(self) -> np.ndarray:
        """(nnz,) float32 weight values: ``codebook[codes]``."""
        return self.codebook[self.codes[: self.nnz]]

    def dense(self) -> torch.Tensor:
        """The dense float32 weight, exactly as ``format`` decodes it."""
        out = np.zeros(self.rows * self.cols, dtype=np.float32)
        rows = np.repeat(np.arange(self.rows, dtype=np.int64), np.diff(self.crow.astype(np.int64)))
        out[rows * self.cols + self.col[: self.nnz].astype(np.int64)] = self.values()
        return torch.from_numpy(out.reshape(self.shape))


def csr_from_positions(shape: Sequence[int], positions: np.ndarray, symbols: np.ndarray,
                       codebook: np.ndarray) -> CsrCodebook:
    """The CSR form of a weight given the flat C-order positions of its non-zeros and their symbols.

    Args:
        shape: the weight's shape (at least 1-D).
        positions: (nnz,) strictly increasing flat positions, all < prod(shape).
        symbols: (nnz,) cluster symbols, ``codebook[symbol]`` is the weight.
        codebook: (K,) centroid values (stored float32 or float16; held as float32).
    """
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if shape else 1
    positions = np.asarray(positions, dtype=np.int64)
    row_of = positions // max(cols, 1)
    crow = np.zeros(rows + 1, dtype=np.uint64)
    crow[1:] = np.cumsum(np.bincount(row_of, minlength=rows))
    padded = -(-len(positions) // PACK) * PACK
    col = np.zeros(padded, dtype=np.uint16 if cols <= 1 << 16 else np.uint32)
    col[: len(positions)] = positions - row_of * cols
    codes = np.zeros(padded, dtype=np.uint8 if len(codebook) <= 256 else np.uint16)
    codes[: len(positions)] = symbols
    return CsrCodebook(shape, crow, col, codes, np.asarray(codebook, dtype=np.float32).copy())


# ---------------------------------------------------------------- kernels


# Every index is unsigned (uint64 row pointers, uint8/16/32 columns and codes): numba wraps negative
# signed indices around (a compare and select per access), which made these loops five times slower.
_ONE, _TWO, _THREE, _FOUR = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)


@numba.njit(cache=True, nogil=True)
def _codebook_matvec(crow, col, codes, codebook, bias, x, out, row_begin, row_end):  # pragma: no cover
    for row in range(row_begin, row_end):
        # four accumulators: one would chain every add on the previous one's latency
        a0 = a1 = a2 = a3 = np.float32(0.0)
        j, end = crow[row], crow[row + 1]
        while j + _FOUR <= end:
            a0 += codebook[codes[j]] * x[col[j]]
            a1 += codebook[codes[j + _ONE]] * x[col[j + _ONE]]
            a2 += codebook[codes[j + _TWO]] * x[col[j + _TWO]]
            a3 += codebook[codes[j + _THREE]] * x[col[j + _THREE]]
            j += _FOUR
        while j < end:
            a0 += codebook[codes[j]] * x[col[j]]
            j += _ONE
        out[row] = ((a0 + a1) + (a2 + a3)) + (bias[row] if len(bias) else np.float32(0.0))


_M8, _M16 = np.uint64(0xFF), np.uint64(0xFFFF)
_SHIFTS = tuple(np.uint64(s) for s in range(0, 64, 8))  # bit offsets of the bytes of a word
_PACK = np.uint64(PACK)


@numba.njit(cache=True, nogil=True)
def _codebook_matvec_packed(crow, col, codes, col_words, code_words, codebook, bias, x, out, row_begin,
                            row_end):  # pragma: no cover
    """``_codebook_matvec`` for uint16 columns and uint8 codes, reading them 8 at a time as uint64 words
    (one load for 8 codes, one per 4 columns) and splitting the words by shifts: a load per index was
    the bottleneck (Zen 3: 1.2-1.5x faster on AlexNet's layers; hardware gathers were slower still)."""
    s0, s1, s2, s3, s4, s5, s6, s7 = _SHIFTS
    for row in range(row_begin, row_end):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        j, end = crow[row], crow[row + 1]
        aligned = min(end, (j + _PACK - _ONE) // _PACK * _PACK)
        while j < aligned:  # up to 7 entries before the row's first whole word
            a0 += codebook[codes[j]] * x[col[j]]
            j += _ONE
        last = end // _PACK
        for w in range(j // _PACK, last):
            k = code_words[w]
            c = col_words[w * _TWO]
            a0 += codebook[(k >> s0) & _M8] * x[(c >> s0) & _M16]
            a1 += codebook[(k >> s1) & _M8] * x[(c >> s2) & _M16]
            a2 += codebook[(k >> s2) & _M8] * x[(c >> s4) & _M16]
            a3 += codebook[(k >> s3) & _M8] * x[c >> s6]
            c = col_words[w * _TWO + _ONE]
            a0 += codebook[(k >> s4) & _M8] * x[(c >> s0) & _M16]
            a1 += codebook[(k >> s5) & _M8] * x[(c >> s2) & _M16]
            a2 += codebook[(k >> s6) & _M8] * x[(c >> s4) & _M16]
            a3 += codebook[k >> s7] * x[c >> s6]
        j = max(j, last * _PACK)
        while j < end:  # and after its last
            a0 += codebook[codes[j]] * x[col[j]]
            j += _ONE
        out[row] = ((a0 + a1) + (a2 + a3)) + (bias[row] if len(bias) else np.float32(0.0))


@numba.njit(cache=True, nogil=True)
def _codebook_matmat(crow, col, codes, codebook, bias, xt, out, row_begin, row_end):  # pragma: no cover
    # xt: (cols, B), so each kept weight scales one contiguous row of the input
    batch = xt.shape[1]
    acc = np.empty(batch, dtype=np.float32)
    for row in range(row_begin, row_end):
        acc[:] = 0.0
        j, end = crow[row], crow[row + 1]
        while j < end:
            v = codebook[codes[j]]
            xrow = xt[col[j]]
            for b in range(batch):
                acc[b] += v * xrow[b]
            j += _ONE
        b0 = bias[row] if len(bias) else np.float32(0.0)
        for b in range(batch):
            out[row, b] = acc[b] + b0


#: Below this many multiply-adds a product runs on the calling thread alone: handing work to another
#: thread costs tens of microseconds.
PARALLEL_MIN_WORK = 1 << 17

# Threads: the kernels release the GIL, and the rows are cut into chunks of equal non-zeros that
# the calling thread and pool threads take in turn. The caller never waits for a thread that has not
# started: on a busy machine a pool thread may get no CPU for a whole time slice, and the caller then
# does the work itself. (numba's own parallel loops were ten times slower here: its OpenMP layer next
# to torch's took ~25 ms a call on a busy 2-core machine, and its workqueue layer cannot be called
# from two threads at once.)
CHUNKS_PER_THREAD = 4
_pool: tuple[ThreadPoolExecutor, int] | None = None  # the pool and its worker count


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[1] < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepshrink-runtime"), workers
    return _pool[0]


def row_splits(crow: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Up to ``parts`` row ranges [a, b) holding about equal numbers of non-zeros."""
    targets = np.linspace(0, int(crow[-1]), parts + 1)[1:-1]
    cuts = [0, *np.searchsorted(crow, targets.astype(np.uint64)).tolist(), len(crow) - 1]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _run_rows(kernel: Callable, args: tuple, crow: np.ndarray, threads: int) -> None:
    rows = len(crow) - 1
    chunks = row_splits(crow, threads * CHUNKS_PER_THREAD) if threads > 1 else []
    if len(chunks) <= 1:
        kernel(*args, 0, rows)
        return
    lock = threading.Lock()
    queue = iter(chunks)
    taken: list[threading.Event] = []

    def work() -> None:
        while True:
            with lock:
                chunk = next(queue, None)
                if chunk is None:
                    return
                done = threading.Event()
                taken.append(done)
            try:
                kernel(*args, *chunk)
            finally:
                done.set()

    pool = _executor(threads - 1)
    for _ in range(threads - 1):
        pool.submit(work)
    work()
    for done in taken:  # only chunks some thread has started: all are running or finished
        done.wait()


def codebook_matmul(form: CsrCodebook, xt: torch.Tensor, bias: torch.Tensor | None = None,
                    max_threads: int | None = None) -> torch.Tensor:
    """``W @ xt (+ bias[:, None])`` for W in CSR-codebook form; xt (cols, B) float32 on CPU -> (rows, B).

    Runs on ``torch.get_num_threads()`` threads (at most ``max_threads``), one for small products.
    """
    xt = xt.detach().to(torch.float32).contiguous()
    b = bias.detach().numpy() if bias is not None else np.zeros(0, dtype=np.float32)
    batch = xt.shape[1]
    out = np.empty((form.rows, batch), dtype=np.float32)
    indices = (form.col, form.codes)
    if batch == 1:  # contiguous 1-D views: numba compiles faster code for C-contiguous arrays
        kernel, x, y = _codebook_matvec, xt.numpy().reshape(-1), out.reshape(-1)
        if form.col.dtype == np.uint16 and form.codes.dtype == np.uint8:
            kernel, indices = _codebook_matvec_packed, (*indices, form.col.view(np.uint64), form.codes.view(np.uint64))
    else:
        kernel, x, y = _codebook_matmat, xt.numpy(), out
    threads = torch.get_num_threads() if form.nnz * batch >= PARALLEL_MIN_WORK else 1
    threads = min(threads, max_threads or threads)
    _run_rows(kernel, (form.crow, *indices, form.codebook, b, x, y), form.crow, threads)
    return torch.from_numpy(out)


def torch_csr(shape2d: tuple[int, int], crow: np.ndarray, col: np.ndarray, values: np.ndarray,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A ``torch.sparse_csr_tensor`` (int32 indices when they fit, float32 values) on ``device``."""
    index = np.int32 if max(len(values), shape2d[1]) < np.iinfo(np.int32).max else np.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(np.asarray(crow).astype(index)), torch.from_numpy(np.asarray(col).astype(index)),
            torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)), size=shape2d,
            check_invariants=False,  # built from positions the loader has checked: valid by construction
        ).to(device)


def dense_csr_parts(weight2d: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    csr = weight2d.detach().cpu().to(torch.float32).to_sparse_csr()
    return csr.crow_indices().numpy(), csr.col_indices().numpy(), csr.values().numpy()
