"""Recipes end to end on tiny data, the real demo, and a resume after a killed run."""

import dataclasses
import gzip
import json
import logging
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

from deepshrink.data import load_splits
from deepshrink.encode import EncodeConfig
from deepshrink.errors import ConfigError
from deepshrink.pipeline import Recipe, builtin_recipes, load_recipe, run_recipe, warn_if_file_loses


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


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_shipped_recipe_runs_end_to_end_on_tiny_data(name, tmp_path):
    recipe = tiny_variant(load_recipe(name), tmp_path)
    result = run_recipe(recipe, tmp_path / "run")
    kinds = [s["kind"] for s in result.stages]
    assert kinds == [k for k, _ in recipe.stages]
    final = result.stages[-1]
    assert final["kind"] == "encode"
    assert final["file_bytes"] == (tmp_path / "run" / final["dir"] / "model.dsz").stat().st_size
    # the decoded file is the quantized model: same accuracy as the stage before encoding, exactly when
    # the file stores every value exactly; rounding (float16, BatchNorm folded, grid biases) may move
    # one of the few near-tied test images of an all but untrained model
    stored = EncodeConfig(**recipe.stages[-1][1])
    exact = (stored.raw_dtype, stored.codebook_dtype, stored.fold_batchnorm, stored.grid_bits) == (
        "float32", "float32", False, None)
    one_image = 1 / len(load_splits(recipe.dataset).test)
    assert final["decoded_accuracy"] == pytest.approx(result.stages[-2]["accuracy"], abs=1e-9 if exact else one_image + 1e-9)
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


def test_resume_after_a_killed_run_gives_the_same_result(tmp_path, caplog):
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
    while not (out / "03-finetune" / "train-state.pt").exists():  # inside stage 3, after an epoch
        assert proc.poll() is None, stderr.read_text()[-3000:]
        assert time.monotonic() < deadline, "stage 3 never finished an epoch"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.md").exists(), "the run finished before it could be killed"
    assert not (out / "03-finetune" / "metrics.json").exists()

    with caplog.at_level(logging.INFO, logger="deepshrink.train"):
        resumed = run_recipe(Recipe.from_dict(recipe), out, resume=True)
    assert "continuing after epoch" in caplog.text  # stage 3 went on from its last epoch, not from the start
    assert not (out / "03-finetune" / "train-state.pt").exists()  # gone once the stage completed
    fresh = run_recipe(Recipe.from_dict(recipe), tmp_path / "fresh")
    strip = lambda stages: [{k: v for k, v in s.items() if k not in ("seconds", "file")} for s in stages]
    assert strip(resumed.stages) == strip(fresh.stages)
    history = lambda run: [{k: v for k, v in r.items() if k != "seconds"}
                           for r in json.loads((run / "03-finetune" / "details.json").read_text())["history"]]
    assert history(out) == history(tmp_path / "fresh")
    # its time counts the epochs before the kill as well as those after
    epochs = json.loads((out / "03-finetune" / "details.json").read_text())["history"]
    assert resumed.stages[2]["seconds"] >= sum(r["seconds"] for r in epochs)


def test_an_existing_run_folder_is_not_silently_overwritten(tmp_path):
    recipe = Recipe.from_dict({"model": "mlp", "dataset": {"name": "digits", "train_subset": 50, "test_subset": 20},
                               "stages": [{"prune": {"q": 10}}]})
    run_recipe(recipe, tmp_path)
    with pytest.raises(ConfigError, match="--resume"):
        run_recipe(recipe, tmp_path)
    other = Recipe.from_dict({**recipe.to_dict(), "stages": [{"prune": {"q": 20}}]})
    with pytest.raises(ConfigError, match="different recipe"):
        run_recipe(other, tmp_path, resume=True)


def test_a_recipe_quantizes_with_a_rate_term_and_fisher_weights(tmp_path):
    dataset = {"name": "digits", "train_subset": 200, "test_subset": 50}
    stages = [{"train": {"epochs": 2, "progress": False}}, {"prune": {"q": 50}}]
    base = run_recipe(Recipe.from_dict({"model": "mlp", "dataset": dataset, "stages": stages}), tmp_path / "base")
    quantize = {"quantize": {"bits": 4, "method": "ecsq", "lam": 0.3, "hessian": True}}
    result = run_recipe(Recipe.from_dict({"model": "mlp", "dataset": dataset, "stages": stages + [quantize]}),
                        tmp_path / "rate")
    assert result.stages[1] == {**base.stages[1], "seconds": result.stages[1]["seconds"]}
    details = json.loads((tmp_path / "rate" / "03-quantize" / "details.json").read_text())
    assert details["config"]["method"] == "ecsq" and details["config"]["hessian"] is True
    assert sum(layer["zeroed"] for layer in details["layers"].values()) > 0
    assert result.stages[-1]["sparsity"] > base.stages[-1]["sparsity"]
    bad = {"model": "mlp", "dataset": dataset, "stages": [{"quantize": {"method": "lloyd"}}]}
    with pytest.raises(ConfigError, match="unknown quantization method 'lloyd'"):
        run_recipe(Recipe.from_dict(bad), tmp_path / "bad")


def test_a_stage_learns_from_an_earlier_stages_model_also_after_a_resume(tmp_path, monkeypatch):
    import deepshrink.stages as stages_module

    dataset = {"name": "digits", "train_subset": 200, "test_subset": 50}
    stages = [{"train": {"epochs": 2, "progress": False}}, {"prune": {"q": 80}},
              {"finetune": {"epochs": 1, "teacher": 1, "distill_weight": 0.5, "progress": False}}]
    recipe = Recipe.from_dict({"model": "mlp", "dataset": dataset, "stages": stages})
    teachers = []
    real_train = stages_module.train  # the one training step every caller goes through

    def spy(model, data, config, **kwargs):
        teachers.append(kwargs.get("teacher"))
        return real_train(model, data, config, **kwargs)

    monkeypatch.setattr(stages_module, "train", spy)
    run_recipe(recipe, tmp_path)
    (tmp_path / "03-finetune" / "metrics.json").unlink()  # as if killed during stage 3
    run_recipe(recipe, tmp_path, resume=True)
    assert teachers[0] is None and len(teachers) == 3
    dense = torch.load(tmp_path / "01-train" / "checkpoint.pt", weights_only=True)["state_dict"]
    for teacher in teachers[1:]:  # the dense model of stage 1, read from its checkpoint both times
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in dense.items())
    details = json.loads((tmp_path / "03-finetune" / "details.json").read_text())
    assert details["config"]["distill_weight"] == 0.5


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


def alias_bomb() -> str:
    """A recipe whose prune stage includes 9**9 strings through nested YAML aliases ("billion laughs")."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("model: mlp\ndataset: digits\nstages:\n  - prune: {include: *i}")
    return "\n".join(lines) + "\n"


TRAIN_FIRST = [{"train": {"epochs": 1}}]


@pytest.mark.parametrize(
    "stages, message",
    [
        (TRAIN_FIRST + [{"prune": {"q": 50}}, {"finetune": {"epochs": -3}}], r"stage 3 \(finetune\).*epochs=-3"),
        (TRAIN_FIRST + [{"prune": {"q": 150}}], r"stage 2 \(prune\).*got 150"),
        (TRAIN_FIRST + [{"prune": {"method": "magic"}}], "unknown prune method 'magic'"),
        (TRAIN_FIRST + [{"quantize": {"bits": 0}}], "bits must be an integer in 1..16, got 0"),
        (TRAIN_FIRST + [{"quantize": {"bits": 17}}], "got 17"),
        (TRAIN_FIRST + [{"quantize": {"bits": 4.5}}], "got 4.5"),
        (TRAIN_FIRST + [{"quantize": {"kinds": ["bogus"]}}], "unknown weight kind"),
        (TRAIN_FIRST + [{"quantize": {}}, {"encode": {"coder": "zip"}}], r"stage 3 \(encode\).*unknown coder 'zip'"),
        (TRAIN_FIRST + [{"finetune": {"lr": "0.1"}}], "lr='0.1': expected a finite number"),
        (TRAIN_FIRST + [{"finetune": {"momentum": None}}], "momentum=None"),
        (TRAIN_FIRST + [{"finetune": {"amp": "no"}}], "amp='no': expected true or false"),
        (TRAIN_FIRST + [{"load": {"checkpoint": 5}}], "'load' takes exactly one option"),
        (TRAIN_FIRST + [{"finetune": {"teacher": 2, "distill_weight": 0.5}}], r"'teacher' must be the number of an earlier stage \(1\.\.1\)"),
        (TRAIN_FIRST + [{"finetune": {"teacher": "dense", "distill_weight": 0.5}}], "got 'dense'"),
        (TRAIN_FIRST + [{"finetune": {"teacher": 1}}], "distillation needs both 'teacher'"),
        (TRAIN_FIRST + [{"finetune": {"distill_weight": 0.5}}], "distillation needs both 'teacher'"),
        (TRAIN_FIRST + [{"finetune": {"reassign_lam": 0.01}}], r"stage 2 \(finetune\): 'reassign_lam' retrains quantized"),
        (TRAIN_FIRST + [{"quantize": {}}, {"finetune": {"reassign_lam": -1}}], "reassign_lam=-1"),
        ([{"train": 5}], r"stage 1 \(train\): options must be a mapping"),
        ("train", "'stages' must be a list"),
    ],
)
def test_bad_recipes_fail_before_any_stage_runs_or_file_is_written(stages, message, tmp_path, capsys):
    from deepshrink.cli import main

    raw = {"model": "mlp", "dataset": {"name": "digits"}, "stages": stages}
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(raw)
    path, out = tmp_path / "bad.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)
    assert main(["run", str(path), "--out", str(out)]) == 2
    assert not out.exists()
    if isinstance(stages, list):  # a Recipe built by hand is checked by run_recipe
        recipe = Recipe("hand-built", {"arch": "mlp"}, {"name": "digits"}, [next(iter(s.items())) for s in stages])
        with pytest.raises(ConfigError, match=message):
            run_recipe(recipe, out)
        assert not out.exists()


def test_a_yaml_alias_bomb_is_refused_at_once_in_little_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 600
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="line 1: YAML anchors and aliases"):
        load_recipe(path)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1 and peak < 100 << 20


def test_recipes_are_capped_in_size_and_need_utf8(tmp_path):
    from deepshrink.pipeline import MAX_RECIPE_BYTES

    big = tmp_path / "big.yaml"
    big.write_text("model: mlp\ndataset: digits\nstages: []\n" + "#" * MAX_RECIPE_BYTES)
    with pytest.raises(ConfigError, match=f"larger than {MAX_RECIPE_BYTES} bytes"):
        load_recipe(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(binary)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20_000 + "]" * 20_000)
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(deep)


def test_a_recipe_model_factory_needs_trust_and_leaves_no_folder(factory_checkpoints, tmp_path):
    recipe = Recipe.from_dict({"model": factory_checkpoints.spec, "dataset": {"name": "digits", "train_subset": 50,
                                                                              "test_subset": 20},
                               "stages": [{"prune": {"q": 50}}, {"encode": {}}]})
    with pytest.raises(ConfigError, match="trust_factory=True"):
        run_recipe(recipe, tmp_path / "out")
    assert not factory_checkpoints.marker.exists() and not (tmp_path / "out").exists()
    result = run_recipe(recipe, tmp_path / "out", trust_factory=True)
    assert result.stages[-1]["decoded_accuracy"] == pytest.approx(result.stages[-1]["accuracy"])


def test_resume_sweeps_the_temp_files_a_killed_write_left(tmp_path):
    recipe = Recipe.from_dict({"model": "mlp", "dataset": {"name": "digits", "train_subset": 50, "test_subset": 20},
                               "stages": [{"prune": {"q": 10}}, {"prune": {"q": 20}}]})
    run_recipe(recipe, tmp_path)
    (tmp_path / "02-prune" / "metrics.json").unlink()  # killed while writing stage 2's files
    left = [tmp_path / "02-prune" / ".metrics.json.k3j2.tmp", tmp_path / ".report.md.0q9w.tmp"]
    for p in left:
        p.write_bytes(b"half")
    run_recipe(recipe, tmp_path, resume=True)
    assert not any(p.exists() for p in left) and (tmp_path / "02-prune" / "metrics.json").exists()
    assert not list(tmp_path.rglob(".*.tmp"))


def test_resuming_a_complete_run_reports_its_final_model(tmp_path):
    recipe = Recipe.from_dict({"model": "mlp", "dataset": {"name": "digits", "train_subset": 50, "test_subset": 20},
                               "stages": [{"prune": {"q": 60}}, {"quantize": {"bits": 3}}]})
    first = run_recipe(recipe, tmp_path)
    again = run_recipe(recipe, tmp_path, resume=True)  # every stage skipped: the model comes from stage 2
    assert again.layers == first.layers and again.layers[0]["sparsity"] > 0.5 and again.layers[0]["bits"] == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["layers"] == first.layers


def test_a_damaged_run_folder_is_one_config_error(tmp_path):
    (tmp_path / "recipe.json").write_bytes(b"\x00{not json")
    recipe = Recipe.from_dict({"model": "mlp", "dataset": "digits", "stages": [{"prune": {}}]})
    with pytest.raises(ConfigError, match="recipe.json is damaged"):
        run_recipe(recipe, tmp_path, resume=True)


def test_load_splits_carves_a_fixed_validation_split_out_of_training():
    from deepshrink.data import load_dataset
    from deepshrink.data import load_splits

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


def test_dataset_augment_option_sets_the_training_augmentation_only():
    from deepshrink.data import Augment
    from deepshrink.data import load_splits

    splits = load_splits({"name": "digits", "validation": 100, "augment": "shift"})
    assert splits.train.augment == Augment.SHIFT
    assert load_splits({"name": "digits"}).train.augment == Augment.NONE
    with pytest.raises(ConfigError, match="unknown dataset augment 'mirror'; valid: none, crop_flip, shift"):
        load_splits({"name": "digits", "augment": "mirror"})


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
    from deepshrink import data as data_module
    from deepshrink.checkpoint import load_checkpoint

    honest = run_recipe(Recipe.from_dict(raw), tmp_path / "honest")

    real_load = data_module.load_dataset

    def wrong_test_labels(name, root, split):
        data = real_load(name, root, split)
        if split == "test":  # every test label moved to another class: test accuracy collapses
            data = dataclasses.replace(data, labels=(data.labels + 1) % data.num_classes)
        return data

    monkeypatch.setattr(data_module, "load_dataset", wrong_test_labels)
    corrupt = run_recipe(Recipe.from_dict(raw), tmp_path / "corrupt")

    for a, b in zip(honest.stages, corrupt.stages):
        assert a.get("best_epoch") == b.get("best_epoch") and a["validation_accuracy"] == b["validation_accuracy"]
        assert b["accuracy"] < min(0.2, a["accuracy"])  # the corrupt test split really was the one evaluated
    assert honest.stages[0]["best_epoch"] is not None and honest.stages[2]["best_epoch"] is not None
    for stage in ("01-train", "03-finetune"):
        w1 = load_checkpoint(tmp_path / "honest" / stage / "checkpoint.pt")[0].state_dict()
        w2 = load_checkpoint(tmp_path / "corrupt" / stage / "checkpoint.pt")[0].state_dict()
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_an_encode_stage_warns_where_its_file_scores_below_the_model_it_stores(caplog):
    stored = {"accuracy": 0.90, "decoded_accuracy": 0.90}
    with caplog.at_level(logging.WARNING, logger="deepshrink.pipeline"):
        warn_if_file_loses({**stored, "validation_accuracy": 0.93, "decoded_validation_accuracy": 0.925}, "f.dsz")
        assert caplog.text == ""  # half a point: within what rounding to float16 may cost
        warn_if_file_loses({**stored, "validation_accuracy": 0.93, "decoded_validation_accuracy": 0.81}, "f.dsz")
        assert "f.dsz" in caplog.text and "12.00 points below" in caplog.text and "validation" in caplog.text
        caplog.clear()
        warn_if_file_loses({"accuracy": 0.90, "decoded_accuracy": 0.85}, "g.dsz")  # no validation split: test
        assert "g.dsz" in caplog.text and "5.00 points below" in caplog.text and "test accuracy" in caplog.text
