import math

import numpy as np
import pytest
import torch
from torch import nn

import deepshrink
from deepshrink import runtime
from deepshrink.runtime import kernels as runtime_kernels, model as runtime_model
from deepshrink.errors import ConfigError, TensorInfoMismatch
from deepshrink.compress import compress_model
from deepshrink.encode import EncodeConfig
from deepshrink.format import read_header
from deepshrink.models import build_model
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model
from deepshrink.runtime import SparseLinear

SPEC = {"arch": "mlp", "kwargs": {"num_classes": 10, "image_size": 8, "hidden": [48, 32]}}


def _compress(model, path, *, q=80.0, quantize=True, spec=None, **quantize_kwargs):
    torch.manual_seed(0)
    prune_model(model, PruneConfig(method="percentile", q=q))
    if quantize:
        quantize_model(model, QuantizeConfig(bits=4, **quantize_kwargs))
    compress_model(model, path, model_spec=spec)
    return path


def _dense_reference(path, architecture: nn.Module) -> nn.Module:
    """The densely decoded model: deepshrink.load's state dict in a fresh copy of the architecture."""
    state = deepshrink.load(path)
    architecture.load_state_dict(state)
    return architecture.eval()


def _assert_close(sparse: nn.Module, dense: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = dense(x), sparse(x)
    assert got.shape == expected.shape
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    torch.manual_seed(0)
    return _compress(build_model(SPEC), tmp_path_factory.mktemp("rt") / "mlp.dsz", spec=SPEC)


# ---------------------------------------------------------------- the kernels (functional core)


# batch 1 with uint16 columns and uint8 codes runs the packed kernel (rows of 40x300 span many whole words,
# starting anywhere in one); uint32 columns, uint16 codes or a batch run the plain ones
@pytest.mark.parametrize("rows,cols,k,batch", [(5, 9, 4, 1), (40, 300, 32, 1), (33, 70, 300, 1), (33, 70, 300, 7),
                                               (3, 70_000, 2, 1), (3, 70_000, 2, 2)])
def test_codebook_kernel_matches_dense_product(rows, cols, k, batch):
    rng = np.random.default_rng(rows + cols)
    keep = rng.random(rows * cols) < 0.2
    keep[: cols] = False  # an empty first row
    positions = np.flatnonzero(keep)
    form = runtime.csr_from_positions((rows, cols), positions, rng.integers(0, k, len(positions)),
                                      rng.standard_normal(k).astype(np.float32))
    assert form.codes.dtype == (np.uint8 if k <= 256 else np.uint16)
    assert form.col.dtype == (np.uint16 if cols <= 1 << 16 else np.uint32)
    assert form.nnz == len(positions) and len(form.col) == len(form.codes) == -(-len(positions) // runtime_kernels.PACK) * runtime_kernels.PACK
    bias = torch.randn(rows)
    xt = torch.randn(cols, batch)
    got = runtime.codebook_matmul(form, xt, bias)
    weight = form.dense().double()
    expected = weight @ xt.double() + bias.double()[:, None]
    magnitude = float((weight.abs() @ xt.double().abs()).max())  # float32 sums err relative to sum |terms|
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * magnitude)


@pytest.mark.parametrize("batch", [1, 5])
def test_threaded_rows_give_the_single_thread_result_bit_for_bit(monkeypatch, batch):
    rng = np.random.default_rng(7)
    positions = np.flatnonzero(rng.random(301 * 50) < 0.3)
    form = runtime.csr_from_positions((301, 50), positions, rng.integers(0, 16, len(positions)),
                                      rng.standard_normal(16).astype(np.float32))
    xt = torch.randn(50, batch)
    single = runtime.codebook_matmul(form, xt, max_threads=1)
    monkeypatch.setattr(runtime_kernels, "PARALLEL_MIN_WORK", 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        chunks = runtime_kernels.row_splits(form.crow, 3 * runtime_kernels.CHUNKS_PER_THREAD)
        assert len(chunks) > 3 and chunks[0][0] == 0 and chunks[-1][1] == 301
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        for _ in range(5):
            assert torch.equal(runtime.codebook_matmul(form, xt), single)
    finally:
        torch.set_num_threads(previous)


def test_csr_form_holds_exactly_the_decoded_weight(mlp_file):
    header, stored = runtime.read_compressed(mlp_file)
    dense = deepshrink.load(mlp_file).state_dict()
    coded = [name for name, v in stored.items() if isinstance(v, runtime.CsrCodebook)]
    assert sorted(coded) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for name, value in stored.items():
        expected = dense[name]
        got = value.dense() if isinstance(value, runtime.CsrCodebook) else value
        assert torch.equal(got, expected), name
    form = stored["fc1.weight"]
    assert form.nnz == int(torch.count_nonzero(dense["fc1.weight"]))
    assert form.nbytes < dense["fc1.weight"].numel() * 4 / 3


# ---------------------------------------------------------------- models: equal to the dense decode


@pytest.mark.parametrize("kernels", [None, ("codebook",), ("torch_csr",), ("dense",)])
@pytest.mark.parametrize("batch", [1, 7])
def test_sparse_mlp_equals_dense_decode(mlp_file, kernels, batch):
    sparse = runtime.load(mlp_file, batch_size=batch, kernels=kernels, repeats=2, min_sparse_bytes=0)
    dense = deepshrink.load(mlp_file)
    _assert_close(sparse, dense, torch.randn(batch, 1, 8, 8))
    choices = runtime.report(sparse).layers
    assert sorted(choices) == ["fc1", "fc2", "fc3"]
    for name, choice in choices.items():
        layer = sparse.get_submodule(name)
        if kernels is not None:
            assert choice.kernel in kernels
        assert isinstance(layer, SparseLinear) == (choice.kernel != "dense")
        if choice.kernel != "dense":
            assert layer.kernel == choice.kernel


def test_choice_is_the_fastest_measured_and_is_reported(mlp_file, caplog):
    with caplog.at_level("INFO", logger="deepshrink.runtime"):
        sparse = deepshrink.load(mlp_file, runtime="sparse", batch_size=3, repeats=3, min_sparse_bytes=0)
    rep = runtime.report(sparse)
    assert rep.batch_size == 3 and rep.threads == torch.get_num_threads()
    one_thread = {runtime_model.ONE_THREAD} if torch.get_num_threads() > 1 else set()
    for name, choice in rep.layers.items():
        assert set(choice.times_ms) == {"codebook", "torch_csr", "dense"} | one_thread
        assert choice.kernel in runtime.KERNELS
        fastest = min(choice.times_ms.values())
        assert choice.times_ms[choice.label] <= runtime_model.CLOSE_ENOUGH * fastest
        smaller_and_close = [k for k, ms in choice.times_ms.items()
                             if ms <= runtime_model.CLOSE_ENOUGH * fastest and choice.bytes[k] < choice.bytes[choice.label]]
        assert not smaller_and_close
        layer = sparse.get_submodule(name)
        assert getattr(layer, "max_threads", None) == choice.max_threads
        assert choice.bytes["codebook"] < choice.bytes["torch_csr"] < choice.bytes["dense"]
        assert 0.15 < choice.density < 0.25 and choice.stored == "quantized"
        assert f"{name}: quantized linear" in caplog.text
    assert rep.to_dict()["layers"]["fc1"]["kernel"] == rep.layers["fc1"].kernel


def test_small_layers_stay_dense_untimed_unless_forced(mlp_file):
    rep = runtime.report(runtime.load(mlp_file, repeats=1)).layers  # every layer is under 256 KiB dense
    assert all(c.kernel == "dense" and not c.times_ms for c in rep.values())
    rep = runtime.report(runtime.load(mlp_file, repeats=1, min_sparse_bytes=48 * 32 * 4 + 1)).layers
    assert rep["fc1"].times_ms and not rep["fc2"].times_ms and rep["fc2"].kernel == "dense"  # 64x48, 48x32
    rep = runtime.report(runtime.load(mlp_file, kernels=("codebook",), repeats=1)).layers
    assert all(c.kernel == "codebook" for c in rep.values())  # asked for: small or not
    with pytest.raises(ConfigError, match="min_sparse_bytes"):
        runtime.load(mlp_file, min_sparse_bytes=-1)


def test_sparse_layers_hold_no_dense_weight(mlp_file):
    sparse = runtime.load(mlp_file, kernels=("codebook",), repeats=1)
    dense = deepshrink.load(mlp_file)
    weight_numels = {m.weight.numel() for m in dense.modules() if isinstance(m, nn.Linear)}
    for module in sparse.modules():
        assert isinstance(module, (SparseLinear, type(sparse)))
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            assert t.numel() not in weight_numels
    assert runtime.weight_bytes(sparse) < runtime.weight_bytes(dense) / 3


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 7])
def test_models_without_spec_with_and_without_bias(tmp_path, bias, batch):
    def arch():
        return nn.Sequential(nn.Linear(20, 30, bias=bias), nn.ReLU(), nn.Linear(30, 5, bias=bias))

    torch.manual_seed(1)
    path = _compress(arch(), tmp_path / "seq.dsz")
    with pytest.raises(ConfigError, match="no model spec"):
        runtime.load(path)
    with torch.device("meta"):
        skeleton = arch()
    sparse = runtime.load(path, batch_size=batch, model=skeleton, kernels=("codebook",), repeats=1)
    assert isinstance(sparse[0], SparseLinear) and (sparse[0].bias is not None) == bias
    _assert_close(sparse, _dense_reference(path, arch()), torch.randn(batch, 20))
    _assert_close(sparse, _dense_reference(path, arch()), torch.randn(2, batch, 20))  # leading dims kept


class TiedMLP(nn.Module):
    """Two layers sharing one weight (stored once in the file)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("kernels", ["codebook", "dense"])
def test_tied_weights_stored_once_run_under_both_names(tmp_path, kernels):
    model = TiedMLP()
    prune_model(model, PruneConfig(q=80))
    quantize_model(model, QuantizeConfig(bits=4))
    path = tmp_path / "tied.dsz"
    compress_model(model, path)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    expected = deepshrink.load(path, model=TiedMLP())(x)
    fast = runtime.load(path, 3, model=TiedMLP(), kernels=kernels, min_sparse_bytes=0)
    torch.testing.assert_close(fast(x), expected)
    assert set(runtime.report(fast).layers) == {"a", "b"}


def test_file_mixing_quantized_raw_and_pruned_only_layers(tmp_path):
    def arch():
        return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 6))

    torch.manual_seed(2)
    model = arch()
    prune_model(model, PruneConfig(method="percentile", q=70, include=("0.*", "2.*")))  # layer 4 stays dense
    quantize_model(model, QuantizeConfig(bits=5, include=("0.*",)))  # layer 2: pruned only (raw with zeros)
    path = tmp_path / "mixed.dsz"
    compress_model(model, path)
    _, stored = runtime.read_compressed(path)
    assert isinstance(stored["0.weight"], runtime.CsrCodebook)
    assert isinstance(stored["2.weight"], torch.Tensor) and isinstance(stored["4.weight"], torch.Tensor)
    for kernels in [("codebook",), ("torch_csr",), None]:
        for batch in (1, 7):
            sparse = runtime.load(path, batch_size=batch, model=arch(), kernels=kernels, repeats=2,
                                  min_sparse_bytes=0)
            _assert_close(sparse, _dense_reference(path, arch()), torch.randn(batch, 24))
    sparse = runtime.load(path, model=arch(), kernels=("codebook",), repeats=1)
    rep = runtime.report(sparse).layers
    assert rep["0"].kernel == "codebook" and rep["0"].stored == "quantized"
    assert rep["2"].kernel == "dense" and rep["2"].stored == "raw"  # no codebook: only dense was a candidate
    assert rep["2"].density == pytest.approx(0.3, abs=0.02) and rep["4"].density == 1.0
    sparse = runtime.load(path, model=arch(), kernels=("torch_csr",), repeats=1)
    assert runtime.report(sparse).layers["2"].kernel == "torch_csr" and isinstance(sparse[2], SparseLinear)
    rep = runtime.report(runtime.load(path, model=arch(), repeats=1, min_sparse_bytes=0)).layers
    assert set(rep["0"].times_ms) - {runtime_model.ONE_THREAD} == {"codebook", "torch_csr", "dense"}
    assert set(rep["2"].times_ms) == set(rep["4"].times_ms) == {"torch_csr", "dense"}


def test_grid_biases_run_as_dense_tensors(tmp_path):
    def arch():
        return nn.Sequential(nn.Linear(24, 300), nn.ReLU(), nn.Linear(300, 6))

    torch.manual_seed(3)
    model = arch()
    prune_model(model, PruneConfig(method="percentile", q=80))
    quantize_model(model, QuantizeConfig(bits=4))
    path = tmp_path / "grid.dsz"
    compress_model(model, path, EncodeConfig(grid_bits=6))
    assert read_header(path)["tensors"]["0.bias"]["codec"] == "grid"
    _, stored = runtime.read_compressed(path)
    assert torch.equal(stored["0.bias"], deepshrink.load(path)["0.bias"])
    for batch in (1, 7):
        sparse = runtime.load(path, batch_size=batch, model=arch(), kernels=("codebook",), repeats=1,
                              min_sparse_bytes=0)
        assert isinstance(sparse[0], SparseLinear)
        _assert_close(sparse, _dense_reference(path, arch()), torch.randn(batch, 24))


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(6, 12, 1), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 10, 1, stride=2, bias=False), nn.Flatten(), nn.Linear(10 * 3 * 3, 4),
    )


@pytest.mark.parametrize("kernels", [("codebook",), ("torch_csr",), None])
@pytest.mark.parametrize("batch", [1, 7])
def test_conv_model_equals_dense_decode(tmp_path, kernels, batch):
    torch.manual_seed(3)
    path = _compress(_conv_net(), tmp_path / "conv.dsz", q=60)
    sparse = runtime.load(path, batch_size=batch, model=_conv_net(), kernels=kernels, repeats=2, conv_input_hw=(5, 5),
                          min_sparse_bytes=0)
    _assert_close(sparse, _dense_reference(path, _conv_net()), torch.randn(batch, 6, 5, 5))
    rep = runtime.report(sparse).layers
    assert sorted(rep) == ["0", "4", "6"]  # 1x1 convs and the Linear; the 3x3 conv always runs dense
    assert rep["0"].kind == "conv1x1" and rep["6"].kind == "linear"
    assert isinstance(sparse[2], nn.Conv2d) and not isinstance(sparse[2], SparseLinear)
    if kernels is not None:
        assert all(isinstance(sparse[i], SparseLinear) for i in (0, 4, 6))


# ---------------------------------------------------------------- bad input


def test_bad_arguments_are_config_errors(mlp_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown runtime 'fast'.*dense, sparse"):
        deepshrink.load(mlp_file, runtime="fast")
    with pytest.raises(ConfigError, match="kernel"):
        runtime.load(mlp_file, kernels=("blas",))
    with pytest.raises(ConfigError, match="kernel"):
        runtime.load(mlp_file, kernels=())
    with pytest.raises(ConfigError, match="batch_size"):
        runtime.load(mlp_file, batch_size=0)
    with pytest.raises(ConfigError, match="repeats"):
        runtime.load(mlp_file, repeats=0)
    with pytest.raises(ConfigError, match="device"):
        runtime.load(mlp_file, device="tpu")
    with pytest.raises(ConfigError, match="not built by"):
        runtime.report(nn.Linear(2, 2))
    with pytest.raises(TensorInfoMismatch, match="fc1.weight"):
        runtime.load(mlp_file, model=build_model({"arch": "mlp", "kwargs": {"hidden": [40, 32]}}))
    with pytest.raises(ConfigError, match="trust_factory"):
        path = tmp_path / "factory.dsz"
        compress_model(nn.Linear(3, 2), path, model_spec={"factory": "os:getcwd"})
        runtime.load(path)


def test_dense_runtime_is_the_default_loader(mlp_file):
    a, b = deepshrink.load(mlp_file), deepshrink.load(mlp_file, runtime="dense")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not any(isinstance(m, SparseLinear) for m in a.modules())
    assert math.isclose(runtime.weight_bytes(a), sum(t.numel() * 4 for t in a.state_dict().values()))


def test_benchmark_and_bench_infer_command(mlp_file, capsys):
    import json

    from deepshrink.cli import main

    result = runtime.benchmark(mlp_file, (1, 3), repeats=2, threads=1, min_sparse_bytes=0)
    assert result["threads"] == 1 and torch.get_num_threads() != 0
    layers = [r for r in result["rows"] if r["layer"] != "(model)"]
    models = [r for r in result["rows"] if r["layer"] == "(model)"]
    assert [r["batch"] for r in models] == [1, 3] and len(layers) == 6
    for row in layers:
        assert row["dense_ms"] > 0 and row["codebook_ms"] > 0 and row["torch_csr_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / result["choices"][row["batch"]]["layers"][
            row["layer"]]["times_ms"][row["kernel"].split(" ")[0] if "1 thread" not in row["kernel"]
                                      else runtime_model.ONE_THREAD])
    dense_bytes = runtime.weight_bytes(deepshrink.load(mlp_file))
    assert all(r["dense_bytes"] == dense_bytes for r in models)
    assert main(["-q", "bench-infer", str(mlp_file), "--batch", "1,2", "--repeats", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {r["batch"] for r in printed["rows"]} == {1, 2}
    assert main(["-q", "bench-infer", str(mlp_file), "--batch", "1,x"]) == 2
    assert "--batch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="batch sizes"):
        runtime.benchmark(mlp_file, (0,))
