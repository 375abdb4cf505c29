"""Context-adaptive coder (``deepshrink.coding.level_coder``) vs today's layout, tensor by tensor, and its speed.

Usage: ``python bench/level_coder.py [--quick]``. Prints tables and writes bench/results/level_coder.json
(machine, versions, date, git SHA, every figure).

Per tensor, the bytes of:
  * huffman / ans layout: ``deepshrink.codecs.deep_compression.encode_quantized`` (relative position entries + cluster
    symbols, two streams; fc 5-bit and conv 8-bit entries as in the paper), payload plus the JSON of
    the coder params (code lengths / frequency tables) that the file header carries;
  * cabac: one stream of signed levels (``codecs.cabac.indices_to_levels``; row = one output row/filter),
    payload plus its params JSON;
  * bound: the empirical entropy of the two layout streams (what a memoryless coder of today's
    symbols could at best reach) and of the signed level stream (memoryless, zeros included).
Codebooks are the same for every coder and left out.

Data:
  (a) LeNet-300-100 on MNIST (../shared/datasets/mnist), trained here for a few epochs (Adam,
      batch 128, seed 0), each weight pruned by magnitude to the paper's rates (fc1 92%, fc2 91%,
      fc3 74%), its survivors clustered into 64 centroids (6 bits, ``kmeans_1d``, linear init).
      No retraining: a quick stand-in for the recipe's checkpoint. Skipped if MNIST is missing.
  (b) ResNet-20 (../shared/pretrained/resnet20-12fca82f.th): each conv/linear weight pruned 50%,
      16 centroids (4 bits), as in bench/coding.py.
  (c) speed: a 784-wide Laplacian layer of 5,000,000 weights (--quick: 1,000,000), pruned 92%, the
      survivors in 64 uniform bins; and the same layer dense (nothing pruned), the coder's slowest case.
      MB/s count 4 bytes per weight (fp32-equivalent); best of several runs after a warm-up (numba
      compile excluded), single thread. The same layer also through dependent quantization
      (``quantize.dependent_1d``, 62 levels, lambda 0.01: the trellis's own speed, one run) and its
      context model (``level_coder.DEPENDENT_CONTEXT_MODEL``): its bytes, encode and decode speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coding import CHECKPOINT, ROOT, best_time, machine_info  # noqa: E402
from common import write_json  # noqa: E402

from deepshrink.coding import entropy_bits, level_coder  # noqa: E402
from deepshrink.codecs.cabac import indices_to_levels  # noqa: E402
from deepshrink.codecs.deep_compression import decode_quantized, encode_quantized  # noqa: E402
from deepshrink.quantizers import dependent_1d  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "level_coder.json"
MNIST = ROOT.parent / "shared" / "datasets"
LENET_PRUNE = {"fc1.weight": 0.92, "fc2.weight": 0.91, "fc3.weight": 0.74}


def prune_and_cluster(weight: np.ndarray, fraction: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices shaped like ``weight`` with 0 = pruned and s = codebook[s-1], codebook (k,))."""
    flat = weight.reshape(-1)
    keep = np.abs(flat) > np.quantile(np.abs(flat), fraction)
    from deepshrink.kmeans import kmeans_1d

    codebook, labels = kmeans_1d(flat[keep].astype(np.float64), k, "linear")
    indices = np.zeros(flat.size, dtype=np.int64)
    indices[keep] = np.asarray(labels) + 1
    return indices.reshape(weight.shape), np.asarray(codebook, dtype=np.float32)


def lenet300_tensors(epochs: int) -> dict:
    import torch
    from torch import nn

    from deepshrink.data import load_dataset
    from deepshrink.models import lenet300

    try:
        data = load_dataset("mnist", MNIST / "mnist", "train", download=False)
    except Exception as error:  # report, don't crash: the other parts still run
        return {"error": f"MNIST not loadable: {type(error).__name__}: {error}"}
    torch.manual_seed(0)
    model = lenet300()
    images = (data.images.float() / 255 - data.mean[0]) / data.std[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data))
        for batch in order.split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), data.labels[batch]).backward()
            optimizer.step()
    tensors = {}
    for name, fraction in LENET_PRUNE.items():
        weight = model.state_dict()[name].numpy()
        tensors[name] = (*prune_and_cluster(weight, fraction, 64), 6, 5)
    return {"tensors": tensors, "train_s": time.perf_counter() - started, "epochs": epochs}


def resnet20_tensors() -> dict:
    import torch

    try:
        state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    except Exception as error:
        return {"error": f"torch.load({CHECKPOINT}, weights_only=True) failed: {type(error).__name__}: {error}"}
    state = state.get("state_dict", state)
    tensors = {}
    for name, tensor in state.items():
        if name.endswith("weight") and tensor.dim() in (2, 4):
            tensors[name] = (*prune_and_cluster(tensor.float().numpy(), 0.5, 16), 4, 8 if tensor.dim() == 4 else 5)
    return {"tensors": tensors}


def sizes(name: str, indices: np.ndarray, codebook: np.ndarray, bits: int, index_bits: int) -> dict:
    row = {"tensor": name, "shape": list(indices.shape), "nonzero": int((indices != 0).sum())}
    for coder in ("huffman", "ans"):
        coded = encode_quantized(indices, codebook, bits, index_bits, coder)
        row[coder] = len(coded.weights_stream) + len(coded.positions_stream)
        row[f"{coder}_params"] = len(json.dumps(coded.coder_params))
        if coder == "huffman":
            symbols = indices.reshape(-1)[indices.reshape(-1) != 0] - 1
            from deepshrink.codecs.deep_compression import positions_to_entries

            entries = positions_to_entries(np.flatnonzero(indices.reshape(-1)), index_bits)
            row["layout_entropy"] = (entropy_bits(symbols, len(codebook)) + entropy_bits(entries, 1 << index_bits)) / 8
    levels, _, _ = indices_to_levels(indices, codebook)
    row_length = int(np.prod(indices.shape[1:])) if indices.ndim > 1 else indices.size
    payload, params = level_coder.encode(levels.reshape(-1), row_length)
    assert np.array_equal(level_coder.decode(payload, params, levels.size), levels.reshape(-1))
    row["cabac"] = len(payload)
    row["cabac_params"] = len(json.dumps(params))
    shifted = (levels.reshape(-1) + params["max_abs"]).astype(np.int64)
    row["levels_entropy"] = entropy_bits(shifted, 2 * params["max_abs"] + 1) / 8
    row["cabac_vs_huffman"] = row["cabac"] / row["huffman"]
    return row


def speed(count: int, density: float, quick: bool) -> dict:
    rng = np.random.default_rng(0)
    weights = rng.laplace(size=(count // 784, 784))
    keep = np.abs(weights) >= np.quantile(np.abs(weights), 1 - density)
    edges = np.linspace(weights[keep].min(), weights[keep].max(), 65)[1:-1]
    indices = np.where(keep, np.searchsorted(edges, weights) + 1, 0)
    codebook = np.linspace(weights[keep].min(), weights[keep].max(), 64).astype(np.float32)
    levels, _, _ = indices_to_levels(indices, codebook)
    flat = levels.reshape(-1)
    runs, budget = (2, 0.3) if quick else (3, 1.0)
    mb = 4 * flat.size / 1e6
    payload, params = level_coder.encode(flat, 784)
    enc = best_time(lambda: level_coder.encode(flat, 784), runs, budget)
    dec = best_time(lambda: level_coder.decode(payload, params, flat.size), runs, budget)
    coded = encode_quantized(indices, codebook, 6, 5, "huffman")
    huff_enc = best_time(lambda: encode_quantized(indices, codebook, 6, 5, "huffman"), runs, budget)
    huff_dec = best_time(lambda: decode_quantized(coded), runs, budget)
    # dependent quantization of the same weights (62 levels, lambda 0.01): the trellis, then its context model
    pruned = np.where(keep, weights, 0.0).reshape(-1)
    dependent_1d(pruned[:784], 62, 0.01, row_length=784)  # compile
    t0 = time.perf_counter()
    dependent = dependent_1d(pruned, 62, 0.01, row_length=784)[1]
    trellis = time.perf_counter() - t0
    dq = level_coder.DEPENDENT_CONTEXT_MODEL
    dq_payload, dq_params = level_coder.encode(dependent, 784, context_model=dq)
    dq_enc = best_time(lambda: level_coder.encode(dependent, 784, context_model=dq), runs, budget)
    dq_dec = best_time(lambda: level_coder.decode(dq_payload, dq_params, dependent.size), runs, budget)
    return {
        "weights": int(flat.size), "density": density, "cabac_bytes": len(payload),
        "huffman_bytes": len(coded.weights_stream) + len(coded.positions_stream),
        "cabac_encode_MBps": mb / enc, "cabac_decode_MBps": mb / dec,
        "huffman_encode_MBps": mb / huff_enc, "huffman_decode_MBps": mb / huff_dec,
        "dq_bytes": len(dq_payload), "dq_trellis_MBps": mb / trellis, "dq_encode_MBps": mb / dq_enc,
        "dq_decode_MBps": mb / dq_dec,
    }


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title} (payload bytes; the params JSON each coder adds to the header in brackets; codebooks excluded)")
    header = (f"{'tensor':<30} {'shape':<12} {'nonzero':>8} {'huffman':>15} {'ans':>15} {'cabac':>13} "
              f"{'cabac/huf':>9} {'H layout':>9} {'H levels':>9}")
    print(header + "\n" + "-" * len(header))
    for r in rows + [total(rows)]:
        cells = " ".join(f"{r[c]:>{w},} ({r[c + '_params']:>4,})" for c, w in (("huffman", 8), ("ans", 8), ("cabac", 6)))
        print(f"{r['tensor'][-30:]:<30} {'x'.join(map(str, r['shape'])):<12} {r['nonzero']:>8,} {cells} "
              f"{r['cabac_vs_huffman']:>9.3f} {r['layout_entropy']:>9,.0f} {r['levels_entropy']:>9,.0f}")


def total(rows: list[dict]) -> dict:
    keys = ("nonzero", "huffman", "ans", "cabac", "huffman_params", "ans_params", "cabac_params", "layout_entropy",
            "levels_entropy")
    out = {"tensor": "total", "shape": [], **{k: sum(r[k] for r in rows) for k in keys}}
    out["cabac_vs_huffman"] = out["cabac"] / out["huffman"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch of LeNet training, 1M-weight speed test")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict = {"machine": machine_info(), "quick": args.quick, "datasets": {}}
    level_coder.decode(*level_coder.encode(np.array([0, 1, -2, 0, 3]), 2)[:2], 5)  # compile

    for label, source in (("lenet300-mnist", lambda: lenet300_tensors(1 if args.quick else 3)),
                          ("resnet20", resnet20_tensors)):
        data = source()
        if "error" in data:
            print(f"{label} skipped: {data['error']}")
            results["datasets"][label] = {"error": data["error"]}
            continue
        rows = [sizes(name, *spec) for name, spec in data.pop("tensors").items()]
        print_rows(label, rows)
        results["datasets"][label] = {**data, "rows": rows, "total": total(rows)}

    count = 1_000_000 if args.quick else 5_000_000
    print(f"\nspeed, {count:,} weights in rows of 784, single thread (MB/s of fp32-equivalent weights)")
    print(f"{'density':>8} {'cabac B':>10} {'huffman B':>10} {'cabac enc':>10} {'cabac dec':>10} "
          f"{'huf enc':>10} {'huf dec':>10} {'dq B':>10} {'trellis':>10} {'dq enc':>10} {'dq dec':>10}")
    results["speed"] = []
    for density in (0.08, 1.0):
        s = speed(count, density, args.quick)
        results["speed"].append(s)
        print(f"{density:>8.2f} {s['cabac_bytes']:>10,} {s['huffman_bytes']:>10,} {s['cabac_encode_MBps']:>10.1f} "
              f"{s['cabac_decode_MBps']:>10.1f} {s['huffman_encode_MBps']:>10.1f} {s['huffman_decode_MBps']:>10.1f} "
              f"{s['dq_bytes']:>10,} {s['dq_trellis_MBps']:>10.1f} {s['dq_encode_MBps']:>10.1f} {s['dq_decode_MBps']:>10.1f}")

    results["runtime_s"] = time.perf_counter() - started
    write_json(RESULTS, results)
    print(f"\nruntime {results['runtime_s']:.1f} s; wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
