"""The CLI is a thin layer: check each command wires arguments to the library and reports errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deepshrink.checkpoint import load_checkpoint, save_checkpoint
from deepshrink.cli import main
from deepshrink.format import load
from deepshrink.models import build_model
from deepshrink.report import layer_summary

SPEC = {"arch": "mlp", "kwargs": {}}
DATA = ["--dataset", "digits"]


@pytest.fixture
def dense(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "dense.pt", build_model(SPEC), SPEC, {"dataset": {"name": "digits"}})


def test_prune_summary_finetune_quantize_encode_decode(dense, tmp_path, capsys):
    pruned, tuned, quant = tmp_path / "p.pt", tmp_path / "f.pt", tmp_path / "q.pt"
    assert main(["prune", str(dense), "--method", "percentile", "--q", "75", "--out", str(pruned)]) == 0
    capsys.readouterr()
    assert main(["summary", str(pruned), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"]["sparsity"] == pytest.approx(0.75, abs=0.01)

    assert main(["finetune", str(pruned), "--epochs", "1", "--out", str(tuned)]) == 0
    model, _ = load_checkpoint(tuned)
    assert sum(r["nonzero"] for r in layer_summary(model)) == summary["total"]["nonzero"]

    args = ["quantize", str(tuned), "--bits", "3", "--bits-layer", "fc3.*=2", "--train-centroids", "--epochs", "1",
            "--out", str(quant)]
    assert main(args) == 0
    model, _ = load_checkpoint(quant)
    bits = {r["name"]: r["bits"] for r in layer_summary(model)}
    assert bits == {"fc1.weight": 3, "fc2.weight": 3, "fc3.weight": 2}
    assert all(r["distinct"] <= 2 ** r["bits"] for r in layer_summary(model))

    dsz = tmp_path / "m.dsz"
    assert main(["encode", str(quant), "--out", str(dsz), "--coder", "ans"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(dsz), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] == dsz.stat().st_size
    assert main(["eval", str(dsz)]) == 0
    assert "accuracy" in capsys.readouterr().out

    out = tmp_path / "decoded.safetensors"
    assert main(["decode", str(dsz), "--out", str(out)]) == 0
    decoded = load_file(out)
    restored = load(dsz)
    for name, tensor in restored.state_dict().items():
        assert torch.equal(decoded[name], tensor)


def test_library_errors_become_a_message_and_exit_code_2(dense, tmp_path, capsys):
    assert main(["summary", str(tmp_path / "missing.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().out
    assert main(["prune", str(dense), "--q-layer", "fc1.weight", "--out", str(tmp_path / "p.pt")]) == 2
    assert "expected GLOB=VALUE, got 'fc1.weight'" in capsys.readouterr().out


def test_per_layer_q_from_the_command_line(dense, tmp_path, capsys):
    pruned = tmp_path / "p.pt"
    assert main(["prune", str(dense), "--q", "50", "--q-layer", "fc1.*=90", "--out", str(pruned)]) == 0
    sparsity = {r["name"]: r["sparsity"] for r in layer_summary(load_checkpoint(pruned)[0])}
    assert sparsity["fc1.weight"] == pytest.approx(0.9, abs=1e-3) and sparsity["fc2.weight"] == pytest.approx(0.5, abs=1e-3)


def test_plot_writes_histograms(dense, tmp_path):
    pruned = tmp_path / "p.pt"
    main(["prune", str(dense), "--q", "50", "--out", str(pruned)])
    assert main(["plot", str(dense), str(pruned), "--out", str(tmp_path / "plots")]) == 0
    assert len(list((tmp_path / "plots").glob("*.png"))) == len(layer_summary(build_model(SPEC)))


def test_train_then_sweep_from_the_command_line(tmp_path, capsys):
    ckpt = tmp_path / "dense.pt"
    args = ["train", "--model", "mlp", "--model-kwargs", '{"hidden": [16]}', "--dataset", "digits",
            "--epochs", "5", "--lr", "0.1", "--batch-size", "32", "--out", str(ckpt)]
    assert main(args) == 0
    model, payload = load_checkpoint(ckpt)
    assert payload["model"] == {"arch": "mlp", "kwargs": {"hidden": [16]}}
    assert payload["meta"]["dataset"] == {"name": "digits"} and payload["meta"]["metrics"]["test_accuracy"] > 0.5
    assert main(["sweep", "prune-percentile", str(ckpt), "--out", str(tmp_path / "sweep"), "--epochs", "0"]) == 0
    assert "sweep: prune-percentile" in capsys.readouterr().out


def test_encode_raw_dtype_and_finetune_validation_flags(dense, tmp_path):
    pruned, tuned = tmp_path / "p.pt", tmp_path / "f.pt"
    assert main(["prune", str(dense), "--q", "50", "--out", str(pruned)]) == 0
    assert main(["finetune", str(pruned), "--epochs", "2", "--validation", "300", "--keep-best", "--out", str(tuned)]) == 0
    _, payload = load_checkpoint(tuned)
    assert payload["meta"]["dataset"]["validation"] == 300 and payload["meta"]["finetune"]["keep_best"] is True
    assert 0 < payload["meta"]["metrics"]["validation_accuracy"] <= 1
    sizes = {}
    for dtype in ("float32", "float16"):
        path = tmp_path / f"{dtype}.dsz"
        assert main(["encode", str(tuned), "--out", str(path), "--raw-dtype", dtype]) == 0
        sizes[dtype] = path.stat().st_size
    assert sizes["float16"] < sizes["float32"]  # the biases are stored in half the bytes
