"""Dense vs sparse runtime, in one process: per-layer and end-to-end latency and resident weight bytes
(what ``deepshrink bench-infer`` prints)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..compress import load as load_dense
from ..errors import ConfigError
from .model import MIN_SPARSE_BYTES, ONE_THREAD, RuntimeReport, load, median_ms, report, weight_bytes

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
