"""1-D k-means benchmark: ``deepshrink.quantize.kmeans_1d`` vs scikit-learn's ``KMeans`` (Lloyd).

Usage: ``python bench/kmeans.py [--quick]``. Prints a table and writes bench/results/kmeans.json
(machine, versions, date, git SHA, every figure; ``"quick": true`` marks a --quick run).

Data:
  (a) a synthetic layer with 5,000,000 non-zero weights: 10,000,000 draws of N(0, 0.05), the 50%
      smallest |w| pruned (a gap around zero, like a magnitude-pruned layer), at 4 and 5 bits.
      --quick: 500,000 non-zeros, 4 bits only.
  (b) every conv/linear weight of ResNet-20 (/work/shared/pretrained/resnet20-12fca82f.th, read with
      ``torch.load(weights_only=True)``), 50% of each layer pruned by |w|, at 4 and 5 bits (--quick:
      4 bits). Skipped with a message when the file is absent.

Both sides get the same float32 weights, the same initial centroids (``init_centroids``, passed to
scikit-learn as an array with n_init=1), max_iter=100 and tol=1e-7 (both relative to the variance).
Our time covers the whole ``kmeans_1d`` call (validation, sorting, the init itself, Lloyd, labels);
scikit-learn's covers ``KMeans.fit`` only (its float64 copy of the data is made beforehand). Ours is
the best of 3 runs; scikit-learn's is a single run (seconds each on the big layer). Both MSEs are
computed the same way, mean((w - centroid[label])**2) in float64. "ok" = our MSE <= scikit-learn's
* (1 + 1e-9).

Measured on the 2-core development VM (shared with other jobs; AMD EPYC, numpy 2.4.6, scikit-learn
1.9.1, torch 2.13.0+cpu): 151 s in full, ~20 s with --quick. On the 5M layer ours took 0.14-0.22 s
and scikit-learn 8-19 s (44-111x); our MSE was never higher (0.0001-0.2% lower: both stop at max_iter, then
we add one assignment + update step). ResNet-20: all 160 fits ok, 0.55-31.8x per layer (small layers: our fixed overhead
dominates; see bench/results/kmeans.json).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from common import ROOT, machine_info, write_json

CHECKPOINT = ROOT.parent / "shared" / "pretrained" / "resnet20-12fca82f.th"
RESULTS = ROOT / "bench" / "results" / "kmeans.json"
INITS = ("linear", "density", "random", "kmeans++")
MAX_ITER, TOL = 100, 1e-7
OUR_RUNS = 3
MSE_SLACK = 1e-9  # relative: float noise between two exact implementations


def pruned_normal(nonzero: int, seed: int = 0) -> np.ndarray:
    """``nonzero`` weights left after pruning the smaller half of 2*nonzero N(0, 0.05) draws."""
    w = np.random.default_rng(seed).normal(0.0, 0.05, 2 * nonzero).astype(np.float32)
    keep = np.argpartition(np.abs(w), nonzero)[nonzero:]
    return w[np.sort(keep)]


def resnet20_layers() -> dict[str, np.ndarray] | None:
    """Non-zero weights of each conv/linear layer of ResNet-20 after pruning 50% by |w|."""
    if not CHECKPOINT.is_file():
        return None
    import torch

    payload = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    state = payload.get("state_dict", payload)
    layers = {}
    for name, t in state.items():
        if name.endswith("weight") and t.dim() in (2, 4):  # conv (4-D) and linear (2-D) weights
            w = t.detach().float().flatten().numpy()
            keep = np.sort(np.argsort(np.abs(w), kind="stable")[w.size // 2:])
            layers[name.removeprefix("module.")] = w[keep]
    return layers


def mse(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((values.astype(np.float64) - centroids[labels]) ** 2))


def compare(values: np.ndarray, bits: int, init: str, seed: int = 0) -> dict:
    from sklearn.cluster import KMeans

    from deepshrink.kmeans import init_centroids, kmeans_1d

    k = 2**bits
    times = []
    for _ in range(OUR_RUNS):
        start = time.perf_counter()
        centroids, labels = kmeans_1d(values, k, init, seed=seed, max_iter=MAX_ITER, tol=TOL)
        times.append(time.perf_counter() - start)
    ours = mse(values, centroids, labels)

    start_centroids = init_centroids(values, k, init, seed=seed)
    x = values.astype(np.float64)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter
        start = time.perf_counter()
        km = KMeans(start_centroids.size, init=start_centroids[:, None], n_init=1, max_iter=MAX_ITER, tol=TOL,
                    algorithm="lloyd").fit(x)
        sk_time = time.perf_counter() - start
    theirs = mse(values, km.cluster_centers_[:, 0], km.labels_)
    best = min(times)
    return {
        "n": int(values.size), "bits": bits, "init": init, "k": int(centroids.size),
        "ours_s": best, "ours_s_mean": float(np.mean(times)), "ours_s_std": float(np.std(times)), "ours_runs": OUR_RUNS,
        "sklearn_s": sk_time, "sklearn_iter": int(km.n_iter_), "speedup": sk_time / best,
        "ours_mse": ours, "sklearn_mse": theirs, "mse_ratio": ours / theirs if theirs > 0 else 1.0,
        "ok": ours <= theirs * (1 + MSE_SLACK),
    }


def print_table(title: str, rows: list[dict], label: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text is enough
        Console = None
    headers = [label, "n", "bits", "init", "ours s", "sklearn s", "iters", "speed-up", "ours MSE", "sklearn MSE", "ok"]
    body = [[r["name"], f"{r['n']:,}", str(r["bits"]), r["init"], f"{r['ours_s']:.4f}", f"{r['sklearn_s']:.3f}",
             str(r["sklearn_iter"]), f"{r['speedup']:.1f}x", f"{r['ours_mse']:.4e}", f"{r['sklearn_mse']:.4e}",
             "yes" if r["ok"] else "NO"] for r in rows]
    if Console is None:
        print(title)
        for line in [headers, *body]:
            print("  ".join(f"{c:>12}" for c in line))
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in (label, "init") else "right")
    for line in body:
        table.add_row(*line)
    Console(width=max(Console().width, 150)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500k synthetic weights and 4 bits only")
    args = parser.parse_args()
    began = time.perf_counter()
    bits_list = (4,) if args.quick else (4, 5)
    import sklearn
    import threadpoolctl

    threads = {p["internal_api"]: p["num_threads"] for p in threadpoolctl.threadpool_info()}
    results: dict = {"machine": machine_info(sklearn=sklearn.__version__, blas_openmp_threads=threads), "quick": args.quick,
                     "settings": {"max_iter": MAX_ITER, "tol": TOL, "our_runs": OUR_RUNS, "mse_slack": MSE_SLACK}}

    nonzero = 500_000 if args.quick else 5_000_000
    values = pruned_normal(nonzero)
    synthetic = [{"name": "pruned-normal", **compare(values, bits, init)} for bits in bits_list for init in INITS]
    print_table(f"(a) synthetic layer, {nonzero:,} non-zero weights", synthetic, "layer")
    results["synthetic"] = synthetic

    layers = resnet20_layers()
    if layers is None:
        print(f"(b) skipped: {CHECKPOINT} not found")
        results["resnet20"] = None
    else:
        rows = [{"name": name, **compare(v, bits, init)}
                for bits in bits_list for name, v in layers.items() for init in INITS]
        print_table("(b) ResNet-20, each layer pruned 50%", rows, "layer")
        ours = sum(r["ours_s"] for r in rows)
        theirs = sum(r["sklearn_s"] for r in rows)
        results["resnet20"] = {"layers": rows, "ours_total_s": ours, "sklearn_total_s": theirs,
                               "all_ok": all(r["ok"] for r in rows)}
        print(f"ResNet-20 totals: ours {ours:.3f} s, scikit-learn {theirs:.2f} s ({theirs / ours:.0f}x); "
              f"MSE ok in {sum(r['ok'] for r in rows)}/{len(rows)} fits")

    results["summary"] = {
        "synthetic_min_speedup": min(r["speedup"] for r in synthetic),
        "synthetic_all_ok": all(r["ok"] for r in synthetic),
        "max_mse_ratio": max(r["mse_ratio"] for r in synthetic + (results["resnet20"] or {}).get("layers", [])),
    }
    results["runtime_s"] = time.perf_counter() - began
    summary = results["summary"]
    print(f"synthetic: min speed-up {summary['synthetic_min_speedup']:.1f}x, MSE ok: {summary['synthetic_all_ok']}; "
          f"max MSE ratio ours/sklearn {summary['max_mse_ratio']:.12f}")
    write_json(RESULTS, results, indent=1)
    print(f"runtime {results['runtime_s']:.1f} s; wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
