"""How fast can a batch-1 sparse layer be on this CPU? The runtime's codebook kernel against lower bounds.

Usage: ``python bench/kernels.py [--repeats 30] [--threads N]``. Prints a table and writes
bench/results/kernels.json (machine, load average, every figure); with ``--threads N``,
kernels-Nthreads.json.

Issue 10 asks for 3x over the dense float32 layer at batch 1 for each of AlexNet's fully connected
layers (9%, 9% and 25% of weights kept, 5-bit shared weights). Any product over a CSR weight reads
one column index per kept weight and gathers ``x[col]``; this bench times that work alone (``gather
sum``: sum of ``x[col]``, no weights at all), the same loop with float32 values (``float values``:
one more load per weight, no codebook), and the shipped kernel (``runtime.codebook_matmul``: the
uint8 cluster index and the codebook lookup on top, its indices read 8 per 64-bit load; ``unpacked``:
the same kernel reading one index per load), on one thread and on ``--threads``, beside the
dense product (``torch.nn.functional.linear``) in the same process, interleaved, each timed on its
second of two calls in a row (operands warm in the caches), median of repeats.
``bound`` is the dense time over the gather sum's time divided by the threads: the speed-up no CSR
kernel can exceed here, even with perfect scaling over threads.

Random weights and input: the timing depends on shapes and sparsity, not on values.
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
import torch
from rich.console import Console

from deepshrink.runtime import kernels as runtime
from deepshrink.report import render_table

from common import ROOT, machine_info, write_json

RESULTS = ROOT / "bench" / "results" / "kernels.json"
#: AlexNet's fully connected layers (rows, cols) and the fraction kept (the paper's Table 4)
LAYERS = {"fc1": (4096, 9216, 0.09), "fc2": (4096, 4096, 0.09), "fc3": (1000, 4096, 0.25)}
BITS = 5
_ONE, _TWO, _THREE, _FOUR = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)


@numba.njit(cache=True, nogil=True)
def gather_sum(crow, col, x, out):  # pragma: no cover
    for row in range(len(crow) - 1):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        j, end = crow[row], crow[row + 1]
        while j + _FOUR <= end:
            a0 += x[col[j]]
            a1 += x[col[j + _ONE]]
            a2 += x[col[j + _TWO]]
            a3 += x[col[j + _THREE]]
            j += _FOUR
        while j < end:
            a0 += x[col[j]]
            j += _ONE
        out[row] = (a0 + a1) + (a2 + a3)


@numba.njit(cache=True, nogil=True)
def float_values(crow, col, values, x, out):  # pragma: no cover
    for row in range(len(crow) - 1):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        j, end = crow[row], crow[row + 1]
        while j + _FOUR <= end:
            a0 += values[j] * x[col[j]]
            a1 += values[j + _ONE] * x[col[j + _ONE]]
            a2 += values[j + _TWO] * x[col[j + _TWO]]
            a3 += values[j + _THREE] * x[col[j + _THREE]]
            j += _FOUR
        while j < end:
            a0 += values[j] * x[col[j]]
            j += _ONE
        out[row] = (a0 + a1) + (a2 + a3)


def random_layer(rows: int, cols: int, kept: float, rng: np.random.Generator):
    """(CSR-codebook form, its dense float32 weight) with about ``kept`` of the weights non-zero."""
    mask = rng.random((rows, cols)) < kept
    positions = np.flatnonzero(mask)
    codebook = rng.standard_normal(1 << BITS).astype(np.float32)
    form = runtime.csr_from_positions((rows, cols), positions, rng.integers(0, 1 << BITS, len(positions)), codebook)
    return form, form.dense()


def measure(form, weight: torch.Tensor, threads: int, repeats: int, rng: np.random.Generator) -> dict:
    x = torch.from_numpy(rng.standard_normal(form.cols).astype(np.float32))
    xt, xn, out = x.reshape(-1, 1), x.numpy(), np.empty(form.rows, dtype=np.float32)
    values, no_bias = form.values(), np.zeros(0, dtype=np.float32)
    fns = {
        "dense": lambda: torch.nn.functional.linear(x, weight),
        "codebook": lambda: runtime.codebook_matmul(form, xt),
        "codebook_1t": lambda: runtime.codebook_matmul(form, xt, max_threads=1),
        # the same product reading one index per load: what packing 8 indices per load saves
        "unpacked_1t": lambda: runtime._codebook_matvec(form.crow, form.col, form.codes, form.codebook, no_bias, xn,
                                                        out, 0, form.rows),
        "float_values_1t": lambda: float_values(form.crow, form.col, values, xn, out),
        "gather_sum_1t": lambda: gather_sum(form.crow, form.col, xn, out),
    }
    expected = weight @ x
    torch.testing.assert_close(runtime.codebook_matmul(form, xt).reshape(-1), expected, rtol=1e-4, atol=1e-3)
    float_values(form.crow, form.col, values, xn, out)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-3)
    gather_sum(form.crow, form.col, xn, out)  # compile before timing
    times = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved: every candidate sees the same machine state
        for name, fn in fns.items():
            fn()  # warm: otherwise whichever runs right after the dense product finds its operands evicted
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return {"nnz": form.nnz, **{f"{name}_ms": v for name, v in ms.items()},
            **{f"{name}_ns_per_weight": 1e6 * v / form.nnz for name, v in ms.items() if name != "dense"},
            **{f"{name}_speedup": ms["dense"] / v for name, v in ms.items() if name != "dense"},
            "bound": ms["dense"] / (ms["gather_sum_1t"] / threads)}


COLUMNS = [
    ("layer", "layer", "{}".format), ("kept", "kept", "{:.0%}".format), ("nnz", "kept weights", "{:,}".format),
    ("dense_ms", "dense ms", "{:.3f}".format),
    ("codebook_ms", "codebook ms", "{:.3f}".format), ("codebook_speedup", "speed-up", "{:.2f}x".format),
    ("codebook_1t_ms", "codebook 1 thread ms", "{:.3f}".format), ("codebook_1t_ns_per_weight", "ns/weight", "{:.2f}".format),
    ("unpacked_1t_ns_per_weight", "unpacked 1 thread ns/weight", "{:.2f}".format),
    ("float_values_1t_ns_per_weight", "float values 1 thread ns/weight", "{:.2f}".format),
    ("gather_sum_1t_ns_per_weight", "gather sum 1 thread ns/weight", "{:.2f}".format),
    ("bound", "bound", "{:.2f}x".format),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per figure (median reported)")
    parser.add_argument("--threads", type=int, help="torch/runtime threads (default: torch's)")
    args = parser.parse_args()
    results_json = RESULTS
    if args.threads:
        torch.set_num_threads(args.threads)
        results_json = RESULTS.with_name(f"kernels-{args.threads}threads.json")
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    results = {"machine": machine_info(numba=numba.__version__, threads=threads, load_average_start=os.getloadavg()),
               "repeats": args.repeats, "bits": BITS, "layers": {}}
    rows = []
    for name, (n_rows, n_cols, kept) in LAYERS.items():
        form, weight = random_layer(n_rows, n_cols, kept, rng)
        row = {"layer": f"{name} {n_rows}x{n_cols}", "kept": kept, **measure(form, weight, threads, args.repeats, rng)}
        results["layers"][name] = row
        rows.append(row)
    results["machine"]["load_average_end"] = os.getloadavg()
    Console(width=220).print(render_table(rows, COLUMNS, title=f"batch 1, {threads} threads, median of {args.repeats}"))
    write_json(results_json, results)
    print(f"load average {results['machine']['load_average_start']} -> {results['machine']['load_average_end']}; "
          f"wrote {results_json.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
