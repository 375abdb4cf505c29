"""The numbers people read are the numbers in the committed result files: the headline table of
README.md and docs/results.md, and the lab's tables, are exactly what scripts/headlines.py and
scripts/lab_tables.py make from bench/results/*.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_headline_tables_are_made_from_the_committed_runs():
    headlines = _script("headlines")
    summary = json.loads(headlines.RESULTS.read_text())
    for path, expected in headlines.render_docs(summary).items():
        assert path.read_text() == expected, f"{path.name}: run python scripts/headlines.py --tables"
    # every recipe's spread is over its runs, all of which are in the file; one seed is no headline
    readme = (ROOT / "README.md").read_text()
    readme = readme[readme.index(headlines.BEGIN):readme.index(headlines.END)]
    for name, agg in summary["recipes"].items():
        runs = [r for r in summary["runs"] if r["recipe"] == name]
        assert sorted(r["seed"] for r in runs) == agg["seeds"], name
        assert (f"`{name}`" in readme) == (len(runs) >= headlines.MIN_SEEDS), name
        assert agg["ratio"]["min"] == min(r["ratio"] for r in runs) and agg["ratio"]["max"] == max(r["ratio"] for r in runs)


def test_the_lab_tables_are_made_from_the_committed_results():
    lab = _script("lab_tables")
    text = lab.DOC.read_text()
    between = text[text.index(lab.BEGIN) + len(lab.BEGIN):text.index(lab.END)].strip()
    if not lab.RESULTS.exists():
        assert between == ""  # no result file, no numbers
        return
    assert between == lab.tables(json.loads(lab.RESULTS.read_text()))


def test_the_summary_of_a_run_reads_its_reference_and_its_file(tmp_path):
    headlines = _script("headlines")
    stages = [{"kind": "train", "accuracy": 0.99, "validation_accuracy": 0.995, "seconds": 10.0},
              {"kind": "prune", "accuracy": 0.9, "seconds": 1.0},
              {"kind": "encode", "accuracy": 0.985, "decoded_accuracy": 0.984, "file_bytes": 1000, "dense_bytes": 50000,
               "ratio": 50.0, "lab_estimate_ratio": 60.0, "sparsity": 0.9, "seconds": 2.0}]
    (tmp_path / "metrics.json").write_text(json.dumps({"recipe": {"name": "r", "seed": 3}, "stages": stages}))
    run = headlines.summarise_run(tmp_path)
    assert (run["dense_accuracy"], run["accuracy"], run["ratio"], run["seconds"]) == (0.99, 0.984, 50.0, 13.0)
    agg = headlines.aggregate([run, {**run, "seed": 4, "accuracy": 0.98, "ratio": 52.0}])["r"]
    assert agg["seeds"] == [3, 4] and agg["ratio"] == {"mean": 51.0, "min": 50.0, "max": 52.0}
    assert abs(agg["error"]["mean"] - 0.018) < 1e-12 and abs(agg["drop"]["max"] - 0.01) < 1e-12
