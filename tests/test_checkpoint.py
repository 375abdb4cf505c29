import pytest
import torch

from deepshrink.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from deepshrink.compression import masks
from deepshrink.errors import CheckpointError
from deepshrink.models import build_model
from deepshrink.files import atomic_write
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, codebooks, quantize_model

SPEC = {"arch": "mlp", "kwargs": {}}


def test_round_trip_keeps_masks_codebooks_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC)
    prune_model(model, PruneConfig(method="percentile", q=70))
    quantize_model(model, QuantizeConfig(bits=3))
    x = torch.randn(5, 1, 8, 8)
    path = save_checkpoint(tmp_path / "q.pt", model, SPEC, {"note": "hello"})
    loaded, payload = load_checkpoint(path)
    assert payload["meta"] == {"note": "hello"}
    assert torch.equal(loaded(x), model(x))
    for fqn, (centroids, indices, bits) in codebooks(model).items():
        c2, i2, b2 = codebooks(loaded)[fqn]
        assert torch.equal(c2, centroids) and torch.equal(i2, indices) and b2 == bits


def test_masks_survive_save_and_load(tmp_path):
    model = build_model(SPEC)
    prune_model(model, PruneConfig(method="percentile", q=50))
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "p.pt", model, SPEC))
    for fqn, mask in masks(model).items():
        assert torch.equal(masks(loaded)[fqn], mask)


def test_unreadable_or_foreign_files_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a deepshrink checkpoint"):
        read_checkpoint(foreign)


def test_weights_that_do_not_fit_the_architecture_are_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model(SPEC), SPEC)
    payload = torch.load(path, weights_only=True)
    payload["model"] = {"arch": "lenet300", "kwargs": {}}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit model"):
        load_checkpoint(path)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.bin"

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
