"""ONNX export of compressed files: sizes, ONNX Runtime latency and memory, dense vs palettized, and agreement.

Usage: ``python bench/onnx_export.py [NAME=FILE.dsz ...] [--resnet20] [--repeats 20] [--work DIR]``.
Prints a table and writes bench/results/onnx-export.json (machine, load average, versions, date, git
SHA, every figure).

Per model: bytes of the .dsz, of the dense .onnx, of the palettized .onnx (opset 18, uint8 indices)
and of the palettized .onnx at opset 21 (uint4 indices where a tensor has <= 16 levels), each .onnx
also after zstd -19. ONNX Runtime (CPU, 1 intra-op thread) latency at batch 1 and 64, median of
``--repeats`` runs after 3 warm-up runs, for dense and palettized under three settings:
``all`` (ORT_ENABLE_ALL), ``all-no-fold`` (ORT_ENABLE_ALL without the ConstantFolding optimizer) and
``none`` (ORT_DISABLE_ALL). ONNX Runtime constant-folds ``Gather(codebook, indices)`` into a dense
float32 weight under ``all``; so each session's memory is measured too, in a fresh child process:
RSS growth from before the session is created to after it (``session``) and to after one batch-64 run
(``run``), from /proc/self/statm. Agreement: the palettized graph under ``all`` against
``deepshrink.load`` on the file's whole test set (MNIST from /work/shared/datasets/mnist, CIFAR-10
JPEG from /work/shared/datasets/cifar10-jpeg, digits embedded): max |difference| of the outputs, top-1
agreement and both accuracies.

``--resnet20`` builds two files from the pretrained ResNet-20 (/work/shared/pretrained) without
retraining (50% pruned, conv1 25% and the classifier 30%, 4-bit k-means): BatchNorm stored as it is,
and folded (``EncodeConfig(fold_batchnorm=True)``); their dataset record is CIFAR-10 JPEG with the
ImageNet normalisation the checkpoint expects. Other files come from the CLI; the ones in
docs/export.md are listed there with their commands.

Runtime on the 2-core development VM (shared with a training run): about 3 minutes for four models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

import deepshrink
from deepshrink.data import Batches, load_dataset
from deepshrink.export import to_onnx
from deepshrink.format import read_header

from common import ROOT, machine_info, write_json

RESULTS = ROOT / "bench" / "results" / "onnx-export.json"
SHARED = ROOT.parent / "shared"
DATA_DIRS = {"mnist": SHARED / "datasets" / "mnist", "imagefolder": SHARED / "datasets" / "cifar10-jpeg"}
PRETRAINED_RESNET20 = SHARED / "pretrained" / "resnet20-12fca82f.th"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SETTINGS = ("all", "all-no-fold", "none")
BATCHES = (1, 64)
console = Console(width=200)


def session(path: Path, setting: str, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if setting == "none"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    disabled = ["ConstantFolding"] if setting == "all-no-fold" else None
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(path: str, setting: str, shape: str) -> None:
    """Run in a fresh process: print the RSS growth of creating the session and of one batch-64 run."""
    import onnxruntime  # noqa: F401  (imported before the first reading)

    x = np.random.default_rng(0).standard_normal((64, *json.loads(shape))).astype(np.float32)
    before = rss_bytes()
    s = session(Path(path), setting)
    created = rss_bytes()
    s.run(None, {"input": x})
    print(json.dumps({"session": created - before, "run": rss_bytes() - before}))


def memory(path: Path, setting: str, shape: tuple[int, ...]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(path), setting, json.dumps(list(shape))],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_memory(work: Path) -> dict:
    """What an empty session costs (an Identity graph on a 1x28x28 input): the fixed part of every RSS figure."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1, 28, 28])])
    path = work / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return {setting: memory(path, setting, (1, 28, 28)) for setting in SETTINGS}


def latency_ms(path: Path, setting: str, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    s = session(path, setting)
    x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
    for _ in range(3):
        s.run(None, {"input": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        s.run(None, {"input": x})
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def zstd_bytes(path: Path) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=19).compress(path.read_bytes()))


def test_set(record: dict):
    """The file's test split normalised as its record says, or None where the data is not on this machine."""
    name = record.get("name")
    if name != "digits" and not (name in DATA_DIRS and DATA_DIRS[name].exists()):
        return None
    data = load_dataset(name, DATA_DIRS.get(name), "test")
    if record.get("mean") and record.get("std"):
        data = dataclasses.replace(data, mean=tuple(record["mean"]), std=tuple(record["std"]))
    return data


def agreement(dsz: Path, onnx_path: Path, data) -> dict:
    model = deepshrink.load(dsz).eval()
    s = session(onnx_path, "all", threads=os.cpu_count() or 1)
    diff, agree, right_torch, right_onnx = 0.0, 0, 0, 0
    for x, y in Batches(data, 500):
        with torch.no_grad():
            expected = model(x).numpy()
        got = s.run(None, {"input": x.numpy()})[0]
        diff = max(diff, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        right_torch += int((expected.argmax(1) == y.numpy()).sum())
        right_onnx += int((got.argmax(1) == y.numpy()).sum())
    n = len(data)
    return {"n": n, "max_abs_diff": diff, "top1_agreement": agree / n, "accuracy_deepshrink": right_torch / n,
            "accuracy_onnx": right_onnx / n}


def build_resnet20(work: Path) -> dict[str, Path]:
    from deepshrink.compress import compress_model
    from deepshrink.encode import EncodeConfig
    from deepshrink.models import build_model, load_foreign_weights, model_spec
    from deepshrink.prune import PruneConfig, prune_model
    from deepshrink.quantize import QuantizeConfig, quantize_model

    spec = model_spec("resnet20")
    model = load_foreign_weights(build_model(spec), PRETRAINED_RESNET20).eval()
    prune_model(model, PruneConfig(q=50, q_by_pattern=(("conv1.weight", 25), ("linear.weight", 30))))
    quantize_model(model, QuantizeConfig(bits=4))
    record = {"name": "imagefolder", "image_shape": [3, 32, 32], "num_classes": 10, "mean": IMAGENET_MEAN,
              "std": IMAGENET_STD}
    files = {}
    for name, fold in (("resnet20-p50-4bit", False), ("resnet20-p50-4bit-bnfold", True)):
        files[name] = work / f"{name}.dsz"
        compress_model(model, files[name], EncodeConfig(fold_batchnorm=fold), model_spec=spec, meta={"dataset": record})
    return files


def measure(name: str, dsz: Path, work: Path, repeats: int) -> dict:
    record = (read_header(dsz)["meta"] or {}).get("dataset") or {}
    graphs = {"dense": to_onnx(dsz, work / f"{name}.dense.onnx"),
              "palettized": to_onnx(dsz, work / f"{name}.palettized.onnx", palettized=True),
              "palettized-opset21": to_onnx(dsz, work / f"{name}.palettized21.onnx", palettized=True, opset=21)}
    shape = graphs["dense"].input_shape
    row = {"model": name, "dsz_bytes": dsz.stat().st_size, "input_shape": list(shape),
           "levels": sorted({t.levels for t in graphs["palettized"].palettized}),
           "uint4_tensors_opset21": sum(t.index_bits == 4 for t in graphs["palettized-opset21"].palettized)}
    for kind, result in graphs.items():
        row[f"{kind}_onnx_bytes"] = result.onnx_bytes
        row[f"{kind}_onnx_zstd19_bytes"] = zstd_bytes(Path(result.path))
    row["dense_over_palettized"] = row["dense_onnx_bytes"] / row["palettized_onnx_bytes"]
    row["dense_over_palettized_opset21"] = row["dense_onnx_bytes"] / row["palettized-opset21_onnx_bytes"]
    row["latency_ms"], row["memory_bytes"] = {}, {}
    for kind in ("dense", "palettized"):
        path = Path(graphs[kind].path)
        for setting in SETTINGS:
            key = f"{kind}/{setting}"
            row["latency_ms"][key] = {str(b): latency_ms(path, setting, shape, b, repeats) for b in BATCHES}
            row["memory_bytes"][key] = memory(path, setting, shape)
    data = test_set(record)
    row["agreement"] = agreement(dsz, Path(graphs["palettized"].path), data) if data is not None else None
    return row


def print_table(rows: list[dict]) -> None:
    from deepshrink.report import render_table

    sizes = [{"model": r["model"], ".dsz": r["dsz_bytes"], "dense .onnx": r["dense_onnx_bytes"],
              "palettized": r["palettized_onnx_bytes"], "pal. opset 21": r["palettized-opset21_onnx_bytes"],
              "dense/pal.": f"{r['dense_over_palettized']:.2f}x",
              "dense zstd": r["dense_onnx_zstd19_bytes"], "pal. zstd": r["palettized_onnx_zstd19_bytes"],
              "max |diff|": None if r["agreement"] is None else f"{r['agreement']['max_abs_diff']:.1e}",
              "top-1 agree": None if r["agreement"] is None else f"{100 * r['agreement']['top1_agreement']:.2f}%"}
             for r in rows]
    console.print(render_table(sizes, title="bytes (zstd: level 19), agreement with deepshrink.load (test set)"))
    runs = [{"model": r["model"], "graph/setting": key, "batch 1 ms": f"{ms['1']:.3f}",
             "batch 64 ms": f"{ms['64']:.2f}",
             "RSS session MB": f"{r['memory_bytes'][key]['session'] / 2**20:.1f}",
             "RSS after run MB": f"{r['memory_bytes'][key]['run'] / 2**20:.1f}"}
            for r in rows for key, ms in r["latency_ms"].items()]
    console.print(render_table(runs, title="ONNX Runtime 1 thread: median latency, RSS growth"))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        memory_child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", metavar="NAME=FILE", help="compressed files to measure")
    parser.add_argument("--resnet20", action="store_true", help="also build and measure the two ResNet-20 files")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--work", help="folder for the built .dsz and .onnx files (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="onnx-export-"))
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for item in args.files:
        name, _, path = item.partition("=")
        files[name] = Path(path)
    if args.resnet20:
        files.update(build_resnet20(work))
    import onnx
    import onnxruntime

    load_start = os.getloadavg()
    rows = []
    for name, path in files.items():
        console.print(f"measuring {name} ({path})")
        rows.append(measure(name, path, work, args.repeats))
    print_table(rows)
    baseline = baseline_memory(work)
    console.print("empty session (Identity graph), RSS growth MB: " + ", ".join(
        f"{k} {v['session'] / 2**20:.1f} / after run {v['run'] / 2**20:.1f}" for k, v in baseline.items()))
    info = machine_info(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, ort_threads=1,
                        load_average_start=load_start, load_average_end=os.getloadavg())
    write_json(RESULTS, {"machine": info, "repeats": args.repeats, "settings": list(SETTINGS),
                         "baseline_memory_bytes": baseline,
                         "files": {name: str(path) for name, path in files.items()}, "rows": rows})
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
