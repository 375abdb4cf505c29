"""Summarise recipe runs (several seeds each) into bench/results/headlines.json, and the README's and
docs/results.md's headline tables from it.

Usage (from the repository root; run folders are what `deepshrink run NAME --seed S --out DIR` wrote):

    python scripts/headlines.py runs/lenet300-s0 runs/lenet300-s1 ... --out bench/results/headlines.json
    python scripts/headlines.py --tables        # rewrite the tables in README.md and docs/results.md from the JSON

Per run: the recipe, its seed, the dense reference (the model the recipe first prunes), the decoded
file's test and validation accuracy, its bytes and ratio, and the wall-clock of all its stages. Per
recipe: mean, min and max over the seeds. A recipe with one finished seed is not a headline (it states
no spread): it goes to a table of its own in docs/results.md, never to the README. tests/test_headlines.py checks that the tables in the docs
are the ones this script makes from the committed JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "headlines.json"
BEGIN, END = "<!-- headlines:begin -->", "<!-- headlines:end -->"
SINGLE_BEGIN, SINGLE_END = "<!-- single-seed:begin -->", "<!-- single-seed:end -->"
DOCS = (ROOT / "README.md", ROOT / "docs" / "results.md")
MIN_SEEDS = 2  # a headline states its spread over at least this many seeds

#: What the table says of each recipe: model and data, and the reference result to read it against.
RECIPES = {
    "demo-digits": ("digits MLP (the demo)", "sklearn digits", "dense MLP"),
    "digits-60x": ("digits MLP", "sklearn digits", "dense MLP"),
    "lenet300-mnist-100x": ("LeNet-300-100", "MNIST", "paper: 40x at 1.58%"),
    "lenet5-mnist-130x": ("LeNet-5", "MNIST", "paper: 39x at 0.74%"),
    "resnet20-cifar10-25x": ("ResNet-20", "CIFAR-10 JPEG", "lab: q=50 + 4 bits, est. 24x"),
    "resnet56-cifar10-ecsq": ("ResNet-56", "CIFAR-10 JPEG", "-"),
}


def summarise_run(run_dir: Path) -> dict:
    """One finished run: its recipe, seed, reference, file and wall-clock."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    recipe, stages = metrics["recipe"], metrics["stages"]
    kinds = [s["kind"] for s in stages]
    first_prune = kinds.index("prune")
    reference = stages[first_prune - 1]  # the dense model the recipe prunes
    final = stages[-1]
    if final["kind"] != "encode":
        raise SystemExit(f"{run_dir}: the run's last stage is {final['kind']!r}, not encode")
    return {
        "run": run_dir.name, "recipe": recipe["name"], "seed": recipe["seed"],
        "dense_accuracy": reference["accuracy"], "dense_validation_accuracy": reference.get("validation_accuracy"),
        "accuracy": final["decoded_accuracy"], "validation_accuracy": final.get("decoded_validation_accuracy"),
        "file_bytes": final["file_bytes"], "dense_bytes": final["dense_bytes"], "ratio": final["ratio"],
        "lab_estimate_ratio": final["lab_estimate_ratio"], "sparsity": final["sparsity"],
        "seconds": round(sum(s["seconds"] for s in stages), 1),
    }


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def aggregate(runs: list[dict]) -> dict:
    """Per recipe: the seeds, and mean/min/max of test error, drop from the dense reference, ratio, bytes, time."""
    out = {}
    for name in sorted({r["recipe"] for r in runs}):
        mine = sorted((r for r in runs if r["recipe"] == name), key=lambda r: r["seed"])
        out[name] = {
            "seeds": [r["seed"] for r in mine],
            "error": _spread([1 - r["accuracy"] for r in mine]),
            "dense_error": _spread([1 - r["dense_accuracy"] for r in mine]),
            "drop": _spread([r["dense_accuracy"] - r["accuracy"] for r in mine]),
            "ratio": _spread([r["ratio"] for r in mine]),
            "file_bytes": _spread([r["file_bytes"] for r in mine]),
            "minutes": _spread([r["seconds"] / 60 for r in mine]),
        }
    return out


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _duration(minutes: float) -> str:
    return f"{60 * minutes:.0f} s" if minutes < 2 else f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def headline_table(summary: dict, single: bool = False) -> str:
    """The markdown table of the recipes with ``MIN_SEEDS`` or more seeds (``single``: of those with fewer):
    mean over seeds, with the range."""
    lines = []
    for name, agg in summary["recipes"].items():
        if (len(agg["seeds"]) < MIN_SEEDS) != single:
            continue
        model, data, reference = RECIPES.get(name, (name, "", "-"))
        e, d, r, b, m = agg["error"], agg["drop"], agg["ratio"], agg["file_bytes"], agg["minutes"]
        error_range = f" ({_pct(e['min'])}-{_pct(e['max'])})" if not single else ""
        drop_range = f" ({100 * d['min']:+.2f} to {100 * d['max']:+.2f})" if not single else ""
        ratio_range = f" ({r['min']:.1f}-{r['max']:.1f})" if not single else ""
        lines.append(
            f"| {model}, {data} | `{name}` | {len(agg['seeds'])} | **{_pct(e['mean'])}**{error_range} | "
            f"{100 * d['mean']:+.2f} pts{drop_range} | **{r['mean']:.1f}x**{ratio_range} | {b['mean'] / 1000:,.1f} KB | {reference} | "
            f"{_duration(m['mean'])} |")
    if not lines:
        return ""
    spread = "" if single else ": mean (range)"
    header = (f"| model, data | recipe (`deepshrink run NAME`) | seeds | test error{spread} | drop from its dense "
              f"model{spread} | ratio on disk{spread} | file | reference | wall-clock |")
    intro = ["Recipes with one finished seed so far: not headlines until a second seed states their spread.", ""]
    return "\n".join([*(intro if single else []), header, "|---|---|---:|---:|---:|---:|---:|---|---:|", *lines])


def render_docs(summary: dict) -> dict[Path, str]:
    """Each doc with its tables between the markers replaced by the ones the summary makes (the single-seed
    table only where a doc has its markers)."""
    out = {}
    for path in DOCS:
        text = _replace(path.read_text(), BEGIN, END, headline_table(summary))
        if SINGLE_BEGIN in text:
            text = _replace(text, SINGLE_BEGIN, SINGLE_END, headline_table(summary, single=True))
        out[path] = text
    return out


def _replace(text: str, begin_marker: str, end_marker: str, table: str) -> str:
    begin, end = text.index(begin_marker), text.index(end_marker) + len(end_marker)
    return f"{text[:begin]}{begin_marker}\n{table}\n{end_marker}{text[end:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="finished run folders (several seeds of each recipe)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tables", action="store_true", help="rewrite the docs' tables from the JSON")
    args = parser.parse_args()
    if args.runs:
        runs = [summarise_run(d) for d in args.runs]
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        summary = {"machine": _machine(), "date": datetime.date.today().isoformat(), "git": git.stdout.strip(),
                   "runs": runs, "recipes": aggregate(runs)}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out}")
    summary = json.loads(args.out.read_text())
    print(headline_table(summary))
    if args.tables:
        for path, text in render_docs(summary).items():
            path.write_text(text)
            print(f"rewrote the table in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
