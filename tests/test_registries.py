"""A new coder and a new pruning rule are one module each: registered from here, never touching the package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import deepshrink
from deepshrink import format as fmt
from deepshrink.checkpoint import save_checkpoint
from deepshrink.cli import main
from deepshrink.codecs import CODECS, TensorCodec, TensorToStore, register_codec
from deepshrink.codecs.common import check_entry, expect
from deepshrink.codecs.deep_compression import _max_symbols
from deepshrink.coding import CODERS, register
from deepshrink.compress import compress_model
from deepshrink.parametrizations import masks, strip
from deepshrink.encode import EncodeConfig, stored_bytes
from deepshrink.errors import CodecError, ConfigError, InvalidHeader, TensorInfoMismatch
from deepshrink.format import inspect_file, read_file, read_header, write_file
from deepshrink.models import build_model
from deepshrink.prune import PRUNERS, PruneConfig, prune_model, register_pruner
from deepshrink.quantize import QuantizeConfig, quantize_model

SPEC = {"arch": "mlp", "kwargs": {}}


@pytest.fixture
def registries():
    """Register this module's coder and pruning rule; restore both registries afterwards."""
    coders, pruners = dict(CODERS), dict(PRUNERS)

    @register("fixed16")
    class Fixed16Coder:
        """Every symbol as a little-endian uint16: a baseline with no entropy coding."""

        name: ClassVar[str] = "fixed16"
        min_bits_per_symbol: ClassVar[float] = 16.0

        def encode(self, symbols, alphabet_size):
            return np.asarray(symbols, dtype="<u2").tobytes(), {"width": 2}

        def decode(self, payload, params, count, alphabet_size):
            if len(payload) != 2 * count:
                raise CodecError(f"{len(payload)} bytes cannot hold {count} uint16 symbols")
            return np.frombuffer(payload, dtype="<u2").astype(np.uint32)

        def validate_params(self, params, alphabet_size):
            if params != {"width": 2}:
                raise CodecError(f"fixed16 params must be {{'width': 2}}, got {params!r}")

    @register_pruner("first-q")
    def first_q_mask(weight, q, prev_mask=None, *, scores=None):
        """Prune the first round(q% of n) entries in flat order (a rule no magnitude rule equals)."""
        keep = torch.ones(weight.numel(), dtype=torch.bool)
        keep[: round(q / 100 * weight.numel())] = False
        keep = keep.view(weight.shape)
        return keep if prev_mask is None else keep & prev_mask

    yield
    for registry, saved in ((CODERS, coders), (PRUNERS, pruners)):
        registry.clear()
        registry.update(saved)


def test_a_registered_rule_and_coder_run_through_prune_compress_and_load(registries, tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC)
    prune_model(model, PruneConfig(method="first-q", q=60))
    fc1 = masks(model)["fc1.weight"].reshape(-1)
    cut = round(0.6 * fc1.numel())
    assert not fc1[:cut].any() and fc1[cut:].all()
    quantize_model(model, QuantizeConfig(bits=3))
    report = compress_model(model, tmp_path / "m.dsz", EncodeConfig(coder="fixed16"), model_spec=SPEC, verify=True)
    header = read_header(tmp_path / "m.dsz")
    coded = [e for e in header["tensors"].values() if e["codec"] == "deep_compression"]
    assert len(coded) == 3 and all(e["coder"] == "fixed16" for e in coded)
    row = next(r for r in report.rows if r["name"] == "fc1.weight")
    assert row["weight_stream_bits"] == 16 * row["nonzero"]  # the coder's own bitstream, 16 bits a symbol
    loaded = deepshrink.load(tmp_path / "m.dsz")
    expected = strip(model).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_the_cli_offers_what_is_registered(registries, tmp_path, capsys):
    torch.manual_seed(0)
    dense = save_checkpoint(tmp_path / "d.pt", build_model(SPEC), SPEC)
    pruned, quant, dsz = tmp_path / "p.pt", tmp_path / "q.pt", tmp_path / "m.dsz"
    assert main(["prune", str(dense), "--method", "first-q", "--q", "50", "--out", str(pruned)]) == 0
    assert main(["quantize", str(pruned), "--bits", "2", "--out", str(quant)]) == 0
    assert main(["encode", str(quant), "--coder", "fixed16", "--out", str(dsz)]) == 0
    assert {e["coder"] for e in read_header(dsz)["tensors"].values() if "coder" in e} == {"fixed16"}


def test_the_loader_bounds_a_stream_by_the_coders_cheapest_symbol(registries, tmp_path):
    model = build_model(SPEC)
    quantize_model(model, QuantizeConfig(bits=2))
    compress_model(model, tmp_path / "m.dsz", EncodeConfig(coder="fixed16"))
    parsed = fmt.open_file(tmp_path / "m.dsz")
    entry = parsed.header["tensors"]["fc3.weight"]
    length = entry["weights_stream"]["bytes"]
    assert _max_symbols(CODERS["fixed16"], length) == entry["num_nonzero"]  # 16 bits each, exactly


def test_registering_a_taken_name_or_a_bad_rule_is_a_config_error(registries):
    with pytest.raises(ConfigError, match="already registered"):
        register("huffman")(type(CODERS["huffman"]))
    with pytest.raises(ConfigError, match="does not follow the Coder protocol"):
        register("nothing")(type("Nothing", (), {}))
    with pytest.raises(ConfigError, match="already registered"):
        register_pruner("std")(lambda *a, **k: None)
    with pytest.raises(ConfigError, match="per_layer 'first-q-global'"):
        register_pruner("g", scope="global", per_layer="first-q-global")
    with pytest.raises(ConfigError, match="unknown prune method 'nope'; valid: std, percentile, global, first-q"):
        PruneConfig(method="nope")


# ---------------------------------------------------------------- a tensor codec from outside the package


@dataclass(frozen=True)
class Int8Tensor:
    """A float tensor as int8 levels times one float32 scale (symmetric linear quantization)."""

    levels: np.ndarray  # int8, shaped like the tensor
    scale: float

    shape = property(lambda self: self.levels.shape)
    dtype = np.dtype("<f4")


def int8_tensor(values: np.ndarray) -> Int8Tensor:
    scale = float(np.float32(np.abs(values).max() / 127))
    return Int8Tensor(np.rint(values / scale).astype(np.int8), scale)


class Int8Codec(TensorCodec):
    name = "int8"
    tensor_type = Int8Tensor
    first_version = 4

    def entry(self, name, tensor, add):
        return {"codec": self.name, "dtype": "float32", "shape": list(tensor.shape), "scale": tensor.scale,
                **add(tensor.levels.tobytes())}

    def check(self, entry, name, at, sections):
        numel = check_entry(entry, sections.keys({"codec", "dtype", "shape", "scale"}), at)
        expect(isinstance(entry["scale"], float) and entry["scale"] > 0, at, "scale must be a float > 0",
               TensorInfoMismatch)
        sections.add(entry, at, name, numel)
        return 0, numel

    def view(self, name, entry, span, at):
        return Int8Tensor(np.frombuffer(span(name), np.int8).reshape(entry["shape"]), entry["scale"])

    def decode(self, tensor, where):
        return tensor.levels.astype(np.float32) * np.float32(tensor.scale)

    def encode(self, tensor, config):
        values = tensor.values
        if tensor.quantized is not None or not values.dtype.is_floating_point or not values.abs().max() > 0:
            return None
        return int8_tensor(values.detach().float().numpy())

    def stored_bytes(self, tensor):
        return tensor.levels.nbytes

    def account(self, tensor, where):
        return {"nonzero": int(np.count_nonzero(tensor.levels)), "stored_bytes": tensor.levels.nbytes}


@pytest.fixture
def int8_codec():
    register_codec(Int8Codec)
    yield CODECS["int8"]
    del CODECS["int8"]


def _file_with_int8_biases(path, **encode):
    torch.manual_seed(0)
    model = build_model(SPEC)
    quantize_model(model, QuantizeConfig(bits=3))
    compress_model(model, path, EncodeConfig(coder="cabac", **encode), model_spec=SPEC)
    return model


def test_a_registered_tensor_codec_is_chosen_written_checked_loaded_and_accounted(int8_codec, tmp_path):
    model = _file_with_int8_biases(tmp_path / "m.dsz")
    bias = strip(model).state_dict()["fc1.bias"]
    int8 = int8_tensor(bias.numpy())
    header = read_header(tmp_path / "m.dsz")
    # nothing in the package names it: the encoder asked every codec, and its 1 byte an element beat raw's 4
    assert {e["codec"] for n, e in header["tensors"].items() if n.endswith(".bias")} == {"int8"}
    assert header["tensors"]["fc1.bias"] == {
        "codec": "int8", "dtype": "float32", "shape": [int8.shape[0]], "scale": int8.scale}
    _, tensors = read_file(tmp_path / "m.dsz")
    assert torch.equal(tensors["fc1.bias"], torch.from_numpy(int8.levels.astype(np.float32) * np.float32(int8.scale)))
    loaded = deepshrink.load(tmp_path / "m.dsz")  # the model loads, this bias within half a scale step
    assert (loaded.state_dict()["fc1.bias"] - bias).abs().max() <= int8.scale / 2 + 1e-7
    sparse = deepshrink.load(tmp_path / "m.dsz", runtime="sparse")  # the runtime reads it dense, weights sparse
    x = torch.randn(4, 64)
    assert torch.allclose(sparse(x), loaded(x), atol=1e-5)
    row = next(r for r in inspect_file(tmp_path / "m.dsz").rows if r["name"] == "fc1.bias")
    assert row["codec"] == "int8" and row["stored_bytes"] == int8.levels.nbytes


def test_auto_picks_a_registered_codec_where_it_is_smallest(int8_codec, tmp_path):
    model = _file_with_int8_biases(tmp_path / "m.dsz", grid_bits=3)  # a 3-bit grid competes too
    header = read_header(tmp_path / "m.dsz")
    plain = strip(model).state_dict()
    for name in ("fc1.bias", "fc2.bias", "fc3.bias"):
        tensor = TensorToStore(name, plain[name])
        candidates = {codec.name: encoded for codec in CODECS.values()
                      if (encoded := codec.encode(tensor, EncodeConfig(grid_bits=3))) is not None}
        assert {"raw", "int8", "grid"} <= set(candidates)
        smallest = min(candidates, key=lambda c: stored_bytes(candidates[c]))
        assert header["tensors"][name]["codec"] == smallest, name


def test_a_registered_codec_is_held_to_its_checks_and_unknown_without_it(int8_codec, tmp_path):
    _file_with_int8_biases(tmp_path / "m.dsz")
    with pytest.raises(ConfigError, match="codec name 'int8' is empty or already registered"):
        register_codec(Int8Codec)
    del CODECS["int8"]  # a reader without the codec refuses the file by name, before decoding
    with pytest.raises(InvalidHeader, match="'codec' must be one of .* in a version-4 file"):
        read_header(tmp_path / "m.dsz")
    CODECS["int8"] = int8_codec
    with pytest.raises(ConfigError, match="expected one of RawTensor, .*Int8Tensor, got ndarray"):
        write_file(tmp_path / "x.dsz", {"b": np.ones(3)})
