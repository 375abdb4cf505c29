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
#: The lab's published numbers: ResNet-20 on official CIFAR-10, q=50 + 4 bits + Huffman.
LAB = {"dense_accuracy": 0.917, "accuracy": 0.902, "estimate_fraction": 0.042}
#: The seed's short runs of the same experiments (docs/log.md, 2026-11-28/29): one epoch over 15,000
#: images per pruning point from an 85.78% dense model; weight sharing of an 85.09% q=50 model (from
#: 85.84%) without centroid training; the end-to-end run one epoch over 10,000 images per stage.
#: Each entry: the dense accuracy the drops are taken from, and the accuracy per point.
SEED = {
    "prune-std": (0.8578, {0: 0.8604, 0.25: 0.8605, 0.5: 0.8594, 1.0: 0.8195}),  # after retraining
    "prune-percentile": (0.8578, {0: 0.8604, 25: 0.8600, 50: 0.8544, 75: 0.8059}),  # after retraining
    "bits": (0.8584, {6: 0.8514, 5: 0.8489, 4: 0.8357, 3: 0.7902}),  # after quantization
    "init": (0.8584, {"random": 0.8318, "density": 0.8257, "linear": 0.8357, "kmeans++": 0.8322}),
    "end_to_end": {"dense_accuracy": 0.8584, "accuracy": 0.8478, "file_bytes": 107_440, "ratio": 10.1,
                   "entropy_bound_ratio": 10.2, "lab_estimate_ratio": 18.2},
}


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


def _points(dense: float, x) -> str:
    return "-" if x is None else f"{100 * (dense - x):.2f}"


def _seed_columns(kind: str, point, drop: float | None) -> str:
    """The seed's drop at ``point`` and ours minus it (negative: the full-length run loses less)."""
    seed_dense, accuracies = SEED[kind]
    if point not in accuracies or drop is None:
        return "- | -"
    seed_drop = seed_dense - accuracies[point]
    return f"{100 * seed_drop:.2f} | {100 * (drop - seed_drop):+.2f}"


def tables(r: dict) -> str:
    d = r["dense_accuracy"]
    drop = lambda x: None if x is None else d - x
    out = [f"Dense reference (the run's stage 2): **{_pct(d)}** test accuracy. Drops are in points below each "
           "run's own dense model; \"seed\" is the short version of each experiment (one epoch of 10,000-15,000 "
           "images, `docs/log.md`), and \"change\" is our drop minus the seed's (negative: less lost).", ""]
    for kind, amount, label in (("prune-std", "s", "s (prune \\|w\\| < s x std)"),
                                ("prune-percentile", "q", "q (percent pruned per layer)")):
        out += [f"| {label} | sparsity | accuracy | drop | after 2 epochs of retraining | drop | seed's drop | change |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {row[amount]:g} | {_pct(row['sparsity'])} | {_pct(row['accuracy'])} | {_points(d, row['accuracy'])} | "
                f"{_pct(row['retrained_accuracy'])} | {_points(d, row['retrained_accuracy'])} | "
                f"{_seed_columns(kind, row[amount], drop(row['retrained_accuracy']))} |" for row in r["sweeps"][kind]]
        out.append("")
    for kind, label in (("bits", "bits (linear init)"), ("init", "init (4 bits)")):
        out += [f"| {label} | after quantization | drop | seed's drop | change | after 1 epoch of centroid training | drop |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {row[kind]} | {_pct(row['accuracy'])} | {_points(d, row['accuracy'])} | "
                f"{_seed_columns(kind, row[kind], drop(row['accuracy']))} | {_pct(row['retrained_accuracy'])} | "
                f"{_points(d, row['retrained_accuracy'])} |" for row in r["sweeps"][kind]]
        out.append("")
    e, seed = r["end_to_end"], SEED["end_to_end"]
    out += ["| q=50 + 4 bits + Huffman | accuracy | drop | honest ratio (file) | entropy bound | lab's estimate |",
            "|---|---:|---:|---:|---:|---:|",
            f"| the lab (official CIFAR-10) | {_pct(LAB['accuracy'])} | {_points(LAB['dense_accuracy'], LAB['accuracy'])} | "
            f"not measured | | {1 / LAB['estimate_fraction']:.1f}x |",
            f"| the seed ({seed['file_bytes']:,} B) | {_pct(seed['accuracy'])} | "
            f"{_points(seed['dense_accuracy'], seed['accuracy'])} | {seed['ratio']:.1f}x | "
            f"{seed['entropy_bound_ratio']:.1f}x | {seed['lab_estimate_ratio']:.1f}x |",
            f"| this run ({e['file_bytes']:,} B) | {_pct(e['accuracy'])} | {_points(d, e['accuracy'])} | **{e['ratio']:.1f}x** | "
            f"{e['entropy_bound_ratio']:.1f}x | {e['lab_estimate_ratio']:.1f}x |"]
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
