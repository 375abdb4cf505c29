"""Recipes end to end on tiny data, the real demo, and a resume after a killed run."""

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deepshrink.errors import ConfigError
from deepshrink.pipeline import Recipe, builtin_recipes, load_recipe, run_recipe


def write_mnist(root: Path, n_train=96, n_test=48, seed=0) -> Path:
    """Tiny MNIST in the official IDX gz layout: a bright square whose position encodes the label."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y : 2 * y + 6, 4:10] = 255
        header = np.array([0x803, n, 28, 28], ">u4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = np.array([0x801, n], ">u4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
    return root


def write_image_folder(root: Path, per_class=6, classes=("cat", "dog", "ship"), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                img[:, :, c] = 200
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def tiny_variant(recipe: Recipe, tmp_path: Path) -> Recipe:
    """The same stages with one epoch each, on synthetic files in the dataset's official format."""
    dataset = dict(recipe.dataset)
    if dataset["name"] == "mnist":
        dataset["root"] = str(write_mnist(tmp_path / "mnist"))
    elif dataset["name"] == "imagefolder":
        dataset["root"] = str(write_image_folder(tmp_path / "images"))
    else:
        dataset.update(train_subset=300, test_subset=100)
    if dataset.get("validation"):
        dataset["validation"] = 6
        dataset.pop("train_subset", None)
    stages = []
    for kind, options in recipe.stages:
        if kind == "load":  # the pretrained checkpoint is a fixture of ../shared; covered in test_models
            continue
        if kind in ("train", "finetune"):
            options = {**options, "epochs": 1, "batch_size": 32, "progress": False}
        stages.append((kind, options))
    return Recipe(recipe.name, recipe.model, dataset, stages, device="cpu")


# the shipped recipes, and the CPU-sized ones behind docs/results.md
RECIPES = builtin_recipes() + sorted(str(p) for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_runs_end_to_end_on_tiny_data(name, tmp_path):
    recipe = tiny_variant(load_recipe(name), tmp_path)
    result = run_recipe(recipe, tmp_path / "run")
    kinds = [s["kind"] for s in result.stages]
    assert kinds == [k for k, _ in recipe.stages]
    final = result.stages[-1]
    assert final["kind"] == "encode"
    assert final["file_bytes"] == (tmp_path / "run" / final["dir"] / "model.dsz").stat().st_size
    # the decoded file is the quantized model: same accuracy as the stage before encoding
    assert final["decoded_accuracy"] == pytest.approx(result.stages[-2]["accuracy"], abs=1e-9)
    text = (tmp_path / "run" / "report.md").read_text()
    assert text.startswith(f"# {recipe.name}")
    # before pruning / after pruning / after quantization histograms, one PNG per layer, all linked
    histograms = sorted((tmp_path / "run" / "plots").glob("hist_*.png"))
    assert len(histograms) == len(result.layers)
    assert all(f"plots/{p.name}" in text for p in histograms)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"] == result.stages


@pytest.mark.slow
def test_demo_recipe_meets_its_promise(tmp_path):
    """The README's demo: >= 80% pruned after retraining, accuracy within 1 point of the dense model."""
    stages = {s["kind"] + str(s["stage"]): s for s in run_recipe(load_recipe("demo-digits"), tmp_path).stages}
    dense, pruned, retrained = stages["train1"], stages["prune2"], stages["finetune3"]
    centroids, encoded = stages["finetune5"], stages["encode6"]
    assert retrained["sparsity"] >= 0.80 and pruned["sparsity"] == retrained["sparsity"]
    assert retrained["accuracy"] >= dense["accuracy"] - 0.01
    assert centroids["accuracy"] >= retrained["accuracy"] - 0.01
    assert encoded["decoded_accuracy"] == centroids["accuracy"]
    assert encoded["ratio"] > 10


def test_resume_after_a_killed_run_gives_the_same_result(tmp_path):
    recipe = {
        "name": "resume-test",
        "model": {"arch": "mlp"},
        "dataset": {"name": "digits"},
        "device": "cpu",
        "stages": [
            {"train": {"epochs": 2, "progress": False}},
            {"prune": {"q": 80}},
            {"finetune": {"epochs": 60, "lr": 0.01, "progress": False}},  # long enough to be killed in
            {"quantize": {"bits": 3}},
            {"encode": {}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "deepshrink.cli", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "02-prune" / "metrics.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "stage 2 never completed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.md").exists(), "the run finished before it could be killed"
    assert not (out / "03-finetune" / "metrics.json").exists()

    resumed = run_recipe(Recipe.from_dict(recipe), out, resume=True)
    fresh = run_recipe(Recipe.from_dict(recipe), tmp_path / "fresh")
    strip = lambda stages: [{k: v for k, v in s.items() if k not in ("seconds", "file")} for s in stages]
    assert strip(resumed.stages) == strip(fresh.stages)


def test_an_existing_run_folder_is_not_silently_overwritten(tmp_path):
    recipe = Recipe.from_dict({"model": "mlp", "dataset": {"name": "digits", "train_subset": 50, "test_subset": 20},
                               "stages": [{"prune": {"q": 10}}]})
    run_recipe(recipe, tmp_path)
    with pytest.raises(ConfigError, match="--resume"):
        run_recipe(recipe, tmp_path)
    other = Recipe.from_dict({**recipe.to_dict(), "stages": [{"prune": {"q": 20}}]})
    with pytest.raises(ConfigError, match="different recipe"):
        run_recipe(other, tmp_path, resume=True)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dataset": "digits", "stages": []}, "missing key"),
        ({"model": "mlp", "dataset": "digits", "stages": [{"bake": {}}]}, "unknown kind 'bake'"),
        ({"model": "mlp", "dataset": "digits", "stages": [{"prune": {"qq": 5}}]}, r"unknown option\(s\) \['qq'\]"),
    ],
)
def test_bad_recipes_name_the_problem(raw, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_recipe(Recipe.from_dict(raw), tmp_path)


def test_load_splits_carves_a_fixed_validation_split_out_of_training():
    from deepshrink.data import load_dataset
    from deepshrink.pipeline import load_splits

    full = load_dataset("digits", split="train")
    train, validation, test = load_splits({"name": "digits", "validation": 200, "train_subset": 500})
    again = load_splits({"name": "digits", "validation": 200})
    assert len(validation) == 200 and len(train) == 500 and len(test) == len(load_dataset("digits", split="test"))
    rows = lambda d: {bytes(x.numpy().tobytes()) + bytes([int(y)]) for x, y in zip(d.images, d.labels)}  # noqa: E731
    assert rows(validation).isdisjoint(rows(train)) and rows(validation).isdisjoint(rows(again.train))
    assert rows(validation) == rows(again.validation) and len(again.train) == len(full) - 200
    assert load_splits({"name": "digits"}).validation is None
    with pytest.raises(ConfigError, match="'validation' must be a number"):
        load_splits({"name": "digits", "validation": "10%"})


def test_selection_never_reads_the_test_split(tmp_path, monkeypatch):
    """keep_best and patience choose on validation: a test split whose labels are all wrong chooses the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: one thread avoids OpenMP hand-offs on a shared machine
    raw = {"model": "mlp", "dataset": {"name": "digits", "validation": 300, "train_subset": 400}, "device": "cpu",
           "stages": [{"train": {"epochs": 5, "lr": 0.5, "schedule": "constant", "keep_best": True, "patience": 2,
                                 "batch_size": 32, "progress": False}},
                      {"prune": {"q": 80}},
                      {"finetune": {"epochs": 2, "lr": 0.2, "keep_best": True, "batch_size": 32, "progress": False}}]}
    try:
        _compare_honest_and_corrupt_runs(raw, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _compare_honest_and_corrupt_runs(raw, tmp_path, monkeypatch):
    from deepshrink import pipeline
    from deepshrink.checkpoint import load_checkpoint

    honest = run_recipe(Recipe.from_dict(raw), tmp_path / "honest")

    real_load = pipeline.load_dataset

    def wrong_test_labels(name, root, split):
        data = real_load(name, root, split)
        if split == "test":  # every test label moved to another class: test accuracy collapses
            data = dataclasses.replace(data, labels=(data.labels + 1) % data.num_classes)
        return data

    monkeypatch.setattr(pipeline, "load_dataset", wrong_test_labels)
    corrupt = run_recipe(Recipe.from_dict(raw), tmp_path / "corrupt")

    for a, b in zip(honest.stages, corrupt.stages):
        assert a.get("best_epoch") == b.get("best_epoch") and a["validation_accuracy"] == b["validation_accuracy"]
        assert b["accuracy"] < min(0.2, a["accuracy"])  # the corrupt test split really was the one evaluated
    assert honest.stages[0]["best_epoch"] is not None and honest.stages[2]["best_epoch"] is not None
    for stage in ("01-train", "03-finetune"):
        w1 = load_checkpoint(tmp_path / "honest" / stage / "checkpoint.pt")[0].state_dict()
        w2 = load_checkpoint(tmp_path / "corrupt" / stage / "checkpoint.pt")[0].state_dict()
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
