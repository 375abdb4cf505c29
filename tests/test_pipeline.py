"""Recipes end to end on tiny data, the real demo, and a resume after a killed run."""

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
    assert "an estimate, not a file size" in text  # the lab estimate never appears without its caveat
    # before pruning / after pruning / after quantization histograms, one PNG per layer, all linked
    histograms = sorted((tmp_path / "run" / "plots").glob("hist_*.png"))
    assert len(histograms) == len(result.layers)
    assert all(f"plots/{p.name}" in text for p in histograms)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"] == result.stages


def test_the_encode_stage_decodes_the_file_once(tmp_path, stream_decodes):
    dataset = {"name": "digits", "train_subset": 200, "test_subset": 50}
    stages = [("prune", {"q": 80}), ("quantize", {"bits": 3}), ("encode", {"coder": "huffman"})]
    result = run_recipe(Recipe("tiny", {"arch": "mlp", "kwargs": {}}, dataset, stages, device="cpu"), tmp_path / "run")
    assert len(result.layers) == 3  # the MLP's three quantized weights
    assert stream_decodes == ["huffman"] * 6  # load(): each weights and positions stream once


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
    stderr = tmp_path / "stderr.log"  # a file, not a pipe: a chatty child can never block on a full pipe
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while not (out / "02-prune" / "metrics.json").exists():
        assert proc.poll() is None, stderr.read_text()[-3000:]
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
