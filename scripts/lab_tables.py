"""The lab's tables from scripts/lab_tables.sh's outputs: bench/results/lab-tables.json, and the tables in
docs/results.md (between the lab markers) rewritten from it, beside the lab's own numbers.

Usage: python scripts/lab_tables.py OUT RUN_DIR --data-dir DIR     (the arguments scripts/lab_tables.sh passes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "lab-tables.json"
DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- lab:begin -->", "<!-- lab:end -->"
#: The lab's (the seed's) published numbers: ResNet-20 on official CIFAR-10, q=50 + 4 bits + Huffman.
LAB = {"dense_accuracy": 0.917, "accuracy": 0.902, "estimate_fraction": 0.042}


def collect(out: Path, run: Path, data_dir: str | None) -> dict:
    import deepshrink
    from deepshrink.format import open_file
    from deepshrink.stages import StageContext
    from deepshrink.train import evaluate

    dense = json.loads((run / "02-train" / "metrics.json").read_text())  # the recipe's stage 2: the dense reference
    sweeps = {kind: json.loads((out / kind / "sweep.json").read_text())["rows"]
              for kind in ("prune-std", "prune-percentile", "bits", "init")}
    path = out / "q50-4bit-huffman.dsz"
    file = open_file(path)
    report = file.report()
    ctx = StageContext.for_dataset(file.dataset, data_dir=data_dir, device="cpu")
    accuracy = evaluate(deepshrink.load(file), ctx.splits.test)["accuracy"]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"date": datetime.date.today().isoformat(), "git": git.stdout.strip(), "run": run.name,
            "dense_accuracy": dense["accuracy"], "sweeps": sweeps,
            "end_to_end": {"accuracy": accuracy, "file_bytes": report.file_bytes, "ratio": report.ratio,
                           "entropy_bound_ratio": report.entropy_bound_ratio,
                           "lab_estimate_ratio": report.lab_estimate_ratio}, "lab": LAB}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _drop(dense: float, x) -> str:
    return "-" if x is None else f"{100 * (dense - x):.2f}"


def tables(r: dict) -> str:
    d = r["dense_accuracy"]
    out = [f"Dense reference (the run's stage 2): **{_pct(d)}** test accuracy (the lab's: {_pct(LAB['dense_accuracy'])} on "
           "official CIFAR-10; compare drops).", ""]
    for kind, amount, label in (("prune-std", "s", "s (prune \\|w\\| < s x std)"), ("prune-percentile", "q", "q (percent pruned per layer)")):
        out += [f"| {label} | sparsity | accuracy | drop | after 2 epochs of retraining | drop |", "|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {row[amount]:g} | {_pct(row['sparsity'])} | {_pct(row['accuracy'])} | {_drop(d, row['accuracy'])} | "
                f"{_pct(row['retrained_accuracy'])} | {_drop(d, row['retrained_accuracy'])} |" for row in r["sweeps"][kind]]
        out.append("")
    for kind, label in (("bits", "bits (linear init)"), ("init", "init (4 bits)")):
        out += [f"| {label} | after quantization | after 1 epoch of centroid training | drop |", "|---|---:|---:|---:|"]
        out += [f"| {row[kind]} | {_pct(row['accuracy'])} | {_pct(row['retrained_accuracy'])} | "
                f"{_drop(d, row['retrained_accuracy'])} |" for row in r["sweeps"][kind]]
        out.append("")
    e = r["end_to_end"]
    lab_drop = LAB["dense_accuracy"] - LAB["accuracy"]
    out += ["| q=50 + 4 bits + Huffman | accuracy | drop | honest ratio (file) | entropy bound | lab's estimate |",
            "|---|---:|---:|---:|---:|---:|",
            f"| the lab (official CIFAR-10) | {_pct(LAB['accuracy'])} | {100 * lab_drop:.2f} | not measured | | "
            f"{1 / LAB['estimate_fraction']:.1f}x |",
            f"| this run ({e['file_bytes']:,} B) | {_pct(e['accuracy'])} | {_drop(d, e['accuracy'])} | **{e['ratio']:.1f}x** | "
            f"{e['entropy_bound_ratio']:.1f}x | {e['lab_estimate_ratio']:.1f}x |",
            "", f"Difference in drops, ours minus the lab's: {100 * (d - e['accuracy'] - lab_drop):+.2f} points."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("run", type=Path, nargs="?")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.out:
        RESULTS.write_text(json.dumps(collect(args.out, args.run, args.data_dir), indent=2) + "\n")
    text = DOC.read_text()
    begin, end = text.index(BEGIN), text.index(END) + len(END)
    DOC.write_text(text[:begin] + f"{BEGIN}\n{tables(json.loads(RESULTS.read_text()))}\n{END}" + text[end:])
    print(f"rewrote the lab's tables in {DOC.relative_to(ROOT)} from {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
