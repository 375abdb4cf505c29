"""Speed of the context-adaptive level coder (``deepshrink.coding.level_coder``) on VGG-16-sized tensors:
this checkout against a baseline revision of it, interleaved in one process, and against NNCodec's DeepCABAC.

Usage: ``python bench/level_coder_speed.py [--runs 5] [--baseline REV] [--quick] [--nnc-venv /tmp/nnc-venv]``.
Prints a table and writes bench/results/level-coder-speed.json (machine, date, git SHA, every time).

Tensors (synthetic, seeded): Laplacian weights with a per-row scale, pruned by magnitude to the listed
share of zeros; the survivors on a uniform grid of ``max_abs`` levels per side above the pruning threshold,
so level +-1 holds the smallest kept magnitudes and the level counts fall off geometrically, as the codebook
ranks of a k-means-quantized pruned layer do (``codecs.cabac.indices_to_levels``). Shapes are VGG-16's fc6,
fc7 and a 512x512x3x3 conv; 5-bit layers have max_abs 15, 8-bit 127, 4-bit 7.

For each tensor and each implementation (``new`` = this checkout, ``base`` = ``level_coder.py`` of
``--baseline``, loaded from git into a temporary module): ``encode`` (``level_coder.encode``), ``decode``
(``level_coder.decode``: the int32 levels) and ``weight`` (the float32 weight from the stream: the
``cabac`` codec's ``decode_cabac`` for ``new``; the baseline's decode plus the baseline's glue, copied
below, for ``base``). Each is timed ``--runs`` times, A/B alternating which goes first, in one thread
(numba compiled beforehand), by the thread's CPU time and by the wall clock; the table gives the medians
as levels/s of CPU time (the coder's own speed also on a shared machine) and MB/s of float32 output (4
bytes a level), the JSON every time. Both implementations' streams are checked byte-identical and both
decodes equal.

NNCodec (``--nnc-venv``, made by ``bench/nnc.py --setup``): its DeepCABAC coder (the C++ ``deepCABAC``
extension NNCodec's bitstream writer calls, without dependent quantization) encodes and decodes the same
integer levels in its own environment through ``bench/nnc_deepcabac_worker.py``, timed the same way;
skipped with the reason when the environment is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deepshrink.codecs.cabac import CabacTensor, decode_cabac
from deepshrink.coding import level_coder, level_kernels

from common import ROOT, machine_info, write_json

RESULTS = ROOT / "bench" / "results" / "level-coder-speed.json"
NNC_WORKER = ROOT / "bench" / "nnc_deepcabac_worker.py"
BASELINE = "5a8e698"  # the last commit before issue 26's optimised coder

#: name -> (shape, share of zeros, max_abs, context model)
TENSORS = {
    "fc6 5-bit": ((4096, 25088), 0.92, 15, level_coder.CONTEXT_MODEL),
    "fc7 5-bit": ((4096, 4096), 0.91, 15, level_coder.CONTEXT_MODEL),
    "conv 8-bit": ((512, 512, 3, 3), 0.90, 127, level_coder.CONTEXT_MODEL),
    "conv 4-bit": ((512, 512, 3, 3), 0.95, 7, level_coder.CONTEXT_MODEL),
    "conv 8-bit legacy": ((512, 512, 3, 3), 0.90, 127, level_coder.LEGACY_CONTEXT_MODEL),
    "conv 8-bit dq": ((512, 512, 3, 3), 0.90, 127, level_coder.DEPENDENT_CONTEXT_MODEL),
}
QUICK_ROWS = 512  # --quick: fc6 and fc7 keep their first rows only


def synthetic_levels(shape: tuple[int, ...], zeros: float, max_abs: int, seed: int) -> np.ndarray:
    """int32 levels (see the module docstring), C order, shaped ``shape``."""
    rng = np.random.default_rng(seed)
    rows = shape[0]
    weights = rng.laplace(size=shape).astype(np.float32) * rng.uniform(0.5, 2.0, (rows,) + (1,) * (len(shape) - 1))
    magnitude = np.abs(weights)
    threshold = np.quantile(magnitude.reshape(-1)[: 1 << 22], zeros)
    step = (magnitude.max() - threshold) / max_abs
    levels = np.minimum(1 + ((magnitude - threshold) / step).astype(np.int32), max_abs)
    levels = np.where(magnitude > threshold, np.where(weights < 0, -levels, levels), 0).astype(np.int32)
    return levels


def dependent_levels(levels: np.ndarray) -> np.ndarray:
    """Levels j that dependent quantization's state machine allows, from any levels taken as its k."""
    k = levels.reshape(-1)
    parity = np.abs(k) & 1
    state = np.zeros(k.size, dtype=np.int64)
    s = 0
    table = level_kernels.DQ_NEXT
    for i, p in enumerate(parity.tolist()):  # a few seconds at most: the bench tensors are small enough
        state[i] = s
        s = table[s, p]
    quantizer = state & 1
    return (2 * k - np.sign(k) * quantizer).astype(np.int32).reshape(levels.shape)


def load_baseline(rev: str):
    """``level_coder.py`` as of ``rev``, imported as a separate module (its numba cache in a temp dir)."""
    source = subprocess.run(["git", "show", f"{rev}:src/deepshrink/coding/level_coder.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="level-coder-baseline-"))
    path = folder / "level_coder_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("level_coder_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache finds a module's globals by its name
    spec.loader.exec_module(module)
    return module


def baseline_tensor_decode(coder, stream: bytes, params: dict, shape, num_nonzero: int, codebook: np.ndarray,
                           num_negative: int) -> np.ndarray:
    """The float32 weight as the baseline's glue made it (codecs/common.decode_levels_stream,
    codecs/cabac.decode_levels and levels_to_values as of BASELINE, its checks included)."""
    levels = np.asarray(coder.decode(stream, params, math.prod(shape)))
    assert int(np.count_nonzero(levels)) == num_nonzero
    low, high = int(levels.min()), int(levels.max())
    assert -num_negative <= low and high <= len(codebook) - num_negative
    levels = levels.astype(np.int64)
    slot = levels + num_negative - (levels > 0)
    table = np.concatenate([codebook.astype(np.float32), np.zeros(1, np.float32)])
    return table[np.where(levels == 0, codebook.size, slot)].reshape(shape)


def timed(fn) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call: on a shared machine the CPU time is the coder's own."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def nnc_times(venv: Path, levels: np.ndarray, runs: int, work: Path) -> dict:
    """NNCodec's DeepCABAC on ``levels`` in its environment: {"encode_s": [...], "decode_s": [...], "bytes"}
    or {"error": why}."""
    python = venv / "bin" / "python"
    if not python.exists():
        return {"error": f"no NNCodec environment at {venv} (python bench/nnc.py --setup makes one)"}
    source = work / "levels.npy"
    np.save(source, levels)
    done = subprocess.run([str(python), str(NNC_WORKER), str(source), str(runs)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        return {"error": f"worker failed: {done.stderr.strip().splitlines()[-3:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_row(name: str, count: int, zeros: float, size: int, what: str, speeds: dict) -> str:
    nnc = (f"{speeds['nnc_Mlevels_per_s']:>7.1f} {speeds['new_vs_nnc']:>7.2f}" if "new_vs_nnc" in speeds
           else f"{'-':>7} {'-':>7}")
    return (f"{name:<18} {count:>11,} {zeros:>6.3f} {size:>10,} {what:<7} {speeds['base_Mlevels_per_s']:>7.1f} "
            f"{speeds['new_Mlevels_per_s']:>7.1f} {speeds['new_MBps']:>8.0f} {speeds['speedup']:>8.2f} {nnc} "
            f"{speeds['new_wall_MBps']:>9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", default=BASELINE, help="git revision whose level_coder.py is the baseline")
    parser.add_argument("--quick", action="store_true", help=f"fc layers cut to {QUICK_ROWS} rows")
    parser.add_argument("--only", nargs="*", help="tensor names to run (default: all)")
    parser.add_argument("--nnc-venv", type=Path, default=Path(os.environ.get("NNC_VENV", "/tmp/nnc-venv")))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = load_baseline(args.baseline)
    threads = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    results = {"machine": machine_info(baseline=args.baseline, threads=threads), "runs": args.runs,
               "quick": args.quick, "tensors": []}
    for coder in (base, level_coder):  # compile both outside the timings
        payload, params = coder.encode(np.array([0, 3, -1, 0, 2, 0]), 3)
        coder.decode(payload, params, 6)
    print("Mlevels/s of thread CPU time (wall-clock MB/s of float32 in the last column), medians of "
          f"{args.runs} runs\n{'tensor':<18} {'levels':>11} {'zeros':>6} {'bytes':>10} {'what':<7} {'base':>7} "
          f"{'new':>7} {'new MB/s':>8} {'new/base':>8} {'nnc':>7} {'new/nnc':>7} {'wall MB/s':>9}")
    for seed, (name, (shape, zeros, max_abs, model)) in enumerate(TENSORS.items()):
        if args.only and name not in args.only:
            continue
        if args.quick and len(shape) == 2:
            shape = (min(shape[0], QUICK_ROWS), shape[1])
        levels = synthetic_levels(shape, zeros, max_abs, seed)
        if model == level_coder.DEPENDENT_CONTEXT_MODEL:
            levels = dependent_levels(levels)
        flat = levels.reshape(-1)
        row_length = math.prod(shape[1:])
        count = flat.size
        widest = int(np.abs(flat).max())
        codebook = np.arange(-widest, widest + 1, dtype=np.float32)
        codebook = codebook[codebook != 0] / widest  # level order: -widest..-1, 1..widest
        stream, params = level_coder.encode(flat, row_length, context_model=model)
        assert base.encode(flat, row_length, context_model=model) == (stream, params), "streams differ"
        num_nonzero = int(np.count_nonzero(flat))
        tensor = CabacTensor(shape=shape, bits=max(1, math.ceil(math.log2(codebook.size))), codebook=codebook,
                             num_negative=widest, num_nonzero=num_nonzero, stream=stream, coder_params=params)
        jobs = {
            "encode": {"base": lambda: base.encode(flat, row_length, context_model=model),
                       "new": lambda: level_coder.encode(flat, row_length, context_model=model)},
            "decode": {"base": lambda: base.decode(stream, params, count),
                       "new": lambda: level_coder.decode(stream, params, count)},
            "weight": {"base": lambda: baseline_tensor_decode(base, stream, params, shape, num_nonzero, codebook,
                                                              widest),
                       "new": lambda: decode_cabac(tensor)},
        }
        assert np.array_equal(jobs["decode"]["new"](), flat)
        assert np.array_equal(jobs["weight"]["new"](), jobs["weight"]["base"]())
        times = {what: {"base": [], "new": [], "base_wall": [], "new_wall": []} for what in jobs}
        for run in range(args.runs):
            for what, pair in jobs.items():
                for impl in (("base", "new") if run % 2 == 0 else ("new", "base")):
                    cpu, wall = timed(pair[impl])
                    times[what][impl].append(cpu)
                    times[what][f"{impl}_wall"].append(wall)
        if model == level_coder.DEPENDENT_CONTEXT_MODEL:
            nnc = {"error": "dependent quantization's levels: NNCodec codes them with its own state machine"}
        elif model == level_coder.LEGACY_CONTEXT_MODEL:
            nnc = {"error": "the same levels as 'conv 8-bit'"}
        else:
            with tempfile.TemporaryDirectory() as work:
                nnc = nnc_times(args.nnc_venv, levels, args.runs, Path(work))
        row = {"tensor": name, "shape": list(shape), "levels": count, "zeros": 1 - num_nonzero / count,
               "max_abs": widest, "context_model": model, "bytes": len(stream), "seconds": times, "nnc": nnc}
        for what in jobs:
            median = {impl: float(np.median(t)) for impl, t in times[what].items()}
            for suffix in ("", "_wall"):
                if nnc.get(f"{what}{suffix}_s"):
                    median[f"nnc{suffix}"] = float(np.median(nnc[f"{what}{suffix}_s"]))
            row[what] = {
                **{f"{impl}_Mlevels_per_s": count / s / 1e6 for impl, s in median.items()},
                **{f"{impl}_MBps": 4 * count / s / 1e6 for impl, s in median.items()},
                "speedup": median["base"] / median["new"],
            }
            if "nnc" in median:
                row[what]["new_vs_nnc"] = median["nnc"] / median["new"]
            print(table_row(name, count, row["zeros"], len(stream), what, row[what]), flush=True)
        if "error" in nnc:
            print(f"{'':<18} NNCodec: {nnc['error']}")
        elif "bytes" in nnc:
            print(f"{'':<18} NNCodec DeepCABAC stream: {nnc['bytes']:,} bytes (ours {len(stream):,})")
        results["tensors"].append(row)
    write_json(args.out, results)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
