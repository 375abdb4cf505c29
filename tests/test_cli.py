"""The CLI is a thin layer: check each command wires arguments to the library and reports errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deepshrink.checkpoint import load_checkpoint, save_checkpoint
from deepshrink.cli import main
from deepshrink.compress import load
from deepshrink.format import read_header
from deepshrink.models import build_model
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model
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


def test_encode_writes_once_and_decodes_nothing(tmp_path, stream_decodes, capsys):
    torch.manual_seed(0)
    model = build_model(SPEC)
    prune_model(model, PruneConfig(q=80))
    quantize_model(model, QuantizeConfig(bits=3))
    quant = save_checkpoint(tmp_path / "q.pt", model, SPEC)
    dsz = tmp_path / "m.dsz"
    assert main(["encode", str(quant), "--out", str(dsz)]) == 0
    assert stream_decodes == []  # the report comes from the streams in memory, not from reading the file
    assert f"file {dsz.stat().st_size:,} bytes" in capsys.readouterr().out


def test_library_errors_become_a_message_and_exit_code_2(dense, tmp_path, capsys):
    assert main(["summary", str(tmp_path / "missing.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["prune", str(dense), "--q-layer", "fc1.weight", "--out", str(tmp_path / "p.pt")]) == 2
    assert "expected GLOB=VALUE, got 'fc1.weight'" in capsys.readouterr().err


def test_missing_data_without_data_dir_says_to_pass_it(tmp_path, capsys, monkeypatch):
    # a checkpoint records its dataset (mnist) but not where it lives: ./data is empty here
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model({"arch": "lenet300"}), {"arch": "lenet300"},
                           meta={"dataset": {"name": "mnist"}})
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(ckpt)]) == 2
    assert "no --data-dir given" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--data-dir", str(tmp_path / "elsewhere")]) == 2
    assert "no --data-dir given" not in capsys.readouterr().err


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
    record = payload["meta"]["dataset"]  # the dataset as trained on, without its path
    assert record["name"] == "digits" and record["image_shape"] == [1, 8, 8] and "root" not in record
    assert payload["meta"]["metrics"]["test_accuracy"] > 0.5
    assert main(["sweep", "prune-percentile", str(ckpt), "--out", str(tmp_path / "sweep"), "--epochs", "0"]) == 0
    assert "sweep: prune-percentile" in capsys.readouterr().out


def test_every_command_refuses_a_checkpoint_that_names_code(factory_checkpoints, tmp_path, capsys):
    from deepshrink.compress import compress_model

    dsz = tmp_path / "factory.dsz"
    compress_model(build_model(SPEC), dsz, model_spec=factory_checkpoints.spec)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": factory_checkpoints.spec, "dataset": "digits", "stages": [{"prune": {}}]}))
    out = tmp_path / "out"
    for ckpt in (factory_checkpoints.system, factory_checkpoints.module):
        for args in (["summary", ckpt], ["eval", ckpt], ["prune", ckpt, "--out", out / "p.pt"],
                     ["finetune", ckpt, "--epochs", "1", "--out", out / "f.pt"],
                     ["quantize", ckpt, "--out", out / "q.pt"],
                     ["plot", ckpt, "--out", out], ["encode", ckpt, "--out", out / "m.dsz"],
                     ["sweep", "prune-std", ckpt, "--out", out], ["eval", dsz], ["run", recipe, "--out", out]):
            assert main([str(a) for a in args]) == 2, args
            assert "--trust-factory" in capsys.readouterr().err, args
    assert not factory_checkpoints.marker.exists() and not out.exists()


def test_a_user_factory_goes_through_the_pipeline_with_trust_factory(factory_checkpoints, tmp_path, capsys):
    factory = factory_checkpoints.spec["factory"]
    dense, pruned, quant, dsz = (tmp_path / n for n in ("d.pt", "p.pt", "q.pt", "m.dsz"))
    assert main(["train", "--model", factory, *DATA, "--epochs", "1", "--out", str(dense)]) == 0  # named here: trusted
    assert main(["prune", str(dense), "--q", "50", "--out", str(pruned), "--trust-factory"]) == 0
    assert main(["quantize", str(pruned), "--bits", "3", "--out", str(quant), "--trust-factory"]) == 0
    assert main(["encode", str(quant), "--out", str(dsz), "--trust-factory"]) == 0
    capsys.readouterr()
    assert main(["eval", str(dsz), "--trust-factory"]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.fixture
def bad_inputs(dense, tmp_path):
    """A missing file, garbage bytes, a malformed checkpoint (no 'meta', a list for 'compression') and a bad recipe."""
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 this is not a model \xff" * 10)
    malformed = tmp_path / "malformed.pt"
    payload = torch.load(dense, weights_only=True)
    del payload["meta"]
    torch.save({**payload, "compression": []}, malformed)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: mlp\ndataset: digits\nstages:\n  - train: {epochs: 1}\n  - quantize: {bits: 17}\n")
    return [tmp_path / "missing.pt", garbage, malformed, recipe]


def test_no_command_prints_a_traceback_for_bad_input(bad_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    commands = [
        lambda f: ["summary", f], lambda f: ["eval", f, *DATA], lambda f: ["prune", f, "--out", out / "p.pt"],
        lambda f: ["finetune", f, "--epochs", "1", "--out", out / "f.pt"],
        lambda f: ["quantize", f, "--out", out / "q.pt"], lambda f: ["plot", f, "--out", out],
        lambda f: ["encode", f, "--out", out / "m.dsz"], lambda f: ["inspect", f],
        lambda f: ["decode", f, "--out", out / "d.safetensors"], lambda f: ["sweep", "bits", f, "--out", out],
        lambda f: ["run", f, "--out", out],
        lambda f: ["train", "--model", "mlp", "--model-kwargs", '{"hidden": [1e6, 1e6]}', *DATA, "--out", out / "t.pt"],
    ]
    for command in commands:
        for path in bad_inputs:
            args = [str(a) for a in command(path)]
            assert main(args) == 2, args
            captured = capsys.readouterr()
            assert "Traceback" not in captured.err + captured.out, args
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, captured.err)
    assert not out.exists()


def test_os_errors_are_one_line_with_exit_code_1(dense, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker / "run")]) == 1  # a folder inside a regular file
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and "Traceback" not in err


def test_a_full_disk_during_encode_is_one_error_line_and_leaves_nothing(dense, tmp_path, monkeypatch, capsys):
    import errno
    import os

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "out"
    assert main(["encode", str(dense), "--out", str(out / "m.dsz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {out / 'm.dsz'}: No space left on device [ENOSPC]")
    assert "Traceback" not in err and list(out.iterdir()) == []


def test_the_command_line_shows_one_error_line_and_a_traceback_only_with_v(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = [sys.executable, "-m", "deepshrink.cli"]
    quiet = subprocess.run([*run, "summary", str(garbage)], capture_output=True, text=True, env=env)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith(f"error: {garbage}: not a readable torch checkpoint")
    assert quiet.stderr.count("\n") == 1
    verbose = subprocess.run([*run, "-v", "summary", str(garbage)], capture_output=True, text=True, env=env)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "CheckpointError" in verbose.stderr


def test_quantize_with_a_rate_term_prunes_more_and_reports_bad_settings(dense, tmp_path, capsys):
    pruned, quant = tmp_path / "p.pt", tmp_path / "q.pt"
    assert main(["prune", str(dense), "--q", "50", "--out", str(pruned)]) == 0
    args = ["quantize", str(pruned), "--bits", "4", "--method", "ecsq", "--lambda", "0.3", "--hessian", "--out", str(quant)]
    assert main(args) == 0
    assert "ecsq" in capsys.readouterr().out
    before, _ = load_checkpoint(pruned)
    after, payload = load_checkpoint(quant)
    assert payload["meta"]["quantize"]["method"] == "ecsq" and payload["meta"]["quantize"]["lam"] == 0.3
    assert sum(r["nonzero"] for r in layer_summary(after)) < sum(r["nonzero"] for r in layer_summary(before))
    assert main(["quantize", str(pruned), "--lambda", "0.1", "--out", str(tmp_path / "x.pt")]) == 2
    assert "no rate term" in capsys.readouterr().err
    assert main(["quantize", str(pruned), "--method", "uniform", "--lambda", "-1", "--out", str(tmp_path / "x.pt")]) == 2
    assert "lam" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    with pytest.raises(SystemExit):
        main(["quantize", str(pruned), "--method", "lloyd", "--out", str(tmp_path / "x.pt")])


def test_dependent_quantization_from_the_command_line_writes_its_context_model(dense, tmp_path, capsys):
    from deepshrink.format import read_header

    pruned, quant, packed = tmp_path / "p.pt", tmp_path / "q.pt", tmp_path / "m.dsz"
    assert main(["prune", str(dense), "--q", "70", "--out", str(pruned)]) == 0
    assert main(["quantize", str(pruned), "--bits", "5", "--method", "dq", "--lambda", "0.01", "--out", str(quant)]) == 0
    assert "dq" in capsys.readouterr().out
    assert main(["encode", str(quant), "--coder", "cabac", "--out", str(packed)]) == 0
    models = {e["coder_params"]["context_model"] for e in read_header(packed)["tensors"].values() if "coder_params" in e}
    assert models == {"sig24-sign27-gt24k-eg0-warmup-dq8"}
    assert main(["eval", str(packed), *DATA]) == 0


def test_finetune_with_reassignment_retrains_a_quantized_model(dense, tmp_path):
    pruned, quant, tuned, packed = (tmp_path / n for n in ("p.pt", "q.pt", "f.pt", "m.dsz"))
    assert main(["prune", str(dense), "--q", "60", "--out", str(pruned)]) == 0
    assert main(["quantize", str(pruned), "--method", "ecsq", "--lambda", "0.02", "--bits", "3", "--out", str(quant)]) == 0
    assert main(["finetune", str(quant), "--epochs", "1", "--weight-decay", "0", "--reassign-lambda", "0.02",
                 "--out", str(tuned)]) == 0
    before, after = (load_checkpoint(p)[0] for p in (quant, tuned))
    assert load_checkpoint(tuned)[1]["meta"]["finetune"]["reassign_lam"] == 0.02
    moved = [name for name, module in after.named_modules() if hasattr(module, "parametrizations")
             and not torch.equal(module.parametrizations.weight[0].indices,
                                 before.get_submodule(name).parametrizations.weight[0].indices)]
    assert moved  # weights changed level
    assert main(["encode", str(tuned), "--out", str(packed)]) == 0
    assert main(["eval", str(packed), *DATA]) == 0
    assert main(["finetune", str(pruned), "--epochs", "1", "--reassign-lambda", "0.02", "--out", str(tuned)]) == 2


def test_finetune_and_centroid_training_learn_from_a_teacher(dense, tmp_path, capsys):
    pruned = tmp_path / "p.pt"
    assert main(["prune", str(dense), "--q", "80", "--out", str(pruned)]) == 0
    assert main(["finetune", str(pruned), "--epochs", "1", "--teacher", str(dense), "--out", str(tmp_path / "f.pt")]) == 0
    meta = load_checkpoint(tmp_path / "f.pt")[1]["meta"]["finetune"]
    assert meta["distill_weight"] == 0.5 and meta["distill_temperature"] == 4.0  # the defaults with --teacher
    assert main(["quantize", str(pruned), "--bits", "3", "--train-centroids", "--epochs", "1", "--teacher", str(dense),
                 "--distill-weight", "0.9", "--distill-temperature", "2", "--out", str(tmp_path / "q.pt")]) == 0
    meta = load_checkpoint(tmp_path / "q.pt")[1]["meta"]["centroid_training"]
    assert (meta["distill_weight"], meta["distill_temperature"]) == (0.9, 2.0)
    assert main(["finetune", str(pruned), "--epochs", "1", "--distill-weight", "0.5", "--out", str(tmp_path / "x.pt")]) == 2
    assert "teacher" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    assert main(["finetune", str(pruned), "--teacher", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    assert main(["quantize", str(pruned), "--teacher", str(dense), "--out", str(tmp_path / "x.pt")]) == 2
    assert "--train-centroids" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


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
    grid = tmp_path / "grid.dsz"
    assert main(["encode", str(tuned), "--out", str(grid), "--raw-dtype", "float16", "--grid-bits", "6"]) == 0
    assert read_header(grid)["meta"]["encode"]["grid_bits"] == 6
    assert "grid" in {e["codec"] for e in read_header(grid)["tensors"].values()}  # the MLP's 256 and 128 biases
    assert grid.stat().st_size < sizes["float16"]
    assert main(["encode", str(tuned), "--out", str(grid), "--grid-bits", "1"]) == 2  # a grid needs 2 bits


def test_eval_reports_the_validation_split_a_file_holds_out(dense, tmp_path, capsys):
    tuned, dsz = tmp_path / "f.pt", tmp_path / "m.dsz"
    assert main(["finetune", str(dense), "--epochs", "1", "--validation", "300", "--out", str(tuned)]) == 0
    assert main(["encode", str(tuned), "--out", str(dsz)]) == 0
    capsys.readouterr()
    assert main(["eval", str(dsz), "--split", "validation"]) == 0
    assert "validation accuracy" in (out := capsys.readouterr().out) and "n=300" in out
    assert main(["eval", str(dense), "--split", "validation"]) == 2  # trained without one
    assert "no validation split" in capsys.readouterr().err


def test_encode_fold_batchnorm_flag_reaches_the_file(tmp_path, monkeypatch):
    from deepshrink import sweep

    spec = {"arch": "resnet20", "kwargs": {}}
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2)
    ckpt = save_checkpoint(tmp_path / "r.pt", model, spec)
    folded, kept = tmp_path / "folded.dsz", tmp_path / "kept.dsz"
    assert main(["encode", str(ckpt), "--out", str(folded), "--fold-batchnorm"]) == 0
    assert main(["encode", str(ckpt), "--out", str(kept)]) == 0
    assert read_header(folded)["meta"]["encode"]["fold_batchnorm"] is True
    assert read_header(kept)["meta"]["encode"]["fold_batchnorm"] is False
    loaded = load(folded).eval()
    assert torch.equal(loaded.layer2[0].bn1.running_var, torch.ones(32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.allclose(loaded(x), expected, rtol=0, atol=1e-5 * expected.abs().max().item())

    seen = {}  # the rate sweep's files are written with the same option
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **kw: seen.update(kw) or sweep.SweepResult([], [], "r"))
    assert main(["sweep", "rate", str(ckpt), "--out", str(tmp_path / "s"), "--fold-batchnorm", "--grid-bits", "6"]) == 0
    assert seen["encode"].fold_batchnorm is True and seen["encode"].grid_bits == 6


def test_run_prints_each_stage_with_its_validation_accuracy(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": "mlp", "dataset": {"name": "digits", "validation": 100},
                                  "stages": [{"train": {"epochs": 1, "progress": False}}, {"prune": {"q": 50}}]}))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("stage ")]
    assert [line.split()[:3] for line in lines] == [["stage", "1", "train"], ["stage", "2", "prune"]]
    assert all("(validation " in line for line in lines)
