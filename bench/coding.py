"""Entropy-coder benchmark: deepshrink's Huffman and ANS vs a pure-Python Huffman, zlib and zstd.

Usage: ``python bench/coding.py [--quick]``. Prints a table and writes bench/results/coding.json
(machine, versions, date, git SHA, every figure).

Data:
  (a) ResNet-20 (/work/shared/pretrained/resnet20-12fca82f.th, torch.load(weights_only=True)):
      each conv/linear weight pruned 50% by |w| percentile, its non-zeros clustered into 16
      centroids (4 bits) by ``deepshrink.quantize.kmeans_1d`` (uniform bins if that is missing),
      giving two streams concatenated over layers: the cluster indices (alphabet 16) and the
      relative-position entries (8-bit for conv, 5-bit for fc, filler = all ones;
      ``deepshrink.codecs.deep_compression.positions_to_entries``, as the file format stores them).
      Per-layer coding, which is what the file format does, is reported separately with its table
      overhead.
  (b) a synthetic 5,000,000-non-zero layer at 5 bits: Laplace weights, the 50% smallest pruned, the
      rest in 32 uniform bins (peaked at the pruning threshold, like the paper's Fig. 5).
      --quick uses 500,000.

Timing: ``time.perf_counter``, best of several runs (at least 3 for fast coders, fewer for
zstd/zlib and the pure-Python coder) after a warm-up, so numba compile time is excluded. MB/s count
4 bytes per symbol (uint32 symbols). The table's ratio column is coded bits / entropy bits, where
entropy is the empirical Shannon bound of the same stream. Our coders' parameter tables (code
lengths / frequencies as JSON) are listed apart, and zlib/zstd compress the symbols as uint8
bytes. The pure-Python coder is timed on a 200,000-symbol slice and scaled linearly. Its output is
bit-identical to our Huffman's, so its size is ours.

Measured on the 2-core development VM: about 1 minute in full, under 20 s with --quick.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from importlib.metadata import version

import numba
import numpy as np
import zstandard

from deepshrink.coding import entropy_bits, get_coder, histogram
from deepshrink.coding.huffman import canonical_codes, lengths_from_text
from deepshrink.codecs.deep_compression import positions_to_entries

from common import ROOT, machine_info, write_json

CHECKPOINT = ROOT.parent / "shared" / "pretrained" / "resnet20-12fca82f.th"
RESULTS = ROOT / "bench" / "results" / "coding.json"
PYTHON_SLICE = 200_000
ZSTD_LEVEL = 19


# --- data ----------------------------------------------------------------------------------------


def cluster(values: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """Cluster labels 0..k-1 of ``values`` and the method used."""
    try:
        from deepshrink.kmeans import kmeans_1d

        _, labels = kmeans_1d(values, k, "linear")
        return np.asarray(labels, dtype=np.uint32), "deepshrink.quantize.kmeans_1d(linear init)"
    except (ImportError, AttributeError):
        edges = np.linspace(values.min(), values.max(), k + 1)[1:-1]
        return np.searchsorted(edges, values).astype(np.uint32), "uniform bins (kmeans_1d unavailable)"


def resnet20_streams() -> dict:
    """Per-layer cluster-index and position streams of the pruned, 4-bit ResNet-20, or an error note."""
    import torch

    try:
        state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    except Exception as error:  # report, don't crash: part (b) still runs
        return {"error": f"torch.load({CHECKPOINT}, weights_only=True) failed: {type(error).__name__}: {error}"}
    state = state.get("state_dict", state)
    layers, method = [], None
    for name, tensor in state.items():
        if not name.endswith("weight") or tensor.dim() not in (2, 4):
            continue
        weight = tensor.detach().float().numpy().reshape(-1)
        keep = np.abs(weight) > np.percentile(np.abs(weight), 50)
        labels, method = cluster(weight[keep], 16)
        index_bits = 8 if tensor.dim() == 4 else 5
        layers.append(
            {"name": name, "indices": labels, "positions": positions_to_entries(np.flatnonzero(keep), index_bits), "index_bits": index_bits}
        )
    return {"layers": layers, "clustering": method}


def synthetic_layer(count: int, seed: int = 0) -> np.ndarray:
    """``count`` 5-bit cluster indices of a pruned Laplace layer (uniform bins over the kept range)."""
    rng = np.random.default_rng(seed)
    weights = rng.laplace(0.0, 0.05, size=2 * count)
    kept = weights[np.abs(weights) >= np.quantile(np.abs(weights), 0.5)][:count]
    edges = np.linspace(kept.min(), kept.max(), 33)[1:-1]
    return np.searchsorted(edges, kept).astype(np.uint8)


# --- the pure-Python reference coder ---------------------------------------------------------------


def python_tables(lengths: np.ndarray) -> tuple[dict[int, str], dict[str, int]]:
    """Canonical code strings (same codes as deepshrink's Huffman) and the reverse map."""
    codes = canonical_codes(lengths)
    encode = {s: format(int(codes[s]), f"0{n}b") for s, n in enumerate(lengths.tolist()) if n}
    return encode, {bits: s for s, bits in encode.items()}


def python_encode(symbols: list[int], table: dict[int, str]) -> bytes:
    bits = "".join(table[s] for s in symbols)
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""


def python_decode(payload: bytes, count: int, reverse: dict[str, int]) -> list[int]:
    out, prefix = [], ""
    for byte in payload:
        for shift in range(7, -1, -1):
            prefix += "1" if byte >> shift & 1 else "0"
            if prefix in reverse:
                out.append(reverse[prefix])
                prefix = ""
                if len(out) == count:
                    return out
    return out


# --- timing --------------------------------------------------------------------------------------


def best_time(fn, min_runs: int, budget_s: float) -> float:
    """Fastest of at least ``min_runs`` calls, continuing while under ``budget_s`` seconds in total."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(symbols: np.ndarray, alphabet_size: int, quick: bool) -> list[dict]:
    """One row per coder on ``symbols``: size vs entropy, encode/decode MB/s."""
    import zstandard

    count = symbols.size
    entropy = entropy_bits(symbols, alphabet_size)
    mb = 4 * count / 1e6
    runs, budget = (2, 0.3) if quick else (3, 1.0)
    rows = []

    for name in ("huffman", "ans"):
        coder = get_coder(name)
        coder.decode(*coder.encode(symbols[:1000], alphabet_size), min(1000, count), alphabet_size)  # warm-up
        payload, params = coder.encode(symbols, alphabet_size)
        assert np.array_equal(coder.decode(payload, params, count, alphabet_size), symbols)
        enc = best_time(lambda: coder.encode(symbols, alphabet_size), runs, budget)
        dec = best_time(lambda: coder.decode(payload, params, count, alphabet_size), runs, budget)
        rows.append(
            {"coder": f"deepshrink {name}", "bytes": len(payload), "params_bytes": len(json.dumps(params)),
             "encode_s": enc, "decode_s": dec}
        )
        if name == "huffman":
            huffman_params, huffman_bytes = params, len(payload)

    # pure Python: same canonical code, timed on a slice and scaled to the whole stream
    part = symbols[:PYTHON_SLICE].tolist()
    table, reverse = python_tables(lengths_from_text(huffman_params["code_lengths"], alphabet_size))
    part_payload = python_encode(part, table)
    assert python_decode(part_payload, len(part), reverse) == part
    scale = count / len(part)
    enc = best_time(lambda: python_encode(part, table), 1, 0.0) * scale
    dec = best_time(lambda: python_decode(part_payload, len(part), reverse), 1, 0.0) * scale
    rows.append(
        {"coder": f"pure-Python huffman (timed on {len(part):,}, scaled)", "bytes": huffman_bytes,
         "params_bytes": len(json.dumps(huffman_params)), "encode_s": enc, "decode_s": dec}
    )

    raw = symbols.astype(np.uint8).tobytes()
    for label, compress, decompress in (
        ("zlib level 9", lambda: zlib.compress(raw, 9), zlib.decompress),
        (f"zstd level {ZSTD_LEVEL}", lambda: zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw),
         lambda blob: zstandard.ZstdDecompressor().decompress(blob)),
    ):
        blob = compress()
        assert decompress(blob) == raw
        enc = best_time(compress, 1, budget)
        dec = best_time(lambda: decompress(blob), runs, budget)
        rows.append({"coder": label, "bytes": len(blob), "params_bytes": 0, "encode_s": enc, "decode_s": dec})

    python_row = rows[2]
    for row in rows:
        row["ratio_to_entropy"] = 8 * row["bytes"] / entropy if entropy else float("nan")
        row["encode_MBps"] = mb / row["encode_s"]
        row["decode_MBps"] = mb / row["decode_s"]
        row["encode_speedup_vs_python"] = python_row["encode_s"] / row["encode_s"]
        row["decode_speedup_vs_python"] = python_row["decode_s"] / row["decode_s"]
    return rows


def per_layer_sizes(layers: list[dict]) -> dict:
    """Total bytes when every layer's two streams are coded separately (as the file format does)."""
    totals = {"entropy_bytes": 0.0}
    for name in ("huffman", "ans"):
        coder = get_coder(name)
        payload_bytes = params_bytes = 0
        for layer in layers:
            for stream, alphabet in (("indices", 16), ("positions", 1 << layer["index_bits"])):
                payload, params = coder.encode(layer[stream], alphabet)
                payload_bytes += len(payload)
                params_bytes += len(json.dumps(params))
        totals[name] = {"payload_bytes": payload_bytes, "params_bytes": params_bytes}
    for layer in layers:
        totals["entropy_bytes"] += entropy_bits(layer["indices"], 16) / 8
        totals["entropy_bytes"] += entropy_bits(layer["positions"], 1 << layer["index_bits"]) / 8
    return totals


# --- report --------------------------------------------------------------------------------------


def print_table(title: str, count: int, alphabet_size: int, entropy: float, rows: list[dict]) -> None:
    print(f"\n{title}: {count:,} symbols, alphabet {alphabet_size}, entropy {entropy / count:.4f} bits/symbol")
    columns = ("bytes", 11), ("params B", 9), ("bits/H", 8), ("enc MB/s", 9), ("dec MB/s", 9), ("enc x py", 9), ("dec x py", 9)
    header = f"{'coder':<48} " + " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['coder']:<48} {r['bytes']:>11,} {r['params_bytes']:>9,} {r['ratio_to_entropy']:>8.4f} "
            f"{r['encode_MBps']:>9.1f} {r['decode_MBps']:>9.1f} {r['encode_speedup_vs_python']:>9.0f} "
            f"{r['decode_speedup_vs_python']:>9.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500k synthetic symbols and fewer repeats")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict = {"machine": machine_info(numba=numba.__version__, constriction=version("constriction"),
                                             zstandard=zstandard.__version__), "quick": args.quick, "datasets": {}}
    results["method"] = (
        "best-of-N perf_counter after warm-up (numba compile excluded); MB/s = 4 bytes/symbol; bits/H = coded "
        f"bits over empirical entropy; pure-Python coder timed on {PYTHON_SLICE:,} symbols and scaled; "
        f"zlib level 9 and zstd level {ZSTD_LEVEL} on uint8 symbols"
    )

    resnet = resnet20_streams()
    datasets = []
    if "error" in resnet:
        print(f"ResNet-20 skipped: {resnet['error']}")
        results["datasets"]["resnet20"] = {"error": resnet["error"]}
    else:
        layers = resnet["layers"]
        datasets.append(("resnet20 cluster indices (4-bit)", np.concatenate([l["indices"] for l in layers]), 16))
        datasets.append(("resnet20 position entries (8-bit conv, 5-bit fc)",
                         np.concatenate([l["positions"] for l in layers]), 256))
        results["datasets"]["resnet20_per_layer"] = {"clustering": resnet["clustering"], "layers": len(layers),
                                                     **per_layer_sizes(layers)}
    count = 500_000 if args.quick else 5_000_000
    datasets.append((f"synthetic layer, {count:,} non-zeros at 5 bits", synthetic_layer(count), 32))

    for title, symbols, alphabet_size in datasets:
        rows = measure(symbols, alphabet_size, args.quick)
        entropy = entropy_bits(symbols, alphabet_size)
        print_table(title, symbols.size, alphabet_size, entropy, rows)
        results["datasets"][title] = {
            "count": int(symbols.size), "alphabet_size": alphabet_size, "entropy_bits": entropy,
            "histogram": histogram(symbols, alphabet_size).tolist(), "rows": rows,
        }

    if "resnet20_per_layer" in results["datasets"]:
        per_layer = results["datasets"]["resnet20_per_layer"]
        print(f"\nResNet-20 coded per layer ({per_layer['layers']} layers x 2 streams), clustering: "
              f"{per_layer['clustering']}; entropy {per_layer['entropy_bytes']:,.0f} B")
        for name in ("huffman", "ans"):
            sizes = per_layer[name]
            ratio = sizes["payload_bytes"] / per_layer["entropy_bytes"]
            print(f"  {name:<8} payload {sizes['payload_bytes']:>8,} B ({ratio:.4f} x entropy)"
                  f" + params {sizes['params_bytes']:>6,} B of JSON")

    results["runtime_s"] = time.perf_counter() - started
    write_json(RESULTS, results)
    print(f"\nruntime {results['runtime_s']:.1f} s; wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
