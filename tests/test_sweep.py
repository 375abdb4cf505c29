import json

import pytest
import torch

from deepshrink.checkpoint import load_checkpoint, save_checkpoint
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.encode import EncodeConfig
from deepshrink.errors import ConfigError
from deepshrink.format import read_header
from deepshrink.models import build_model
from deepshrink.sweep import BITS, INITS, PERCENTILES, STD_VALUES, run_sweep
from deepshrink.train import TrainConfig, train
from deepshrink.data import load_dataset

SPEC = {"arch": "mlp", "kwargs": {"hidden": [32]}}
DATASET = {"name": "digits", "train_subset": 200, "test_subset": 100}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(SPEC)
    train(model, load_dataset("digits").subset(200), TrainConfig(epochs=3, lr=0.05, progress=False))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "dense.pt", model, SPEC, {"dataset": DATASET})


@pytest.mark.parametrize("kind, key, values", [("prune-std", "s", STD_VALUES), ("prune-percentile", "q", PERCENTILES)])
def test_pruning_sweeps_write_table_csv_json_and_plot(trained, tmp_path, kind, key, values):
    result = run_sweep(kind, trained, tmp_path, epochs=1)
    assert [r[key] for r in result.rows] == list(values)
    sparsities = [r["sparsity"] for r in result.rows]
    assert sparsities[0] == 0.0 and sparsities == sorted(sparsities) and sparsities[-1] > 0.25
    if kind == "prune-percentile":
        assert sparsities == pytest.approx([q / 100 for q in values], abs=0.01)
    assert all(r["retrained_accuracy"] is not None for r in result.rows)
    assert result.report.read_text().startswith(f"# Sweep: {kind}")
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == result.rows
    assert (tmp_path / "sweep.csv").read_text().splitlines()[0].startswith(key)
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_quantization_sweeps_cover_bits_and_inits(trained, tmp_path):
    bits = run_sweep("bits", trained, tmp_path / "bits", epochs=0)
    assert [r["bits"] for r in bits.rows] == list(BITS)
    assert all(r["retrained_accuracy"] is None for r in bits.rows)
    # fewer bits cannot be closer to the dense model than 6 bits by much: check the trend's ends
    assert bits.rows[0]["accuracy"] >= bits.rows[-1]["accuracy"] - 0.05
    inits = run_sweep("init", trained, tmp_path / "init", epochs=1)
    assert [r["init"] for r in inits.rows] == list(INITS)
    assert all(r["accuracy_before"] == inits.rows[0]["accuracy_before"] for r in inits.rows)


def test_quantization_sweeps_from_a_pruned_checkpoint_keep_every_point_independent(trained, tmp_path):
    # a pruned checkpoint carries mask parametrizations; quantizing one point must not disturb the next
    model, payload = load_checkpoint(trained)
    prune_model(model, PruneConfig(q=60))
    pruned = save_checkpoint(tmp_path / "pruned.pt", model, SPEC, payload["meta"])
    result = run_sweep("bits", pruned, tmp_path / "bits", epochs=0)
    assert [r["bits"] for r in result.rows] == list(BITS)
    assert len({r["accuracy_before"] for r in result.rows}) == 1


def test_sensitivity_prunes_one_layer_at_a_time(trained, tmp_path):
    result = run_sweep("sensitivity", trained, tmp_path, epochs=0)
    layers = sorted({r["layer"] for r in result.rows})
    assert layers == ["fc1.weight", "fc2.weight"]
    assert len(result.rows) == 2 * 4


def test_unknown_sweep_and_missing_dataset(trained, tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep"):
        run_sweep("bogus", trained, tmp_path)
    bare = save_checkpoint(tmp_path / "bare.pt", build_model(SPEC), SPEC)
    with pytest.raises(ConfigError, match="names no dataset"):
        run_sweep("bits", bare, tmp_path)


def test_rate_sweep_writes_the_size_vs_accuracy_frontier(trained, tmp_path):
    model, payload = load_checkpoint(trained)
    prune_model(model, PruneConfig(q=50))
    pruned = save_checkpoint(tmp_path / "pruned.pt", model, SPEC, payload["meta"])
    lambdas = (0.0, 0.05, 0.3)
    result = run_sweep("rate", pruned, tmp_path / "rate", epochs=1, bits=5, lambdas=lambdas)
    assert [r["lambda"] for r in result.rows] == list(lambdas)
    sizes = [r["file_bytes"] for r in result.rows]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]  # more rate weight, smaller file
    for row in result.rows:
        assert row["file_bytes"] == (tmp_path / "rate" / f"lambda-{row['lambda']:g}.dsz").stat().st_size
        assert row["retrained_accuracy"] is not None and row["ratio"] > 1
        assert row["file_accuracy"] == row["retrained_accuracy"]  # float32 storage: the file is the model
    assert result.rows[-1]["sparsity"] > result.rows[0]["sparsity"] >= 0.49  # weights joined the zero level
    assert json.loads((tmp_path / "rate" / "sweep.json").read_text())["kind"] == "rate"
    assert (tmp_path / "rate" / "sweep.png").stat().st_size > 0
    assert "file bytes" in result.report.read_text()


def test_rate_sweep_retrains_each_point_with_reassignment_when_asked(trained, tmp_path, monkeypatch):
    import deepshrink.stages as stages_module  # the one training step sweeps go through

    configs = []
    real_train = stages_module.train
    monkeypatch.setattr(stages_module, "train", lambda model, data, config, **kw: (configs.append(config),
                                                                                   real_train(model, data, config, **kw))[1])
    model, payload = load_checkpoint(trained)
    prune_model(model, PruneConfig(q=50))
    pruned = save_checkpoint(tmp_path / "pruned.pt", model, SPEC, payload["meta"])
    result = run_sweep("rate", pruned, tmp_path / "rate", epochs=1, bits=3, lambdas=(0.0, 0.05),
                       reassign_epochs=1, reassign_lr=0.02)
    # per point: reassignment at the point's own lambda, then centroid training
    assert [(c.reassign_lam, c.lr) for c in configs] == [(0.0, 0.02), (None, 0.01), (0.05, 0.02), (None, 0.01)]
    assert all(row["file_accuracy"] == row["retrained_accuracy"] for row in result.rows)


class Stopped(Exception):
    pass


def test_a_stopped_sweep_run_again_continues_after_its_finished_points(trained, tmp_path, monkeypatch):
    import deepshrink.stages as stages_module

    trained_points = []
    real_train = stages_module.train
    monkeypatch.setattr(stages_module, "train", lambda model, data, config, **kw: (
        trained_points.append(config), real_train(model, data, config, **kw))[1])
    whole = run_sweep("prune-percentile", trained, tmp_path / "whole", epochs=1).rows

    def stop_after_two(row):
        if row["q"] == PERCENTILES[1]:
            raise Stopped

    trained_points.clear()
    with pytest.raises(Stopped):
        run_sweep("prune-percentile", trained, tmp_path / "stopped", epochs=1, on_point=stop_after_two)
    assert len(trained_points) == 2 and not (tmp_path / "stopped" / "sweep.json").exists()
    seen = []
    again = run_sweep("prune-percentile", trained, tmp_path / "stopped", epochs=1, on_point=seen.append)
    assert len(trained_points) == 4  # the two finished points were not retrained again
    assert again.rows == seen == whole  # the same rows as an uninterrupted sweep, each reported
    assert not (tmp_path / "stopped" / "points.json").exists()  # gone once sweep.json is written

    # other settings in the same folder start over
    trained_points.clear()
    with pytest.raises(Stopped):
        run_sweep("prune-percentile", trained, tmp_path / "other", epochs=1, on_point=stop_after_two)
    run_sweep("prune-percentile", trained, tmp_path / "other", epochs=1, lr=0.02)
    assert len(trained_points) == 2 + len(PERCENTILES)


def test_rate_sweep_writes_files_as_told(trained, tmp_path):
    model, payload = load_checkpoint(trained)
    prune_model(model, PruneConfig(q=50))
    pruned = save_checkpoint(tmp_path / "pruned.pt", model, SPEC, payload["meta"])
    sizes = {}
    for raw in ("float32", "float16"):
        result = run_sweep("rate", pruned, tmp_path / raw, epochs=0, lambdas=(0.01,),
                           encode=EncodeConfig(coder="huffman", raw_dtype=raw))
        sizes[raw] = result.rows[0]["file_bytes"]
        tensors = read_header(tmp_path / raw / "lambda-0.01.dsz")["tensors"]
        assert {t["codec"] for t in tensors.values()} == {"deep_compression", "raw"}  # no context coding
        assert {t["dtype"] for t in tensors.values() if t["codec"] == "raw"} == {raw}
        # the checkpoint's dataset record travels with the file: `eval FILE` finds and normalises the data
        assert read_header(tmp_path / raw / "lambda-0.01.dsz")["meta"]["dataset"] == payload["meta"]["dataset"]
    assert sizes["float16"] < sizes["float32"]  # the biases take half the bytes


@pytest.mark.parametrize("kwargs, match", [({"lambdas": ()}, "at least one lambda"),
                                           ({"lambdas": (0.1, -1.0)}, "lam"),
                                           ({"method": "kmeans", "lambdas": (0.1,)}, "no rate term")])
def test_rate_sweep_rejects_bad_settings_before_any_work(trained, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run_sweep("rate", trained, tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_a_sweep_on_the_validation_split_reads_no_test_label(tmp_path, monkeypatch):
    from deepshrink import data as data_module

    trained_with_validation = _dense_with_validation(tmp_path)
    real_load = data_module.load_dataset
    scores = {}
    for name, corrupt in (("honest", False), ("corrupt", True)):
        def load(dataset, root, split, corrupt=corrupt):
            data = real_load(dataset, root, split)
            if corrupt and split == "test":
                data = type(data)(data.images, (data.labels + 1) % 10, data.classes, data.mean, data.std, data.name)
            return data

        monkeypatch.setattr(data_module, "load_dataset", load)
        result = run_sweep("sensitivity", trained_with_validation, tmp_path / name, split="validation")
        scores[name] = [r["accuracy"] for r in result.rows]
        assert json.loads((tmp_path / name / "sweep.json").read_text())["split"] == "validation"
    assert scores["honest"] == scores["corrupt"] and max(scores["honest"]) > 0.5


def test_a_validation_sweep_needs_a_validation_split(trained, tmp_path):
    with pytest.raises(ConfigError, match="no validation split"):
        run_sweep("sensitivity", trained, tmp_path, split="validation")


def _dense_with_validation(tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC)
    train(model, load_dataset("digits").subset(400), TrainConfig(epochs=15, lr=0.1, progress=False))
    return save_checkpoint(tmp_path / "dense.pt", model, SPEC, {"dataset": {**DATASET, "validation": 150}})
