"""ONNX export: ONNX Runtime runs the decoded model, dense or palettized, with deepshrink.load's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepshrink
from deepshrink import export
from deepshrink.palettize import pack_uint4, palette
from deepshrink.cli import main
from deepshrink.compress import compress_model
from deepshrink.data import Batches, load_dataset
from deepshrink.encode import EncodeConfig
from deepshrink.errors import ConfigError, ExportError
from deepshrink.models import build_model, model_spec
from deepshrink.pipeline import dataset_record
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install deepshrink[onnx])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install deepshrink[onnx])")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None, "test")


def digits_inputs(digits, n: int = 256) -> torch.Tensor:
    """Real inputs: the first ``n`` digits test images, normalised as training saw them."""
    return next(iter(Batches(digits, n)))[0]


def compressed(model: nn.Module, path, *, bits: int = 4, bits_conv: int | None = None, q: float = 80, spec=None,
               meta=None, config: EncodeConfig = EncodeConfig()):
    torch.manual_seed(0)
    prune_model(model, PruneConfig(q=q))
    quantize_model(model, QuantizeConfig(bits=bits, bits_conv=bits_conv))
    compress_model(model, path, config, model_spec=spec, meta=meta)
    return path


def ort_outputs(path, x: torch.Tensor, level=None) -> np.ndarray:
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model.eval()(x)
    return (out.logits if hasattr(out, "logits") else out).numpy()


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4
    assert (got.reshape(-1, got.shape[-1]).argmax(-1) == expected.reshape(-1, expected.shape[-1]).argmax(-1)).all()


def palettized_parts(path) -> tuple[list, list[str]]:
    graph = onnx.load(str(path)).graph
    return [t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8], [n.op_type for n in graph.node]


# ---------------------------------------------------------------- the functional core


def test_palette_rebuilds_the_values_with_zero_at_index_0():
    values = np.array([[0.5, -0.25, 0.0], [0.0, 0.5, -1.0]], np.float32)
    codebook, indices = palette(values)
    assert codebook[0] == 0.0 and indices.dtype == np.uint8 and indices.shape == values.shape
    assert np.array_equal(codebook[indices], values)
    assert (indices == 0).sum() == 2  # the two pruned weights
    codebook, indices = palette(np.arange(300, dtype=np.float32))  # 8-bit weights and zero need 257 levels
    assert indices.dtype == np.uint16 and np.array_equal(codebook[indices], np.arange(300))
    assert palette(np.arange(70_000, dtype=np.float32)) is None  # too many levels to share


def test_pack_uint4_puts_the_first_index_in_the_low_nibble():
    assert pack_uint4(np.array([1, 2, 3], np.uint8)) == bytes([0x21, 0x03])


def test_dataset_metadata_copies_only_well_formed_values():
    good = {"name": "mnist", "image_shape": [1, 28, 28], "mean": [0.13], "std": [0.31], "num_classes": 10}
    meta = export.dataset_metadata(good)
    assert meta["dataset"] == "mnist" and meta["image_shape"] == "[1, 28, 28]" and meta["num_classes"] == "10"
    assert meta["mean"] == "[0.13]" and "255" in meta["preprocessing"]
    hostile = {"name": "x\n" * 100, "image_shape": [True, -1, 10**9], "mean": [float("nan")], "std": [0.0],
               "num_classes": "10", "extra": object()}
    assert export.dataset_metadata(hostile) == {}
    assert export.dataset_metadata(["not", "a", "dict"]) == {}
    assert "mean" not in export.dataset_metadata({**good, "std": [0.3, 0.3]})  # 2 channels for a 1-channel image


# ---------------------------------------------------------------- models, dense and palettized


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("mlp") / "mlp.dsz"
    spec = model_spec("lenet300", image_size=8)  # LeNet-300-100 sized for 8x8 digits
    meta = {"dataset": dataset_record({"name": "digits"}, digits)}
    return compressed(build_model(spec), path, spec=spec, meta=meta, bits=5, q=90)


def test_lenet300_dense_and_palettized_match_deepshrink_load(mlp_file, digits, tmp_path):
    x = digits_inputs(digits)
    expected = reference(deepshrink.load(mlp_file), x)
    dense = export.to_onnx(mlp_file, tmp_path / "dense.onnx")
    small = export.to_onnx(mlp_file, tmp_path / "palettized.onnx", palettized=True)
    for result in (dense, small):
        assert_same(ort_outputs(result.path, x), expected)
        assert result.input_shape == (1, 8, 8) and result.max_abs_diff < 1e-4  # from the dataset record
    assert small.onnx_bytes < dense.onnx_bytes / 3
    uint8, ops = palettized_parts(small.path)
    assert {t.name for t in uint8} == {"fc1.weight::indices", "fc2.weight::indices", "fc3.weight::indices"}
    assert ops.count("Gather") == 3 and palettized_parts(dense.path) == ([], ["Flatten", "Gemm", "Relu", "Gemm",
                                                                                 "Relu", "Gemm"])
    assert {t.levels for t in small.palettized} <= set(range(2, 34))  # 32 shared values and zero
    props = {p.key: p.value for p in onnx.load(small.path).metadata_props}
    assert props["dataset"] == "digits" and props["image_shape"] == "[1, 8, 8]" and props["num_classes"] == "10"
    assert props["mean"] and props["std"] and "uint8" in props["palettized"]


def test_lenet5_palettized_matches_on_upsampled_digits(tmp_path, digits):
    # the paper's bits: 8 for convolutions (256 shared values and zero: uint16 indices), 5 for the rest
    path = compressed(build_model("lenet5"), tmp_path / "lenet5.dsz", spec=model_spec("lenet5"), bits=5, bits_conv=8)
    x = F.interpolate(digits_inputs(digits, 64), size=(28, 28), mode="bilinear")  # real digits at LeNet-5's size
    result = export.to_onnx(path, tmp_path / "lenet5.onnx", palettized=True, input_shape=(1, 28, 28))
    assert_same(ort_outputs(result.path, x), reference(deepshrink.load(path), x))
    bits = {t.name: t.index_bits for t in result.palettized}
    assert bits["conv2.weight"] == 16 and bits["fc1.weight"] == bits["fc2.weight"] == 8 and "conv1.weight" in bits


def random_batchnorm_stats(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("fold", [False, True], ids=["batchnorm", "batchnorm-folded"])
def test_resnet20_palettized_matches_with_and_without_folded_batchnorm(tmp_path, fold):
    spec = model_spec("resnet20")
    path = compressed(random_batchnorm_stats(build_model(spec)), tmp_path / "r20.dsz", spec=spec, bits=4, q=70,
                      config=EncodeConfig(fold_batchnorm=fold))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = export.to_onnx(path, tmp_path / "r20.onnx", palettized=True, input_shape=(3, 32, 32))
    expected = reference(deepshrink.load(path), x)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        assert_same(ort_outputs(result.path, x, level), expected)
    weights = {n for n, p in build_model(spec).named_parameters() if p.dim() > 1}  # 19 convolutions, the classifier
    assert len(weights) == 20 and weights <= {t.name for t in result.palettized}
    assert "BatchNormalization" in palettized_parts(result.path)[1]  # kept for ONNX Runtime to fuse


class Encoder(nn.Module):
    """A tiny vision-transformer-like encoder (as tests/test_anymodel.py's)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(torch.randn(5, 8) * 0.1)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x + self.pos).mean(1))


def test_transformer_encoder_from_a_user_model(tmp_path):
    path = compressed(Encoder(), tmp_path / "enc.dsz", q=50)  # no model spec: the user builds the model
    x = torch.randn(9, 5, 8, generator=torch.Generator().manual_seed(0))
    result = export.to_onnx(path, tmp_path / "enc.onnx", model=Encoder(), input_shape=(5, 8), palettized=True)
    assert_same(ort_outputs(result.path, x), reference(deepshrink.load(path, model=Encoder()), x))
    assert result.palettized and result.metadata["input"] == "input: float32 [batch,5,8]"

    filled = deepshrink.load(path, model=Encoder()).train()  # a module as the source, left in its own mode
    filled.head.eval()
    export.to_onnx(filled, tmp_path / "module.onnx", input_shape=(5, 8))
    assert filled.training and filled.encoder.training and not filled.head.training


def test_gpt2_from_a_config_exports_token_ids_to_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (deepshrink[hf])")

    def tiny_gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()

    path = compressed(tiny_gpt2(), tmp_path / "gpt2.dsz", q=60)
    result = export.to_onnx(path, tmp_path / "gpt2.onnx", model=tiny_gpt2(), input_shape=(7,), palettized=True)
    assert result.input_dtype == "int64" and "transformer.wte.weight" in {t.name for t in result.palettized}
    loaded = deepshrink.load(path, model=tiny_gpt2())
    for shape in ((3, 7), (1, 12)):  # batch and sequence length are both dynamic
        ids = torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(2))
        assert_same(ort_outputs(result.path, ids), reference(loaded, ids))


def test_a_palettized_graph_packs_few_levels_as_uint4_unless_an_older_opset_is_asked(tmp_path, digits):
    spec = model_spec("mlp")
    path = compressed(build_model(spec), tmp_path / "m.dsz", spec=spec, bits=2,
                      meta={"dataset": dataset_record({"name": "digits"}, digits)})
    uint8 = export.to_onnx(path, tmp_path / "uint8.onnx", palettized=True, opset=18)
    uint4 = export.to_onnx(path, tmp_path / "uint4.onnx", palettized=True)  # the default: opset 21
    assert (uint4.opset, uint8.opset) == (21, 18) and export.to_onnx(path, tmp_path / "d.onnx").opset == 18
    assert {t.index_bits for t in uint4.palettized} == {4} and {t.index_bits for t in uint8.palettized} == {8}
    assert uint4.onnx_bytes < 0.6 * uint8.onnx_bytes
    graph = onnx.load(uint4.path).graph
    assert {t.data_type for t in graph.initializer if t.name.endswith("::indices")} == {onnx.TensorProto.UINT4}
    x = digits_inputs(digits)
    assert_same(ort_outputs(uint4.path, x), reference(deepshrink.load(path), x))


# ---------------------------------------------------------------- what cannot be exported


class Differences(nn.Module):
    def forward(self, x):
        return torch.diff(x, dim=-1)  # no ONNX conversion in torch 2.13's TorchScript exporter


def differences_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), Differences())


def test_an_unsupported_op_names_the_op_and_the_layer_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match=r"layer\(s\) 1 \(Differences\).*'aten::diff'"):
        export.to_onnx(differences_model(), tmp_path / "x.onnx", input_shape=(4,))
    assert list(tmp_path.iterdir()) == []  # no .onnx, no temp file


def test_a_forward_that_rejects_the_input_shape_is_an_export_error(tmp_path, mlp_file):
    with pytest.raises(ExportError, match=r"input of shape \(2, 3, 8, 8\)"):
        export.to_onnx(mlp_file, tmp_path / "x.onnx", input_shape=(3, 8, 8))


def test_no_input_shape_and_no_dataset_record_is_a_config_error(tmp_path):
    path = compressed(Encoder(), tmp_path / "enc.dsz")
    with pytest.raises(ConfigError, match="no input shape.*--input-shape"):
        export.to_onnx(path, tmp_path / "x.onnx", model=Encoder())
    with pytest.raises(ConfigError, match="positive integers"):
        export.to_onnx(path, tmp_path / "x.onnx", model=Encoder(), input_shape=(5, 0))
    with pytest.raises(ConfigError, match="opset"):
        export.to_onnx(path, tmp_path / "x.onnx", model=Encoder(), input_shape=(5, 8), opset=7)


def test_cli_exports_and_reports_errors_on_one_line(tmp_path, mlp_file, capfd):
    out = tmp_path / "m.onnx"
    assert main(["export", str(mlp_file), "--onnx", str(out), "--palettized"]) == 0
    assert out.is_file() and "ONNX Runtime matches PyTorch" in capfd.readouterr().out

    no_spec = compressed(Encoder(), tmp_path / "enc.dsz")
    assert main(["export", str(no_spec), "--onnx", str(tmp_path / "e.onnx"), "--input-shape", "5,8"]) == 2
    err = capfd.readouterr().err
    assert "error:" in err and "names no model" in err and "Traceback" not in err
    assert not (tmp_path / "e.onnx").exists()

    path = tmp_path / "diff.dsz"
    compress_model(differences_model(), path, model_spec={"factory": "test_export:differences_model", "kwargs": {}})
    assert main(["export", str(path), "--onnx", str(tmp_path / "d.onnx")]) == 2
    assert "--trust-factory" in capfd.readouterr().err  # the file's factory is not run without it
    assert main(["export", str(path), "--onnx", str(tmp_path / "d.onnx"), "--model", "test_export:differences_model",
                 "--input-shape", "4"]) == 2
    printed = capfd.readouterr()
    assert "aten::diff" in printed.err and "Differences" in printed.err
    assert "graph" not in printed.out + printed.err  # torch's IR dump goes to the debug log, not the terminal
