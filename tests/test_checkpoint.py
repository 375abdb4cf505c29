import errno
import os

import pytest
import torch

from deepshrink.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from deepshrink.parametrizations import masks
from deepshrink.errors import CheckpointError, DeepShrinkError, WriteError
from deepshrink.models import build_model
from deepshrink.files import atomic_write, sweep_temp_files
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
    payload["model"] = {"arch": "mlp", "kwargs": {"hidden": [128, 256]}}  # as many weights, other shapes
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit model"):
        load_checkpoint(path)
    payload["model"] = {"arch": "lenet300", "kwargs": {}}  # more weights than the file holds: never allocated
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="266,610 parameter/buffer elements, over the limit of 50,826"):
        load_checkpoint(path)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.bin"

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_naming_code_is_refused_before_anything_is_imported(factory_checkpoints):
    for path in (factory_checkpoints.system, factory_checkpoints.module):
        with pytest.raises(CheckpointError, match="trust_factory=True"):
            load_checkpoint(path)
    assert not factory_checkpoints.marker.exists()


def test_a_trusted_factory_checkpoint_loads(factory_checkpoints):
    model, payload = load_checkpoint(factory_checkpoints.module, trust_factory=True)
    assert factory_checkpoints.marker.exists()  # the module was imported: trust is what allows it
    assert payload["model"] == factory_checkpoints.spec and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def _edited(payload: dict, **changes) -> dict:
    out = {**payload, **{k: v for k, v in changes.items() if v is not DELETE}}
    return {k: v for k, v in out.items() if changes.get(k) is not DELETE}


DELETE = object()
MASKED = [{"kind": "masked"}]


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model": DELETE}, r"missing entry \['model'\]"),
        ({"compression": DELETE, "meta": DELETE}, r"missing entries \['compression', 'meta'\]"),
        ({"deepshrink_checkpoint": 2}, "checkpoint version 2, expected 1"),
        ({"deepshrink_checkpoint": True}, "checkpoint version True"),
        ({"model": ["mlp"]}, "'model' must be a dict, got list"),
        ({"compression": []}, "'compression' must be a dict, got list"),
        ({"meta": "x"}, "'meta' must be a dict, got str"),
        ({"state_dict": {"fc1.weight": [1.0]}}, "'state_dict' must map names to tensors"),
        ({"compression": {"fc1.weight": "masked"}}, "must map weight names to lists"),
        ({"compression": {"fc1.weight": ["masked"]}}, "must be a dict with a 'kind' string"),
        ({"compression": {"fc1.weight": [{"kind": "bogus"}]}}, "unknown compression kind 'bogus'"),
        ({"compression": {"fc9.weight": MASKED}}, "no module 'fc9'"),
        ({"compression": {"fc1.weight": MASKED}}, "incomplete"),
        ({"model": {"arch": "mlp", "kwargs": {"hidden": [1e6, 1e6]}}}, "1,000,076,000,010 parameter/buffer elements"),
        ({"model": {"arch": "mlp", "kwargs": {"hidden": ["many"]}}}, "cannot build with kwargs"),
        ({"model": {"arch": ["mlp"]}}, "unknown model arch"),
        ({"model": {"arch": "mlp", "kwargs": [1e6]}}, "'kwargs' must be a dict"),
    ],
)
def test_each_malformed_checkpoint_gives_one_checkpoint_error(tmp_path, changes, words):
    path = save_checkpoint(tmp_path / "m.pt", build_model(SPEC), SPEC)
    torch.save(_edited(torch.load(path, weights_only=True), **changes), path)
    with pytest.raises(CheckpointError, match=words) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EXDEV])
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_write_failures_become_one_write_error_and_leave_no_temp_file(tmp_path, monkeypatch, code, where):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    def write(f):
        f.write(b"partial")
        if where == "write":  # what a full disk does to f.write
            fail()

    if where != "write":
        monkeypatch.setattr(os, where, fail)
    target = tmp_path / "out.bin"
    with pytest.raises(WriteError, match=rf"cannot write {target}: .* \[{errno.errorcode[code]}\]") as info:
        atomic_write(target, write)
    assert isinstance(info.value, DeepShrinkError) and isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_on_a_full_disk_raises_write_error(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="No space left on device"):
        save_checkpoint(tmp_path / "m.pt", build_model(SPEC), SPEC)
    assert list(tmp_path.iterdir()) == []


def test_sweep_temp_files_removes_only_atomic_write_leftovers(tmp_path):
    (tmp_path / "01-train").mkdir()
    stale = [tmp_path / ".recipe.json.a1b2.tmp", tmp_path / "01-train" / ".checkpoint.pt.x9.tmp"]
    kept = [tmp_path / "01-train" / "checkpoint.pt", tmp_path / "notes.tmp"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert sorted(sweep_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
