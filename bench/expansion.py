"""How far real compressed files expand when decoded: the basis of the loader's memory bound.

Usage: ``python bench/expansion.py [--demo-file PATH] [--quick] [--sparsities 0.99 0.999] [--out JSON]``.
Prints a table and writes bench/results/expansion.json (machine, versions, date, git SHA, every figure).
``--sparsities 0 --out bench/results/expansion-dense.json`` measures unpruned layers, the decoder's
worst case per element (every element is a decoded symbol, a position entry and an int64 position).

Files:
  (a) the demo: the ``demo-digits`` recipe's file (run here into a temporary folder unless
      ``--demo-file`` names one already made), digits MLP pruned 90%, 4-bit, Huffman.
  (b) synthetic sparse layers: a 2000x2000 Linear layer of Gaussian weights pruned 99% (and 99.9%)
      by percentile, 4-bit k-means, each coder, 5-bit (fc) and 8-bit (conv) relative indices.
      --quick uses 1000x1000.

Per file: coded elements per file byte (what ``max_expansion`` bounds), decoded float32 bytes
per file byte (every tensor), and the decoder's peak memory per coded element, measured as the
growth of the peak resident set size (Linux VmHWM, reset first) of a fresh process across a
second ``format.read_file`` (numba's allocations are invisible to tracemalloc).

On the 2-core development VM, 2026-11-29, shared with other jobs (load average ~18): --quick took
23 minutes with the demo run, and --sparsities 0 with --demo-file 3 minutes; an idle machine is
several times faster.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "expansion.json"

_PEAK_CHILD = """
import sys
from deepshrink.format import read_file


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


path = sys.argv[1]
read_file(path, max_expansion=1 << 30)  # imports and numba compilation happen before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size (Linux)
before = status("VmRSS")
header, tensors = read_file(path, max_expansion=1 << 30)
print(status("VmHWM") - before)
"""


def _peak_decode_bytes(path: Path) -> int:
    """Peak resident memory ``read_file`` adds in a fresh process (Linux ``VmHWM`` after a reset)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": src})
    return int(out.stdout.split()[-1])


def measure(path: Path, label: str, peak: bool = True) -> dict:
    from deepshrink.format import read_header

    header = read_header(path, max_expansion=1 << 30)
    file_bytes = path.stat().st_size
    coded = sum(int(torch.tensor(e["shape"]).prod()) for e in header["tensors"].values()
                if e["codec"] == "deep_compression")
    total = sum(int(torch.tensor(e["shape"]).prod()) for e in header["tensors"].values())
    row = {"file": label, "file_bytes": file_bytes, "coded_elements": coded,
           "elements_per_byte": coded / file_bytes, "float32_expansion": 4 * total / file_bytes}
    if peak:
        row["peak_decode_bytes"] = _peak_decode_bytes(path)
        row["peak_bytes_per_coded_element"] = row["peak_decode_bytes"] / coded
    return row


def synthetic(folder: Path, size: int, sparsity: float, coder: str, index_bits: int) -> Path:
    from deepshrink.encode import EncodeConfig
    from deepshrink.compress import compress_model
    from deepshrink.prune import PruneConfig, prune_model
    from deepshrink.quantize import QuantizeConfig, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(size, size, bias=False))
    prune_model(model, PruneConfig(method="percentile", q=100 * sparsity))
    quantize_model(model, QuantizeConfig(bits=4))
    path = folder / f"sparse{sparsity}-{coder}-{index_bits}.dsz"
    compress_model(model, path, EncodeConfig(coder=coder, index_bits_fc=index_bits))
    return path


def demo_file(folder: Path) -> Path:
    from deepshrink.pipeline import load_recipe, run_recipe

    result = run_recipe(load_recipe("demo-digits"), folder / "demo")
    return Path(result.stages[-1]["file"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-file", type=Path, help="an existing demo-digits model.dsz (skips the 15 s run)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.99, 0.999])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    size = 1000 if args.quick else 2000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo = args.demo_file or demo_file(folder)
        rows.append(measure(demo, "demo-digits (90% pruned, 4 bits, huffman)"))
        for sparsity in args.sparsities:
            for coder in ("huffman", "ans"):
                for index_bits in (5, 8):
                    path = synthetic(folder, size, sparsity, coder, index_bits)
                    rows.append(measure(path, f"{size}x{size} {100 * sparsity:g}% pruned, 4 bits, {coder}, "
                                              f"{index_bits}-bit index"))
    print(f"{'file':<55} {'bytes':>9} {'el/byte':>8} {'fp32 x':>7} {'peak B/el':>9}")
    for r in rows:
        print(f"{r['file']:<55} {r['file_bytes']:>9,} {r['elements_per_byte']:>8.1f} {r['float32_expansion']:>7.1f} "
              f"{r['peak_bytes_per_coded_element']:>9.1f}")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "git_sha": sha, "size": size, "rows": rows,
        "max_elements_per_byte": max(r["elements_per_byte"] for r in rows),
        "max_peak_bytes_per_coded_element": max(r["peak_bytes_per_coded_element"] for r in rows),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
