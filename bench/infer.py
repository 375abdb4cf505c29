"""Sparse, shared-weight inference (the paper's section 6) vs the dense float32 layers, same process.

Usage: ``python bench/infer.py [--batch 1,8,64] [--repeats 30] [--runs 1] [--threads N] [--quick]``.
Prints a table per model and writes bench/results/infer.json (machine, load average, versions, date, git
SHA, every figure) and the markdown tables to bench/results/infer.md; with ``--threads N`` the
files are infer-Nthreads.json/.md.

Models, each built with the library (``prune_model`` percentile per layer, ``quantize_model``
linear init, ``compress_model`` with Huffman coding) from random weights, written to a real .dsz
file and read back by ``deepshrink.runtime.load`` (sparse) and ``deepshrink.compress.load`` (dense):
  - AlexNet's fully connected layers, 9216 -> 4096 -> 4096 -> 1000 (ReLU between), with the
    paper's AlexNet sparsity (9%, 9%, 25% of weights kept) and 5-bit shared weights (Table 4).
  - LeNet-300-100 (784 -> 300 -> 100 -> 10) with the paper's sparsity (8%, 9%, 26% kept), 6 bits.
  - The demo MLP (64 -> 256 -> 128 -> 10): the demo recipe's 90% pruning and 4 bits.
Latency does not depend on the weights' values, only on shapes, sparsity and bits, so random
weights measure what trained ones would.

Timing: per layer, the runtime's own load-time measurement (every candidate kernel on the same
random input, called in turn within each repeat, median of ``--repeats`` after a warm-up call):
dense float32 ``nn.Linear``, the numba codebook kernel, ``torch.sparse_csr``. End to end, the dense
model and the runtime's model on the same input, alternating, median. Memory: bytes of every tensor
each model holds (parameters, buffers, compressed forms). The machine is shared: the load average
at start and end is recorded; quote medians and ratios. ``--runs N`` measures N times over (the same
files) and adds, per row, the median and the range of the speed-ups over the runs (``spread``): what a
user gets on such a machine, not one lucky run.

Measured on the 2-core development VM: about 4 minutes in full (building the AlexNet file is most
of it), about 1 minute with --quick (batch 1 only, 10 repeats).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numba
import torch
from rich.console import Console

from deepshrink import runtime
from deepshrink.compress import compress_model
from deepshrink.models import build_model
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model
from deepshrink.report import render_table, table_markdown

from common import ROOT, machine_info, write_json, write_text

RESULTS = ROOT / "bench" / "results" / "infer.json"
TABLES = ROOT / "bench" / "results" / "infer.md"

#: name -> (mlp kwargs, percent of weights pruned per layer, bits)
MODELS = {
    "alexnet-fc": ({"num_classes": 1000, "in_channels": 1, "image_size": 96, "hidden": [4096, 4096]},
                   {"fc1": 91, "fc2": 91, "fc3": 75}, 5),
    "lenet300": ({"num_classes": 10, "in_channels": 1, "image_size": 28, "hidden": [300, 100]},
                 {"fc1": 92, "fc2": 91, "fc3": 74}, 6),
    "demo-mlp": ({"num_classes": 10, "in_channels": 1, "image_size": 8, "hidden": [256, 128]},
                 {"fc1": 90, "fc2": 90, "fc3": 90}, 4),
}

COLUMNS = runtime.BENCH_COLUMNS
console = Console(width=200)


def build_file(name: str, out_dir: Path) -> tuple[Path, dict]:
    """Prune, quantize and encode a random-weight MLP with the library; return the file and its facts."""
    kwargs, pruned, bits = MODELS[name]
    spec = {"arch": "mlp", "kwargs": kwargs}
    torch.manual_seed(0)
    model = build_model(spec)
    prune_model(model, PruneConfig(method="percentile", q_by_pattern=tuple((f"{k}.*", q) for k, q in pruned.items())))
    quantize_model(model, QuantizeConfig(bits=bits, init="linear"))
    path = out_dir / f"{name}.dsz"
    file_report = compress_model(model, path, model_spec=spec)
    return path, {"spec": spec, "pruned_percent": pruned, "bits": bits, "file_bytes": file_report.file_bytes,
                  "dense_bytes": file_report.dense_bytes, "file_ratio": file_report.ratio}


SPREAD_COLUMNS = [("batch", "batch", None), ("layer", "layer", None), ("speedup", "speed-up: median (range)", None),
                  ("in_model_speedup", "in the model: median (range)", None)]


def spread(runs: list[list[dict]]) -> list[dict]:
    """Per row (batch, layer): the median and range over runs of its speed-ups, as text."""
    def summary(values: list) -> str:
        values = sorted(v for v in values if v is not None)
        return f"{values[len(values) // 2]:.2f}x ({values[0]:.2f}-{values[-1]:.2f})" if values else "-"

    return [{"batch": row["batch"], "layer": row["layer"],
             **{key: summary([run[i].get(key) for run in runs]) for key in ("speedup", "in_model_speedup")}}
            for i, row in enumerate(runs[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per figure (median reported)")
    parser.add_argument("--threads", type=int, help="torch/runtime threads (default: torch's)")
    parser.add_argument("--runs", type=int, default=1, help="whole measurements (the spread over them is reported)")
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 10 repeats")
    args = parser.parse_args()
    batches = [1] if args.quick else [int(b) for b in args.batch.split(",")]
    repeats = 10 if args.quick else args.repeats
    results_json, tables_md = RESULTS, TABLES
    if args.threads:
        torch.set_num_threads(args.threads)
        results_json = RESULTS.with_name(f"infer-{args.threads}threads.json")
        tables_md = TABLES.with_name(f"infer-{args.threads}threads.md")
    started = time.perf_counter()
    machine = machine_info(numba=numba.__version__, threads=torch.get_num_threads(), load_average_start=os.getloadavg())
    results: dict = {"machine": machine, "batches": batches, "repeats": repeats, "models": {}}
    results["method"] = (
        "per layer: the runtime's load-time timing, candidates interleaved, median of repeats after a warm-up; "
        "end to end: dense vs runtime model interleaved, median; memory: bytes of every tensor each model holds"
    )
    markdown = []
    with tempfile.TemporaryDirectory(prefix="deepshrink-infer-") as tmp:
        for name in MODELS:
            path, facts = build_file(name, Path(tmp))
            runs = [runtime.benchmark(path, batches, repeats=repeats) for _ in range(max(1, args.runs))]
            measured = {**runs[0], "spread": spread([run["rows"] for run in runs])} if len(runs) > 1 else runs[0]
            title = (f"{name}: {facts['file_bytes']:,}-byte file ({facts['file_ratio']:.1f}x); "
                     f"{measured['threads']} threads, median of {repeats} (ms)")
            console.print(render_table(measured["rows"], COLUMNS, title=title))
            markdown.append(f"### {title}\n\n{table_markdown(measured['rows'], COLUMNS)}")
            if len(runs) > 1:
                console.print(render_table(measured["spread"], SPREAD_COLUMNS, title=f"{name}: over {len(runs)} runs"))
                markdown.append(f"### {name}: speed-ups over {len(runs)} runs\n\n"
                                f"{table_markdown(measured['spread'], SPREAD_COLUMNS)}")
            results["models"][name] = {**facts, **measured}
    results["machine"]["load_average_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - started
    write_json(results_json, results)
    write_text(tables_md, "\n".join(markdown))
    print(f"runtime {results['runtime_s']:.1f} s; load average {results['machine']['load_average_start']} -> "
          f"{results['machine']['load_average_end']}; wrote {results_json.relative_to(ROOT)}, "
          f"{tables_md.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
