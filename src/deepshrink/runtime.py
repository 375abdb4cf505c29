"""Run a compressed model without densifying it: sparse, shared-weight inference (the paper's section 6).

``load(path, batch_size)`` reads a ``.dsz`` file into per-tensor compressed forms (``read_compressed``:
the file's streams are decoded, but a quantized weight never becomes a dense matrix), builds the
model, and replaces each pruned ``nn.Linear`` (and 1x1 ``nn.Conv2d``) by a layer that runs on one
of three kernels, chosen per layer by timing all of them once at load time on an input of the
requested batch size:

- ``"codebook"``: a numba kernel over the CSR form, gathering each weight from the codebook as it
  goes: per non-zero a 1-byte cluster index (uint8 up to 256 centroids) and a 2-byte column (uint16
  up to 65,536 columns, else uint32), plus one row pointer per output. Batch-1 inference is bound
  by memory traffic, and this form moves 3 bytes per kept weight against the dense layer's 4 bytes
  per weight, kept or not. Quantized weights only.
- ``"torch_csr"``: ``torch.sparse_csr_tensor`` with float32 values and int32 indices (8 bytes per
  non-zero); the only sparse kernel for pruned but unquantized (raw) weights, and the one used on CUDA.
- ``"dense"``: the plain ``nn.Linear`` with the decoded float32 weight: wins on small layers and
  large batches. Only a layer that runs dense ever holds a dense weight (timing it at load builds
  one transiently).

The choice, every candidate's median time and each form's resident bytes are in ``report(model)``
and logged. The replaced layers are for inference: their forward runs without autograd.

CUDA: ``device="cuda"`` measures ``torch_csr`` against dense on the GPU (written against the
documented ``torch.sparse`` API; our development machine has no GPU, so it is untested there).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from torch import nn

from .errors import ConfigError, DeepShrinkError, TensorInfoMismatch

log = logging.getLogger(__name__)

KERNELS = ("codebook", "torch_csr", "dense")
CPU_KERNELS = KERNELS
CUDA_KERNELS = ("torch_csr", "dense")  # numba's kernel is CPU code
DEFAULT_REPEATS = 15  # timed calls per candidate at load time (after one warm-up call); the median decides
#: A kernel this close to the fastest counts as fast: the smaller form wins (memory is what the file
#: saves; a 10% timing difference is within the noise of a shared machine).
CLOSE_ENOUGH = 1.10
#: Layers whose dense float32 weight is smaller than this stay dense without timing (when "dense" is a
#: candidate): the sparse layer's own Python work per call (~30 us) outweighs what a cache-resident
#: weight could save, and sub-0.1 ms timings on a shared machine are mostly noise.
MIN_SPARSE_BYTES = 1 << 18
ONE_THREAD = "codebook/1-thread"  # the codebook kernel capped at one thread, timed beside the default


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
        """The dense float32 weight, exactly as ``format.read_file`` decodes it."""
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


def read_compressed(path: str | os.PathLike, *, max_expansion: int | None = None
                    ) -> tuple[dict, dict[str, CsrCodebook | torch.Tensor]]:
    """Read a ``.dsz`` file with the safe loader's checks into compressed forms, densifying nothing.

    Returns:
        (header, tensors): quantized weights as ``CsrCodebook``, raw tensors as CPU tensors.

    Raises:
        every error of ``format.read_file``.
    """
    # The one place this module touches the file format: the loader's parse (every check before
    # any decoding), then each coded tensor decoded to cluster symbols and positions.
    from . import format as fmt
    from .codecs import codec_of

    parsed = fmt._parse(path, fmt.DEFAULT_MAX_EXPANSION if max_expansion is None else max_expansion)
    tensors: dict[str, CsrCodebook | torch.Tensor] = {}
    for name, encoded in fmt._encoded(parsed).items():
        at = f"{parsed.path}: tensor {name!r}"
        codec = codec_of(encoded, at)
        if not codec.weight:  # biases, statistics, grids: dense
            array = codec.decode(encoded, at)
            tensors[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))
            continue
        positions, symbols = codec.nonzeros(encoded, at)
        tensors[name] = csr_from_positions(encoded.shape, positions, symbols, encoded.codebook)
    return parsed.header, tensors


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
_pool: ThreadPoolExecutor | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepshrink-runtime")
    return _pool


def _row_splits(crow: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Up to ``parts`` row ranges [a, b) holding about equal numbers of non-zeros."""
    targets = np.linspace(0, int(crow[-1]), parts + 1)[1:-1]
    cuts = [0, *np.searchsorted(crow, targets.astype(np.uint64)).tolist(), len(crow) - 1]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _run_rows(kernel: Callable, args: tuple, crow: np.ndarray, threads: int) -> None:
    rows = len(crow) - 1
    chunks = _row_splits(crow, threads * CHUNKS_PER_THREAD) if threads > 1 else []
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


def _dense_csr_parts(weight2d: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    csr = weight2d.detach().cpu().to(torch.float32).to_sparse_csr()
    return csr.crow_indices().numpy(), csr.col_indices().numpy(), csr.values().numpy()


# ---------------------------------------------------------------- layers


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W held compressed (kernel "codebook" or "torch_csr"); inference only.

    With ``conv_stride`` set it is a 1x1 convolution (groups 1, no padding): every output pixel is
    a column of the product.
    """

    def __init__(self, in_features: int, out_features: int, kernel: str, *, form: CsrCodebook | None = None,
                 csr: torch.Tensor | None = None, bias: torch.Tensor | None = None, conv_stride: int | None = None,
                 max_threads: int | None = None):
        super().__init__()
        if kernel not in ("codebook", "torch_csr"):
            raise ConfigError(f"SparseLinear kernel must be 'codebook' or 'torch_csr', got {kernel!r}")
        if (kernel == "codebook") != (form is not None) or (kernel == "torch_csr") != (csr is not None):
            raise ConfigError(f"SparseLinear({kernel!r}): pass form= for 'codebook', csr= for 'torch_csr'")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.conv_stride = conv_stride
        self.max_threads = max_threads  # codebook kernel: None = torch.get_num_threads()
        self.form = form  # numpy arrays: the numba kernel's operands
        # non-persistent: the file, not a state dict, is this layer's storage
        self.register_buffer("csr", csr, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32), persistent=False)

    def extra_repr(self) -> str:
        nnz = self.form.nnz if self.form is not None else int(self.csr.values().numel())
        conv = f", conv 1x1 stride {self.conv_stride}" if self.conv_stride else ""
        threads = f", max_threads={self.max_threads}" if self.max_threads else ""
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, nnz={nnz}{conv}{threads}"

    def weight_bytes(self) -> int:
        """Bytes of every tensor this layer holds (the compressed weight and the bias)."""
        held = self.form.nbytes if self.form is not None else _tensor_bytes(self.csr)
        return held + (_tensor_bytes(self.bias) if self.bias is not None else 0)

    def product_t(self, xt: torch.Tensor) -> torch.Tensor:
        """(in, B) -> (out, B), bias added."""
        if self.kernel == "codebook":
            if xt.device.type != "cpu":
                raise ConfigError(f"the codebook kernel runs on the CPU, got input on {xt.device}; load with "
                                  "device='cuda' to run torch_csr there")
            return codebook_matmul(self.form, xt, self.bias, self.max_threads)
        y = self.csr @ xt.to(torch.float32)
        return y if self.bias is None else y + self.bias[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.conv_stride:
                return self._conv(x)
            lead = x.shape[:-1]
            xt = x.reshape(-1, self.in_features).t()  # (in, B); a transposed output of ours is contiguous here
            return self.product_t(xt).t().reshape(*lead, self.out_features)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_stride
        x = x[:, :, ::s, ::s]
        n, c, h, w = x.shape
        xt = x.permute(1, 0, 2, 3).reshape(c, n * h * w)
        return self.product_t(xt).reshape(self.out_features, n, h, w).permute(1, 0, 2, 3)


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        return sum(_tensor_bytes(p) for p in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every tensor a model holds: parameters, buffers, compressed forms."""
    total = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total += module.weight_bytes()
            continue
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                total += _tensor_bytes(t)
    return total


# ---------------------------------------------------------------- choosing a kernel per layer


@dataclass
class LayerChoice:
    """What the runtime chose for one layer, and why (median milliseconds per candidate)."""

    name: str
    kind: str  # "linear" or "conv1x1"
    shape: tuple[int, ...]
    density: float  # kept fraction of the weight
    stored: str  # "quantized" or "raw"
    kernel: str
    max_threads: int | None = None  # the codebook kernel capped at one thread when that timed faster
    times_ms: dict[str, float] = field(default_factory=dict)  # per candidate (KERNELS, ONE_THREAD)
    bytes: dict[str, int] = field(default_factory=dict)  # resident weight bytes of each candidate

    @property
    def label(self) -> str:
        """The chosen candidate's key in ``times_ms``/``bytes``."""
        return ONE_THREAD if self.max_threads == 1 and self.kernel == "codebook" else self.kernel

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "density": self.density,
                "stored": self.stored, "kernel": self.kernel, "max_threads": self.max_threads,
                "times_ms": dict(self.times_ms), "bytes": dict(self.bytes)}


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | str = "cpu"
              ) -> dict[str, float]:
    """Median wall time in milliseconds of each ``fns[k]()`` over ``repeats`` calls, after one warm-up call.

    The functions are timed in turn within each repeat, so on a shared, noisy machine every
    candidate sees the same load; the median drops the calls that lost the CPU.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _eligible(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.padding in ((0, 0), "valid") and module.stride[0] == module.stride[1]):
        return "conv1x1"
    return None


def _candidates(module: nn.Module, kind: str, stored: CsrCodebook | torch.Tensor, bias: torch.Tensor | None,
                kernels: Sequence[str], device: torch.device) -> dict[str, Callable[[], nn.Module]]:
    """A builder per candidate layer: the requested kernels that can run this weight, else dense."""
    out_f = module.out_features if kind == "linear" else module.out_channels
    in_f = module.in_features if kind == "linear" else module.in_channels
    stride = module.stride[0] if kind == "conv1x1" else None
    bias_dev = None if bias is None else bias.to(device)
    builders: dict[str, Callable[[], nn.Module]] = {}
    quantized = isinstance(stored, CsrCodebook)

    def dense() -> nn.Module:
        weight = stored.dense() if quantized else stored
        layer = (nn.Linear(in_f, out_f, bias=bias is not None, device="meta") if kind == "linear" else
                 nn.Conv2d(in_f, out_f, 1, stride=stride, bias=bias is not None, device="meta"))
        layer.weight = nn.Parameter(weight.to(torch.float32).to(device).reshape(layer.weight.shape),
                                    requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias_dev.to(torch.float32), requires_grad=False)
        return layer

    def csr() -> nn.Module:
        if quantized:
            parts = (stored.crow, stored.col[: stored.nnz], stored.values())
        else:
            parts = _dense_csr_parts(stored.reshape(out_f, -1))
        return SparseLinear(in_f, out_f, "torch_csr", csr=torch_csr((out_f, in_f), *parts, device=device),
                            bias=bias_dev, conv_stride=stride)

    def codebook(max_threads: int | None = None) -> nn.Module:
        return SparseLinear(in_f, out_f, "codebook", form=stored, bias=bias, conv_stride=stride,
                            max_threads=max_threads)

    if not any(k == "torch_csr" or (k == "codebook" and quantized) for k in kernels):
        kernels = ("dense",)  # no requested kernel runs this layer (a raw weight asked to use the codebook)
    for kernel in kernels:
        if kernel == "dense":
            builders[kernel] = dense
        elif kernel == "torch_csr":
            builders[kernel] = csr
        elif kernel == "codebook" and quantized:
            builders[kernel] = codebook
            if torch.get_num_threads() > 1:
                # on a busy machine a second thread can cost more than it gives: time one thread too
                builders[ONE_THREAD] = lambda: codebook(max_threads=1)
    return builders


def _example_input(module: nn.Module, kind: str, batch_size: int, device: torch.device,
                   input_hw: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        return torch.randn(batch_size, module.in_features, generator=gen).to(device)
    return torch.randn(batch_size, module.in_channels, *input_hw, generator=gen).to(device)


def choose_layer(name: str, module: nn.Module, kind: str, stored: CsrCodebook | torch.Tensor,
                 bias: torch.Tensor | None, *, batch_size: int, kernels: Sequence[str], repeats: int,
                 device: torch.device, input_hw: tuple[int, int] = (8, 8),
                 min_sparse_bytes: int = MIN_SPARSE_BYTES) -> tuple[nn.Module, LayerChoice]:
    """Time every candidate kernel for one layer on a random input of ``batch_size``; keep the fastest.

    A layer whose dense weight is under ``min_sparse_bytes`` keeps only the dense candidate, if
    "dense" is among ``kernels``.

    With a single candidate nothing is timed. Of the candidates within ``CLOSE_ENOUGH`` of the
    fastest, the one holding the fewest bytes wins.
    """
    numel = math.prod(stored.shape)
    small = "dense" in kernels and 4 * numel < min_sparse_bytes
    builders = _candidates(module, kind, stored, bias, ("dense",) if small else kernels, device)
    quantized = isinstance(stored, CsrCodebook)
    nnz = stored.nnz if quantized else int(torch.count_nonzero(stored))
    choice = LayerChoice(name, kind, tuple(stored.shape), nnz / numel if numel else 0.0,
                         "quantized" if quantized else "raw", kernel="")
    layers = {label: build() for label, build in builders.items()}  # a dense candidate lives only until we return
    choice.bytes = {label: weight_bytes(layer) for label, layer in layers.items()}
    if len(layers) > 1:
        x = _example_input(module, kind, batch_size, device, input_hw)
        with torch.no_grad():
            choice.times_ms = median_ms({k: (lambda layer=layer: layer(x)) for k, layer in layers.items()},
                                        repeats, device)
        fastest = min(choice.times_ms.values())
        close = [k for k, ms in choice.times_ms.items() if ms <= CLOSE_ENOUGH * fastest]
        label = min(close, key=lambda k: (choice.bytes[k], choice.times_ms[k]))
    else:
        label = next(iter(layers))
    layer = layers[label]
    choice.kernel = layer.kernel if isinstance(layer, SparseLinear) else "dense"
    choice.max_threads = getattr(layer, "max_threads", None)
    return layer, choice


# ---------------------------------------------------------------- the entry point


def _check_kernels(kernels: Sequence[str] | None, device: torch.device) -> tuple[str, ...]:
    allowed = CUDA_KERNELS if device.type == "cuda" else CPU_KERNELS
    if kernels is None:
        return allowed
    if isinstance(kernels, str):
        kernels = (kernels,)
    kernels = tuple(kernels)
    bad = [k for k in kernels if k not in allowed]
    if bad or not kernels:
        raise ConfigError(f"unknown or unavailable kernel(s) {bad or kernels!r} on {device.type}; "
                          f"valid: {', '.join(allowed)}")
    return kernels


def _resolve(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _build_model(header: dict, path, model: nn.Module | None, trust_factory: bool) -> nn.Module:
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        return model
    spec = header["model"]
    if spec is None:
        raise ConfigError(f"{path}: the file has no model spec; pass the architecture as model=")
    from .models import build_model as build_untrusted

    def build_model(spec: dict) -> nn.Module:  # refuses a factory unless trusted, before importing it
        return build_untrusted(spec, trust_factory=trust_factory)

    try:
        with torch.device("meta"):  # no memory for weights the file replaces anyway
            built = build_model(spec)
    except DeepShrinkError:
        raise
    except Exception:
        built = None
    if built is None or set(dict(built.named_buffers())) - set(built.state_dict()):
        # a model that cannot be built on the meta device, or holds buffers no file stores: build it for real
        try:
            built = build_model(spec)
        except DeepShrinkError:
            raise
        except Exception as e:
            raise ConfigError(f"{path}: cannot build model {spec} ({type(e).__name__}: {e})") from None
    return built


def load(
    path: str | os.PathLike,
    batch_size: int = 1,
    *,
    model: nn.Module | None = None,
    kernels: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    repeats: int = DEFAULT_REPEATS,
    conv_input_hw: tuple[int, int] = (8, 8),
    min_sparse_bytes: int = MIN_SPARSE_BYTES,
    trust_factory: bool = False,
    max_expansion: int | None = None,
) -> nn.Module:
    """Build the file's model with its pruned layers running on compressed weights.

    Args:
        path: a ``.dsz`` file.
        batch_size: the batch size each layer's kernel is chosen for (1 = the latency case).
        model: the architecture to fill (any device, meta included); default: built from the file's spec.
        kernels: candidate kernels (names in ``KERNELS``), timed against each other per layer; default
            every one the device runs. A single name forces it wherever it applies; a layer none of
            them can run (a raw weight when only "codebook" is asked for) runs dense.
        device: "cpu" or a CUDA device.
        repeats: timed calls per candidate when choosing.
        conv_input_hw: spatial size of the random input used to time 1x1 convolutions.
        min_sparse_bytes: layers whose dense float32 weight is smaller stay dense untimed (when
            "dense" is a candidate); 0 times every layer.
        trust_factory, max_expansion: as for ``deepshrink.load``.

    Returns:
        the model in eval mode; ``report(model)`` lists each layer's choice.

    Raises:
        ConfigError: bad batch size, repeats, kernel name or device, or no architecture to build;
        TensorInfoMismatch: the file does not fit the model; the errors of ``read_compressed``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(min_sparse_bytes, bool) or not isinstance(min_sparse_bytes, int) or min_sparse_bytes < 0:
        raise ConfigError(f"min_sparse_bytes must be an integer >= 0, got {min_sparse_bytes!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested, but torch sees no CUDA device")
    kernels = _check_kernels(kernels, device)
    from .format import with_aliases

    header, stored = read_compressed(path, max_expansion=max_expansion)
    stored = with_aliases(header, stored, str(path))  # a tied tensor, stored once, under each of its names
    net = _build_model(header, path, model, trust_factory)
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise TensorInfoMismatch(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]} for the model")
    for name, t in expected.items():
        if tuple(t.shape) != tuple(stored[name].shape):
            raise TensorInfoMismatch(f"{path}: {name} has shape {tuple(stored[name].shape)} in the file, "
                                     f"the model expects {tuple(t.shape)}")

    choices: dict[str, LayerChoice] = {}
    for fqn, module in list(net.named_modules()):
        kind = _eligible(module)
        weight_name = f"{fqn}.weight" if fqn else "weight"
        if kind is None or weight_name not in stored:
            continue
        weight = stored[weight_name]
        if not isinstance(weight, CsrCodebook) and not weight.dtype.is_floating_point:
            continue
        bias_name = f"{fqn}.bias" if fqn else "bias"
        bias = stored.get(bias_name) if getattr(module, "bias", None) is not None else None
        layer, choice = choose_layer(fqn, module, kind, weight, bias, batch_size=batch_size, kernels=kernels,
                                     repeats=repeats, device=device, input_hw=conv_input_hw,
                                     min_sparse_bytes=min_sparse_bytes)
        choices[fqn] = choice
        log.info("%s: %s %s, %.1f%% kept -> %s (%s)", fqn, choice.stored, kind, 100 * choice.density, choice.label,
                 ", ".join(f"{k} {v:.3f} ms" for k, v in choice.times_ms.items()) or "not timed")
        if choice.kernel == "dense":
            continue  # the model's own layer stays; its weight is decoded with the other tensors below
        for key in (weight_name, bias_name):
            stored.pop(key, None)
        if fqn:
            parent, child = _resolve(net, fqn)
            setattr(parent, child, layer)
        else:
            net = layer
    # every other tensor: assign the file's (the model may be on the meta device)
    decoded: dict[int, torch.Tensor] = {}  # by object: tied names share one dense tensor

    def materialise(v) -> torch.Tensor:
        if id(v) not in decoded:
            decoded[id(v)] = (v if isinstance(v, torch.Tensor) else v.dense()).to(device)
        return decoded[id(v)]

    rest = {k: materialise(v) for k, v in stored.items()}
    try:
        net.load_state_dict(rest, strict=True, assign=True)
    except RuntimeError as e:
        raise TensorInfoMismatch(f"{path}: tensors do not fit the model: {e}") from None
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.deepshrink_runtime = RuntimeReport(str(path), batch_size, device.type, torch.get_num_threads(), choices)
    return net


@dataclass
class RuntimeReport:
    """What ``load`` chose for each eligible layer, for which batch size, threads and device."""

    path: str
    batch_size: int
    device: str
    threads: int
    layers: dict[str, LayerChoice]

    def to_dict(self) -> dict:
        return {"path": self.path, "batch_size": self.batch_size, "device": self.device, "threads": self.threads,
                "layers": {k: v.to_dict() for k, v in self.layers.items()}}


def report(model: nn.Module) -> RuntimeReport:
    """The per-layer choices of a model built by ``load``.

    Raises:
        ConfigError: the model was not built by ``deepshrink.runtime.load``.
    """
    found = getattr(model, "deepshrink_runtime", None)
    if not isinstance(found, RuntimeReport):
        raise ConfigError("this model was not built by deepshrink.runtime.load (no runtime report)")
    return found


# ---------------------------------------------------------------- measuring: dense vs sparse, same process


def _fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


#: Columns of ``benchmark``'s rows (layers, then the whole model) for ``report.render_table``.
BENCH_COLUMNS = [
    ("batch", "batch", None),
    ("layer", "layer", None),
    ("shape", "shape", None),
    ("density", "kept", lambda v: "-" if v is None else f"{100 * v:.1f}%"),
    ("dense_ms", "dense ms", _fmt_ms),
    ("codebook_ms", "codebook ms", _fmt_ms),  # the faster of all threads and one thread
    ("torch_csr_ms", "torch_csr ms", _fmt_ms),
    ("sparse_speedup", "best sparse speed-up", _fmt_x),
    ("kernel", "runtime runs", None),
    ("speedup", "speed-up", _fmt_x),
    ("dense_in_model_ms", "in model: dense ms", _fmt_ms),
    ("runtime_in_model_ms", "runtime ms", _fmt_ms),
    ("in_model_speedup", "speed-up", _fmt_x),
    ("dense_bytes", "dense MB", _fmt_mb),
    ("runtime_bytes", "runtime MB", _fmt_mb),
    ("memory_ratio", "memory ratio", lambda v: "-" if v is None else f"{v:.3f}"),
]


class _LayerClock:
    """Wall time of each named layer inside a model's forward (forward pre/post hooks)."""

    def __init__(self, model: nn.Module, names):
        self.times: dict[str, list[float]] = {name: [] for name in names}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._start))
            self.handles.append(module.register_forward_hook(lambda m, i, o, name=name: self._stop(name)))
        self._began = 0.0

    def _start(self, module, inputs) -> None:
        self._began = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.times[name].append(time.perf_counter() - self._began)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def median_ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.times[name][1:])  # the first call is the warm-up


def _kernel_counts(rep: RuntimeReport) -> str:
    counts: dict[str, int] = {}
    for c in rep.layers.values():
        counts[c.kernel] = counts.get(c.kernel, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "dense"


def benchmark(
    path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1,),
    *,
    repeats: int = 30,
    threads: int | None = None,
    model: Callable[[], nn.Module] | None = None,
    input_shape: Sequence[int] | None = None,
    min_sparse_bytes: int = MIN_SPARSE_BYTES,
    trust_factory: bool = False,
) -> dict:
    """Dense vs sparse latency and resident weight memory, per layer and end to end, in one process.

    Per layer, the figures are the load-time choice's own timings (every candidate on the same
    random input, interleaved, median of ``repeats``): the layer alone, its weights warm in cache
    after the first call. End to end, the densely decoded model (``compress.load``) and the runtime's
    model run the same random input, interleaved, median of ``repeats``; hooks also time each layer
    there ("in model"), where the other layers' weights have passed through the caches in between,
    as in real batch-1 inference.

    Args:
        path: a ``.dsz`` file.
        batch_sizes: a runtime model is built (and its kernels chosen) for each.
        threads: ``torch.set_num_threads`` for the run (restored after); None keeps the current.
        model: a callable returning a fresh architecture, for files without a built-in spec.
        input_shape: one sample's shape; default ``(in_features,)`` of the first Linear.

    Returns:
        {"rows": [...] (``BENCH_COLUMNS`` keys; layer "(model)" is end to end), "choices": {batch: report}}.

    Raises:
        ConfigError: bad batch sizes/threads, or no input shape to infer; the errors of ``load``.
    """
    from .compress import load as load_dense

    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be integers >= 1, got {batch_sizes!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        dense = load_dense(path, trust_factory=trust_factory)
        if isinstance(dense, dict):
            if model is None:
                raise ConfigError(f"{path}: the file has no built-in model spec; pass model= (a callable "
                                  "returning the architecture)")
            state, dense = dense, model()
            dense.load_state_dict(state)
        dense.eval()
        if input_shape is None:
            first = next((m for m in dense.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
            if not isinstance(first, nn.Linear):
                raise ConfigError(f"{path}: cannot infer the input shape (the first layer is not a Linear); "
                                  "pass input_shape")
            input_shape = (first.in_features,)
        dense_bytes = weight_bytes(dense)
        rows: list[dict] = []
        choices: dict[int, dict] = {}
        for batch in batch_sizes:
            sparse = load(path, batch, model=None if model is None else model(), repeats=repeats,
                          min_sparse_bytes=min_sparse_bytes, trust_factory=trust_factory)
            rep = report(sparse)
            choices[batch] = rep.to_dict()
            for name, c in rep.layers.items():
                codebook_ms = [c.times_ms[k] for k in ("codebook", ONE_THREAD) if k in c.times_ms]
                sparse_ms = codebook_ms + [c.times_ms[k] for k in ("torch_csr",) if k in c.times_ms]
                dense_ms, chosen_ms = c.times_ms.get("dense"), c.times_ms.get(c.label)
                rows.append({
                    "batch": batch, "layer": name, "shape": "x".join(map(str, c.shape)), "density": c.density,
                    "dense_ms": dense_ms, "codebook_ms": min(codebook_ms) if codebook_ms else None,
                    "torch_csr_ms": c.times_ms.get("torch_csr"),
                    "sparse_speedup": dense_ms / min(sparse_ms) if dense_ms and sparse_ms else None,
                    "kernel": c.kernel + (" (1 thread)" if c.label == ONE_THREAD else ""),
                    "speedup": dense_ms / chosen_ms if dense_ms and chosen_ms else None,
                    "dense_bytes": c.bytes.get("dense"), "runtime_bytes": c.bytes[c.label],
                    "memory_ratio": c.bytes[c.label] / c.bytes["dense"] if c.bytes.get("dense") else None,
                })
            x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
            in_model = {"dense": _LayerClock(dense, rep.layers), "runtime": _LayerClock(sparse, rep.layers)}
            with torch.no_grad():
                times = median_ms({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats)
            for label, clock in in_model.items():
                clock.remove()
                for row in rows[-len(rep.layers):] if rep.layers else []:
                    row[f"{label}_in_model_ms"] = clock.median_ms(row["layer"])
            for row in rows[-len(rep.layers):] if rep.layers else []:
                row["in_model_speedup"] = row["dense_in_model_ms"] / row["runtime_in_model_ms"]
            runtime_bytes = weight_bytes(sparse)
            rows.append({
                "batch": batch, "layer": "(model)", "shape": "x".join(map(str, (batch, *input_shape))),
                "density": None, "dense_ms": times["dense"], "codebook_ms": None, "torch_csr_ms": None,
                "sparse_speedup": None, "kernel": _kernel_counts(rep), "speedup": times["dense"] / times["sparse"],
                "dense_in_model_ms": times["dense"], "runtime_in_model_ms": times["sparse"],
                "in_model_speedup": times["dense"] / times["sparse"],
                "dense_bytes": dense_bytes, "runtime_bytes": runtime_bytes,
                "memory_ratio": runtime_bytes / dense_bytes,
            })
            del sparse
        return {"path": str(path), "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows,
                "choices": choices}
    finally:
        torch.set_num_threads(previous_threads)
