"""Real-size models (issue 26): the same bytes as before, tensor by tensor, in parallel, in bounded memory."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import deepshrink.format as fmt
from deepshrink.compress import compress_model, load
from deepshrink.encode import EncodeConfig, encode_model
from deepshrink.errors import ChecksumMismatch, ConfigError, HeaderTooSmall
from deepshrink.format import write_file
from deepshrink.parallel import map_in_order
from deepshrink.parametrizations import Masked, strip
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model


class PinnedModel(nn.Module):
    """Every kind of stored tensor: a tied embedding/head, a conv, a BatchNorm with its counter, and an fc
    layer sparse enough for the paper's layout to win under "auto"."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 24)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(24, 40)
        self.fc.weight = self.embed.weight  # tied, as GPT-2's lm_head
        self.mlp = nn.Linear(256, 128)


def pinned_model() -> PinnedModel:
    """Seeded weights (numpy's generator: independent of torch's), pruned 70% (mlp 95%), 4-bit (conv 5-bit) k-means."""
    torch.manual_seed(0)
    model = PinnedModel()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.from_numpy(rng.standard_normal(tuple(t.shape)).astype(np.float32)))
        model.bn.running_var.abs_()
        model.bn.num_batches_tracked.fill_(7)
    prune_model(model, PruneConfig(method="percentile", q=70, q_by_pattern=(("mlp.*", 95),)))
    quantize_model(model, QuantizeConfig(bits=4, bits_conv=5))
    return model


PINNED_CONFIGS = {
    "auto": EncodeConfig(),
    "huffman": EncodeConfig(coder="huffman"),
    "ans": EncodeConfig(coder="ans"),
    "cabac": EncodeConfig(coder="cabac"),
    "half-grid-fold": EncodeConfig(codebook_dtype="float16", raw_dtype="float16", grid_bits=8, fold_batchnorm=True),
}
#: sha256 of each file, computed on main at b542569 (before tensor-by-tensor encoding): the format and the
#: encoder's choices must not change
PINNED_SHA256 = {
    "auto": "6de3b24373a27d01d657b999eda43cbe15abf16a7856b87f10c24eccaaa792c9",  # 3642 bytes
    "huffman": "70f6300d3e579b1ca15681ce6c152080167ff87a59d0c848a38fadc949a0d8f5",  # 3650 bytes
    "ans": "d0411e3ce89427693d78bc6a82935fa88d5f392b45d3c63147b298f8b0cb42d6",  # 3741 bytes
    "cabac": "701a01d798feb85806ddfa88bcc2961d75c3188f8f60834fbb60e114faf8733f",  # 3665 bytes
    "half-grid-fold": "335b0f873832af64d9a9ea20119b4d9cd095a6af6317081e0d14895ab9351ed1",  # 3017 bytes
}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("label", PINNED_CONFIGS)
def test_a_seeded_models_file_bytes_are_pinned(label, tmp_path):
    path = tmp_path / f"{label}.dsz"
    compress_model(pinned_model(), path, PINNED_CONFIGS[label], meta={"pinned": True})
    assert sha256(path) == PINNED_SHA256[label]


# ---------------------------------------------------------------- tensor by tensor, in parallel


def test_tensor_by_tensor_writing_gives_the_whole_model_paths_bytes(tmp_path):
    """``compress_model`` encodes, writes and accounts one tensor at a time; ``encode_model`` + ``write_file``
    hold every encoded tensor: the same file, and the same accounting as the file read back."""
    from deepshrink.format import TIED_KEY, inspect_file, write_file
    from deepshrink.layers import tied_weights

    model = pinned_model()
    for label, config in PINNED_CONFIGS.items():
        report = compress_model(model, tmp_path / "a.dsz", config, meta={"pinned": True})
        meta = {"encode": config.record(), "pinned": True, TIED_KEY: tied_weights(model)}
        write_file(tmp_path / "b.dsz", encode_model(model, config), None, meta)
        assert (tmp_path / "a.dsz").read_bytes() == (tmp_path / "b.dsz").read_bytes(), label
        assert inspect_file(tmp_path / "a.dsz") == dataclasses.replace(report, path=str(tmp_path / "a.dsz")), label


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_the_file_does_not_depend_on_the_number_of_workers(workers, tmp_path):
    path = tmp_path / "m.dsz"
    compress_model(pinned_model(), path, EncodeConfig(), meta={"pinned": True}, workers=workers)
    assert sha256(path) == PINNED_SHA256["auto"]
    loaded = load(path, model=PinnedModel(), workers=workers)
    assert torch.equal(loaded.mlp.weight, pinned_model().mlp.weight)


def test_map_in_order_keeps_the_order_bounds_the_work_ahead_and_raises_the_first_error():
    import threading
    import time

    running, most = [0], [0]
    lock = threading.Lock()

    def slow(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01 * (i % 3))
        with lock:
            running[0] -= 1
        return i * i

    assert list(map_in_order(slow, range(20), workers=3)) == [i * i for i in range(20)]
    assert most[0] <= 3

    def fails(i):
        if i == 4:
            raise ConfigError("tensor 4 is bad")
        return i

    with pytest.raises(ConfigError, match="tensor 4"):
        list(map_in_order(fails, range(50), workers=2))
    with pytest.raises(ConfigError, match="workers must be an integer >= 1"):
        list(map_in_order(fails, range(3), workers=0))


def test_a_failure_while_streaming_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch):
    """The payload spills to an unnamed temporary file past ``SPOOL_BYTES``; an error in the middle leaves
    nothing behind, and spilling does not change a byte."""
    monkeypatch.setattr(fmt, "SPOOL_BYTES", 1)  # (0 would never spill)
    tensors = encode_model(pinned_model())
    path = tmp_path / "m.dsz"
    write_file(path, tensors, None, {"pinned": True})
    assert path.read_bytes() == b"".join(fmt.serialize(tensors, None, {"pinned": True}))

    def broken():
        yield from sorted(tensors.items())[:3]
        raise ConfigError("encoding failed")

    with pytest.raises(ConfigError, match="encoding failed"):
        fmt.write_tensors(tmp_path / "n.dsz", broken())
    with pytest.raises(ConfigError, match="name order"):
        fmt.write_tensors(tmp_path / "n.dsz", reversed(sorted(tensors.items())))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.dsz"]


# ---------------------------------------------------------------- loading in place


def layered_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(384, 384) for _ in range(8)))


def test_loading_fills_the_model_in_place_without_a_second_copy(tmp_path):
    """Each tensor is decoded, copied into the model's own parameter and freed: the peak of what loading
    allocates is a few layers, never the model (the whole-model path decoded every tensor first)."""
    import tracemalloc

    model = layered_model()
    prune_model(model, PruneConfig(q=50))
    quantize_model(model, QuantizeConfig(bits=4))
    compress_model(model, tmp_path / "m.dsz")
    target = layered_model()
    parameters = [id(p) for p in target.parameters()]
    model_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    tracemalloc.start()
    try:
        loaded = load(tmp_path / "m.dsz", model=target, workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded is target and [id(p) for p in target.parameters()] == parameters  # the same tensors, filled
    assert peak < 0.5 * model_bytes, (peak, model_bytes)
    stripped = strip(model)
    for name, tensor in stripped.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_a_model_built_from_the_spec_gets_the_decoded_tensors_and_its_ties(tmp_path):
    """Built on the meta device, it takes each decoded tensor as its own (in its own dtype), then its ties."""
    from deepshrink.models import build_model

    spec = {"arch": "mlp", "kwargs": {}}
    torch.manual_seed(0)
    model = build_model(spec)
    prune_model(model, PruneConfig(q=60))
    quantize_model(model, QuantizeConfig(bits=3))
    compress_model(model, tmp_path / "m.dsz", EncodeConfig(raw_dtype="float16"), model_spec=spec)
    loaded = load(tmp_path / "m.dsz")
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    expected = strip(model).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.allclose(tensor, expected[name].to(tensor.dtype), atol=1e-3), name


@pytest.mark.parametrize("mapped", [False, True])
def test_a_memory_mapped_file_reads_and_refuses_as_a_read_one(mapped, tmp_path, monkeypatch):
    if mapped:
        monkeypatch.setattr(fmt, "MMAP_MIN_BYTES", 0)
    path = tmp_path / "m.dsz"
    compress_model(pinned_model(), path, EncodeConfig(), meta={"pinned": True})
    header, tensors = fmt.read_file(path)
    assert header["meta"]["pinned"] and set(tensors) == set(fmt.open_file(path).encoded)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        fmt.open_file(path)
    path.write_bytes(b"")
    with pytest.raises(HeaderTooSmall):
        fmt.open_file(path)


# ---------------------------------------------------------------- bounded memory, the same results


@pytest.mark.parametrize("config", [QuantizeConfig(bits=3), QuantizeConfig(bits=3, method="ecsq", lam=0.5)])
def test_quantize_model_puts_back_every_layer_it_changed_when_a_later_one_fails(config):
    """Layers are quantized and attached one at a time; an error in a later layer restores the earlier ones
    exactly: masks (kept as what they add to the indices: kept zeros, weights ECSQ sent to zero), stored
    originals (their pruned values too), requires_grad and parametrizations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20), nn.Linear(20, 10))
    prune_model(model, PruneConfig(q=60, include=("0.*", "2.*")))
    with torch.no_grad():
        model[0].parametrizations.weight.original[tuple(model[0].parametrizations.weight[0].mask.nonzero()[:3].T)] = 0.0
        model[2].parametrizations.weight.original[0, 0] = float("nan")
        model[2].parametrizations.weight[0].mask[0, 0] = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="2.weight.*NaN"):
        quantize_model(model, config, workers=1)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name].isnan(), after[name].isnan()), name
        assert torch.equal(before[name].nan_to_num(), after[name].nan_to_num()), name
    assert isinstance(model[0].parametrizations.weight[0], Masked) and not parametrize.is_parametrized(model[1])
    assert all(p.requires_grad for p in model.parameters())


def test_auto_estimates_choose_what_encoding_every_codec_chooses(tmp_path, monkeypatch):
    """From ``ESTIMATE_FROM`` elements on, "auto" skips a codec its estimate rules out; on a large sparse
    layer (where cabac is ruled out) and the tests' models (estimates forced onto them) the choice and the
    bytes are those of encoding every codec in full."""
    import deepshrink.codecs.cabac as cabac
    import deepshrink.encode as encode

    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(2048, 1024))
    prune_model(big, PruneConfig(q=97))
    quantize_model(big, QuantizeConfig(bits=5))
    calls = []
    real = cabac.encode_levels
    monkeypatch.setattr(cabac, "encode_levels", lambda *a, **k: calls.append(1) or real(*a, **k))
    estimated = compress_model(big, tmp_path / "e.dsz")
    assert calls == []  # the estimate settled it: cabac never coded the 2M-weight layer
    exhaustive = compress_model(big, tmp_path / "x.dsz", exhaustive=True)
    assert calls == [1] and (tmp_path / "e.dsz").read_bytes() == (tmp_path / "x.dsz").read_bytes()
    assert [r["codec"] for r in estimated.rows] == [r["codec"] for r in exhaustive.rows]

    monkeypatch.setattr(encode, "ESTIMATE_FROM", 0)
    monkeypatch.setattr(cabac, "SAMPLE_LEAST", 256)
    for model in (pinned_model(), layered_pruned()):
        a = compress_model(model, tmp_path / "a.dsz")
        b = compress_model(model, tmp_path / "b.dsz", exhaustive=True)
        assert [r["codec"] for r in a.rows] == [r["codec"] for r in b.rows]
        assert (tmp_path / "a.dsz").read_bytes() == (tmp_path / "b.dsz").read_bytes()


def layered_pruned() -> nn.Sequential:
    model = layered_model()
    prune_model(model, PruneConfig(q=90, q_by_pattern=(("0.*", 50), ("1.*", 99))))
    quantize_model(model, QuantizeConfig(bits=5, bits_by_pattern=(("2.*", 2),)))
    return model


# ---------------------------------------------------------------- progress


def test_quiet_silences_the_progress_bars(tmp_path, monkeypatch):
    import sys

    import deepshrink.progress as progress
    from deepshrink.checkpoint import save_checkpoint
    from deepshrink.cli import main
    from deepshrink.models import build_model

    spec = {"arch": "mlp", "kwargs": {}}
    model = build_model(spec)
    prune_model(model, PruneConfig(q=80))
    quantize_model(model, QuantizeConfig(bits=3))
    checkpoint = save_checkpoint(tmp_path / "q.pt", model, spec, {"dataset": {"name": "digits"}})
    bars = []
    real = progress.Progress
    monkeypatch.setattr(progress, "Progress", lambda *a, **k: bars.append(not k["disable"]) or real(*a, **k))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["encode", str(checkpoint), "--out", str(tmp_path / "a.dsz")]) == 0
    assert main(["--quiet", "encode", str(checkpoint), "--out", str(tmp_path / "b.dsz")]) == 0
    assert bars == [True, False]
    assert (tmp_path / "a.dsz").read_bytes() == (tmp_path / "b.dsz").read_bytes()
