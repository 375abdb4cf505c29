import copy
import dataclasses
import importlib.util
import json
import math
import struct
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from deepshrink import format as fmt
from deepshrink.coding import CODERS, entropy_bits, get_coder
from deepshrink.errors import (
    CodecError,
    ConfigError,
    DeepShrinkError,
    FormatError,
    TensorInfoMismatch,
)
from deepshrink.accounting import account
from deepshrink.codecs import CODECS, codec_of
from deepshrink.coding import level_coder
from deepshrink.codecs.deep_compression import (decode_quantized, encode_quantized, entries_to_positions,
                                               positions_to_entries)
from deepshrink.codecs.raw import ConstantTensor, RawTensor, encode_raw
from deepshrink.compress import compress_model, load
from deepshrink.parametrizations import plain_state_dict, strip
from deepshrink.encode import EncodeConfig, encode_model
from deepshrink.format import inspect_file, read_file, read_header, serialize, write_file
from deepshrink.models import build_model
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.parametrizations import SharedWeights
from deepshrink.quantize import QuantizeConfig, quantize_model

CODER_NAMES = list(CODERS)  # every registered coder
MODEL_CODERS = [*CODER_NAMES, "cabac"]  # EncodeConfig coders whose files the fuzz tests attack
FUZZED = [*MODEL_CODERS, "grid"]  # and a file with grid biases
STREAMS = {"deep_compression": ("weights_stream", "positions_stream"), "cabac": ("levels_stream",),
           "grid": ("levels_stream",)}


def _import_attacks():
    path = Path(__file__).resolve().parent / "format_attacks" / "attacks.py"
    spec = importlib.util.spec_from_file_location("deepshrink_format_attacks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


attacks = _import_attacks()


def tiny_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def quantized_tiny(bits: int = 3) -> nn.Sequential:
    """Pruned (70%) and quantized conv/BN/linear model with BN statistics that are not the defaults."""
    torch.manual_seed(0)
    model = tiny_model()
    model.train()
    model(torch.randn(16, 3, 8, 8))  # moves running stats and num_batches_tracked
    model.eval()
    prune_model(model, PruneConfig(method="percentile", q=70))
    quantize_model(model, QuantizeConfig(bits=bits))
    return model


def dense_reference(indices: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    table = np.concatenate([np.zeros(1, np.float32), codebook.astype(np.float32)])
    return table[indices.reshape(-1)].reshape(indices.shape)  # reshape: a 0-d index would give a scalar


def round_trip_file(tensors: dict, tmp: Path) -> dict:
    path = write_file(tmp / "t.dsz", tensors)
    return read_file(path)[1]


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile the coders' numba kernels once, so per-case time bounds measure decoding, not the compiler."""
    for name in CODER_NAMES:
        coded = encode_quantized(np.array([0, 1, 2, 0, 1]), np.array([1.0, 2.0], np.float32), 1, 2, name)
        decode_quantized(coded)


# ---------------------------------------------------------------- positions and fillers


def reference_entries(positions, index_bits):
    """The spec, one entry at a time: F = 2**b - 1 means 'skip F zeros'; r < F means 'skip r, then a weight'."""
    filler, out, cursor = (1 << index_bits) - 1, [], 0
    for p in positions:
        run = p - cursor
        while run >= filler:
            out.append(filler)
            run -= filler
        out.append(run)
        cursor = p + 1
    return out


def test_worked_example_of_docs_format_md():
    # index_bits=2 (filler F=3); non-zeros at 1, 6, 15: runs 1, 4, 8 -> [1], [3, 1], [3, 3, 2]
    entries = positions_to_entries(np.array([1, 6, 15]), 2)
    assert entries.tolist() == [1, 3, 1, 3, 3, 2]
    assert entries_to_positions(entries, 2, 16).tolist() == [1, 6, 15]


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 3000), max_size=40), st.integers(1, 9))
def test_entries_match_the_spec_and_invert(position_set, index_bits):
    positions = np.array(sorted(position_set), dtype=np.int64)
    entries = positions_to_entries(positions, index_bits)
    assert entries.dtype == np.uint32 and entries.tolist() == reference_entries(positions.tolist(), index_bits)
    assert entries_to_positions(entries, index_bits, 3001).tolist() == positions.tolist()


def test_entries_out_of_alphabet_are_rejected():
    with pytest.raises(TensorInfoMismatch, match="exceeds the 2-bit alphabet"):
        entries_to_positions(np.array([4]), 2, 100)


# ---------------------------------------------------------------- encode/decode round trips


@st.composite
def quantized_tensors(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 12), min_size=ndim, max_size=ndim)))
    bits = draw(st.integers(1, 8))
    k = draw(st.integers(1, 2**bits))
    density = draw(st.sampled_from([0.0, 0.003, 0.05, 0.3, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    numel = math.prod(shape)
    index_dtype = draw(st.sampled_from([np.uint8, np.int16, np.int32, np.int64])) if k <= 127 else np.int32
    indices = np.where(rng.random(numel) < density, rng.integers(1, k + 1, numel), 0).astype(index_dtype)
    codebook = (rng.standard_normal(k) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    return indices.reshape(shape), codebook, bits


@settings(max_examples=80, deadline=None)
@given(quantized_tensors(), st.integers(1, 9), st.sampled_from(CODER_NAMES), st.sampled_from(["float32", "float16"]))
def test_quantized_round_trip_is_bit_exact(tensor, index_bits, coder, codebook_dtype):
    indices, codebook, bits = tensor
    coded = encode_quantized(indices, codebook, bits, index_bits, coder, codebook_dtype)
    stored = codebook.astype(codebook_dtype)  # bit-exact w.r.t. the stored codebook
    expected = torch.from_numpy(dense_reference(indices.astype(np.int64), stored))
    assert coded.num_nonzero == np.count_nonzero(indices)
    assert torch.equal(torch.from_numpy(decode_quantized(coded)), expected)
    with tempfile.TemporaryDirectory() as tmp:
        decoded = round_trip_file({"w": coded}, Path(tmp))["w"]
    assert decoded.dtype == torch.float32 and torch.equal(decoded, expected)


EDGE_CASES = {
    "empty_1d": (np.zeros(0, np.uint8), 2, 3),
    "empty_3d": (np.zeros((3, 0, 2), np.uint8), 2, 3),
    "all_zero": (np.zeros((5, 7), np.uint8), 2, 3),
    "one_nonzero_first": (np.eye(1, 50, 0, dtype=np.uint8).reshape(5, 10), 1, 2),
    "one_nonzero_last": (np.eye(1, 50, 49, dtype=np.uint8).reshape(5, 10), 1, 2),
    "long_gaps_2bit": (np.isin(np.arange(4096), [0, 100, 1000, 4095]).astype(np.uint8) * 2, 2, 2),
    "long_gaps_1bit": (np.isin(np.arange(300), [7, 299]).astype(np.uint8), 1, 1),
    "k1_dense": (np.ones((4, 4), np.uint8), 1, 5),
    "k256_full": (np.arange(1, 257, dtype=np.int32).repeat(3), 8, 8),
    "k4096_full": (np.arange(1, 4097, dtype=np.int32), 12, 4),
}


@pytest.mark.parametrize("coder", CODER_NAMES)
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_round_trip(case, coder, tmp_path):
    indices, bits, index_bits = EDGE_CASES[case]
    k = max(int(indices.max()) if indices.size else 0, 1)
    codebook = np.linspace(-1, 1, k, dtype=np.float32)
    coded = encode_quantized(indices, codebook, bits, index_bits, coder)
    decoded = round_trip_file({"w": coded}, tmp_path)["w"]
    assert torch.equal(decoded, torch.from_numpy(dense_reference(indices.astype(np.int64), codebook)))
    gaps_fillers = len(positions_to_entries(np.flatnonzero(indices), index_bits)) - np.count_nonzero(indices)
    assert coded.num_entries - coded.num_nonzero == gaps_fillers


def test_weight_with_no_centroids_round_trips(tmp_path):
    # quantize_weight gives K=0 for an all-zero weight: no codebook, no streams, no coder call
    coded = encode_quantized(np.zeros((3, 3), np.uint8), np.zeros(0, np.float32), 4, 5, "huffman")
    assert coded.weights_stream == coded.positions_stream == b""
    assert coded.coder_params == {"weights": {}, "positions": {}}
    assert torch.equal(round_trip_file({"w": coded}, tmp_path)["w"], torch.zeros(3, 3))


RAW_DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("raw_dtype", ["float32", "float16"])
@pytest.mark.parametrize("dtype", RAW_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 4), (2, 3, 4)], ids=str)
def test_raw_tensors_round_trip(dtype, shape, raw_dtype, tmp_path):
    source = (torch.randn(shape) * 50).to(dtype)
    decoded = round_trip_file({"t": encode_raw(source, raw_dtype)}, tmp_path)["t"]
    expected = source.to(getattr(torch, raw_dtype)) if dtype.is_floating_point else source
    assert decoded.shape == source.shape and decoded.dtype == expected.dtype and torch.equal(decoded, expected)


@pytest.mark.parametrize("value, dtype", [(0.0, "<f4"), (-0.0, "<f4"), (0.1, "<f4"), (0.1, "<f2"), (-7, "<i8"),
                                          (2**63 - 1, "<i8"), (-128, "i1"), (255, "u1"), (True, "?"), (False, "?")],
                         ids=str)
@pytest.mark.parametrize("shape", [(), (5,), (2, 3)], ids=str)
def test_a_tensor_of_one_value_is_stored_as_that_value(value, dtype, shape, tmp_path):
    source = np.full(shape, value, dtype=np.dtype(dtype))
    raw_dtype = "float16" if dtype == "<f2" else "float32"
    encoded = encode_raw(torch.from_numpy(source.astype(source.dtype.newbyteorder("="))), raw_dtype)
    assert isinstance(encoded, ConstantTensor) and type(encoded.value) is type(value)
    assert encoded.value == source.reshape(-1)[0].item()  # what the dtype holds (0.1 rounds)
    report = compress_model_of({"t": encoded}, tmp_path)
    assert report.rows[0]["codec"] == "constant" and report.rows[0]["stored_bytes"] == 0
    decoded = read_file(tmp_path / "t.dsz")[1]["t"].numpy()
    assert decoded.dtype == source.dtype.newbyteorder("=") and decoded.shape == shape
    assert decoded.tobytes() == source.tobytes()  # bit for bit: -0.0 stays -0.0


@pytest.mark.parametrize("values", [[0.0, -0.0], [1.0, 2.0], [float("nan")] * 2, [float("inf")] * 3], ids=str)
def test_tensors_that_are_not_one_exact_json_number_stay_raw(values):
    assert isinstance(encode_raw(torch.tensor(values)), RawTensor)
    assert isinstance(encode_raw(torch.zeros(0)), RawTensor)  # no value to store


def compress_model_of(tensors: dict, tmp_path: Path):
    """Write encoded tensors to tmp_path/t.dsz and account for the file as compress_model does."""
    chunks = serialize(tensors)
    path = fmt.write_chunks(tmp_path / "t.dsz", chunks)
    return account(tensors, path=str(path), file_bytes=path.stat().st_size, header_bytes=len(chunks[0]))


def test_raw_rejects_dtypes_the_format_cannot_store():
    with pytest.raises(ConfigError, match="complex64"):
        encode_raw(torch.zeros(2, dtype=torch.complex64), where="x")


def test_encoder_rejects_bad_settings():
    with pytest.raises(ConfigError, match="do not fit in 1 bits"):
        encode_quantized(np.array([1, 2, 3]), np.ones(3, np.float32), 1, 4)
    with pytest.raises(ConfigError, match="cluster index 3 outside 0..2"):
        encode_quantized(np.array([1, 2, 3]), np.ones(2, np.float32), 1, 4)
    with pytest.raises(ConfigError, match="index_bits"):
        encode_quantized(np.array([1]), np.ones(1, np.float32), 1, 17)


# ---------------------------------------------------------------- exact bytes


def test_empty_file_bytes_are_pinned():
    header = b'{"format":"deepshrink","meta":{},"model":null,"payload_crc32":0,"tensors":{},"version":4}'
    deflate = zlib.compressobj(9, zdict=fmt.HEADER_DICTIONARY)
    packed = deflate.compress(header) + deflate.flush()
    assert b"".join(serialize({})) == b"DSHRINK\0" + struct.pack("<HHQ", 4, 1, len(packed)) + packed
    assert packed[1] & 0x20 and packed[2:6] == struct.pack(">I", zlib.adler32(fmt.HEADER_DICTIONARY))  # FDICT, DICTID


def test_raw_section_layout_is_pinned():
    tensors = {"b": RawTensor(np.array([1.5, 2.0], "<f4")), "a": RawTensor(np.array([1, 2, 3], "<i2")),
               "c": ConstantTensor((2, 2), np.dtype("<f4"), -0.0)}
    a_bytes, b_bytes = b"\x01\x00\x02\x00\x03\x00", struct.pack("<2f", 1.5, 2.0)
    header, payload = attacks.split(b"".join(serialize(tensors)))
    assert header["tensors"]["a"] == {"codec": "raw", "dtype": "int16", "shape": [3]}
    assert header["tensors"]["c"] == {"codec": "constant", "dtype": "float32", "shape": [2, 2], "value": -0.0}
    assert payload == a_bytes + b_bytes  # packed, sorted by name; the constant has no bytes
    assert header["payload_crc32"] == zlib.crc32(payload)


def test_older_layouts_read_back_the_tensors_they_were_written_from():
    """Versions 2 (aligned sections with offsets and CRCs, no constants) and 3 (packed) are read, not written:
    the committed files hold ``attacks.base_tensors(version)``."""
    for version in (2, 3):
        path = attacks.FIXTURES / f"attack-base-v{version}.dsz"
        header, tensors = read_file(path)
        assert header["version"] == version
        expected = attacks.base_tensors(version)
        assert tensors.keys() == expected.keys()
        for name, encoded in expected.items():
            want = torch.from_numpy(codec_of(encoded).decode(encoded, name))
            assert tensors[name].dtype == want.dtype and torch.equal(tensors[name], want), (version, name)
    header, payload = attacks.split((attacks.FIXTURES / "attack-base-v2.dsz").read_bytes())
    assert header["tensors"]["a.bias"]["offsets"] == [0, 32] and header["tensors"]["bn.running_var"]["codec"] == "raw"
    assert header["tensors"]["c.weight"]["coder_params"]["context_model"] == level_coder.LEGACY_CONTEXT_MODEL


# ---------------------------------------------------------------- models


def test_compressed_model_reproduces_the_quantized_outputs(tmp_path):
    model = quantized_tiny()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    compress_model(model, tmp_path / "m.dsz")
    state = load(tmp_path / "m.dsz")  # no spec: a state dict
    assert isinstance(state, dict) and state["1.num_batches_tracked"].dtype == torch.int64
    assert not any("parametrizations" in k for k in state)
    plain = tiny_model().eval()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(plain(x), expected)


def test_builtin_arch_loads_as_a_plain_model(tmp_path):
    spec = {"arch": "mlp", "kwargs": {}}
    torch.manual_seed(1)
    model = build_model(spec)
    prune_model(model, PruneConfig(method="percentile", q=80))
    quantize_model(model, QuantizeConfig(bits=4))
    report = compress_model(model, tmp_path / "m.dsz", EncodeConfig(coder="ans"), model_spec=spec, meta={"acc": 0.9})
    loaded = load(tmp_path / "m.dsz")
    assert isinstance(loaded, nn.Module) and not any(parametrize.is_parametrized(m) for m in loaded.modules())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    header = read_header(tmp_path / "m.dsz")
    assert header["model"] == spec and header["meta"]["acc"] == 0.9 and header["meta"]["encode"]["coder"] == "ans"
    assert report.ratio > 1


def test_factory_spec_is_built_only_when_trusted(tmp_path, caplog):
    spec = {"factory": "deepshrink.models:mlp", "kwargs": {}}
    model = build_model(spec, trust_factory=True)
    compress_model(model, tmp_path / "m.dsz", model_spec=spec)
    assert isinstance(load(tmp_path / "m.dsz"), dict)
    assert "trust_factory" in caplog.text
    assert isinstance(load(tmp_path / "m.dsz", trust_factory=True), nn.Module)


def test_inflated_model_kwargs_are_caught_on_the_meta_device(tmp_path, monkeypatch):
    model = build_model({"arch": "mlp", "kwargs": {}})
    hostile = {"arch": "mlp", "kwargs": {"hidden": [4096, 4096]}}
    compress_model(model, tmp_path / "m.dsz", model_spec=hostile)
    devices = []
    import deepshrink.models as models

    real_build = models.build_model

    def spy(spec, **options):
        built = real_build(spec, **options)
        devices.append(next(built.parameters()).device.type)
        return built

    monkeypatch.setattr(models, "build_model", spy)
    with pytest.raises(TensorInfoMismatch, match="shape"):
        load(tmp_path / "m.dsz")
    assert devices == ["meta"]  # the real, allocating build never ran


def test_spec_whose_constructor_fails_is_a_config_error(tmp_path):
    compress_model(build_model({"arch": "mlp", "kwargs": {}}), tmp_path / "m.dsz",
                   model_spec={"arch": "mlp", "kwargs": {"num_classes": -3}})
    with pytest.raises(ConfigError, match="cannot build"):
        load(tmp_path / "m.dsz")


def test_plain_state_dict_matches_strip_and_leaves_the_model_alone():
    model = quantized_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, shared = plain_state_dict(model)
    stripped = strip(copy.deepcopy(model)).state_dict()
    assert list(sorted(plain)) == sorted(stripped) and all(torch.equal(plain[k], stripped[k]) for k in plain)
    assert sorted(shared) == ["0.weight", "4.weight"] and [kind for _, kind in shared.values()] == ["conv", "fc"]
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("coder", CODER_NAMES)
def test_writer_is_deterministic(coder, tmp_path):
    config = EncodeConfig(coder=coder)
    compress_model(quantized_tiny(), tmp_path / "a.dsz", config, meta={"x": 1})
    compress_model(quantized_tiny(), tmp_path / "b.dsz", config, meta={"x": 1})
    assert (tmp_path / "a.dsz").read_bytes() == (tmp_path / "b.dsz").read_bytes()


def test_index_bits_follow_kind_then_pattern(tmp_path):
    model = quantized_tiny()
    config = EncodeConfig(coder="huffman", index_bits_conv=7, index_bits_fc=3)  # index bits: the paper's layout
    entries = read_header(compress_model(model, tmp_path / "a.dsz", config).path)["tensors"]
    assert (entries["0.weight"]["index_bits"], entries["4.weight"]["index_bits"]) == (7, 3)
    config = EncodeConfig(coder="huffman", index_bits_conv=7, index_bits_fc=3, index_bits_by_pattern=(("4.*", 2),))
    entries = read_header(compress_model(model, tmp_path / "b.dsz", config).path)["tensors"]
    assert entries["4.weight"]["index_bits"] == 2 and entries["0.bias"]["codec"] == "raw"


def test_float16_options_store_rounded_values(tmp_path):
    model = quantized_tiny()
    compress_model(model, tmp_path / "16.dsz", EncodeConfig(codebook_dtype="float16", raw_dtype="float16"))
    _, tensors = read_file(tmp_path / "16.dsz")
    sw = model[0].parametrizations.weight[0]
    expected = dense_reference(sw.indices.numpy().astype(np.int64), sw.centroids.detach().numpy().astype(np.float16))
    assert torch.equal(tensors["0.weight"], torch.from_numpy(expected))
    assert tensors["0.bias"].dtype == torch.float16 and torch.equal(tensors["0.bias"], model[0].bias.half())
    compress_model(model, tmp_path / "32.dsz")
    assert (tmp_path / "16.dsz").stat().st_size < (tmp_path / "32.dsz").stat().st_size


def test_encode_config_rejects_bad_options():
    for kwargs, match in [({"coder": "lzma"}, "unknown coder"), ({"index_bits_fc": 0}, "index_bits_fc"),
                          ({"raw_dtype": "int8"}, "raw_dtype"), ({"index_bits_by_pattern": (("x", 99),)}, "x"),
                          ({"index_bits_by_pattern": ("x",)}, "pairs"), ({"codebook_dtype": "bf16"}, "codebook_dtype")]:
        with pytest.raises(ConfigError, match=match):
            EncodeConfig(**kwargs)


class _FailingFile:
    """File wrapper whose second write fails, as a full disk or a crash mid-write would."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 2:
            raise OSError("disk full")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_file_and_no_temp(existing, tmp_path, monkeypatch):
    target = tmp_path / "m.dsz"
    if existing:
        target.write_bytes(b"previous version")
    real_atomic_write = fmt.atomic_write
    monkeypatch.setattr(fmt, "atomic_write",
                        lambda path, write: real_atomic_write(path, lambda f: write(_FailingFile(f))))
    with pytest.raises(OSError, match="disk full"):
        compress_model(quantized_tiny(), target)
    assert [p.name for p in tmp_path.iterdir()] == (["m.dsz"] if existing else [])
    if existing:
        assert target.read_bytes() == b"previous version"


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("coder", CODER_NAMES)
def test_report_accounts_for_every_byte(coder, tmp_path):
    model = quantized_tiny()
    report = compress_model(model, tmp_path / "m.dsz", EncodeConfig(coder=coder, index_bits_conv=3, index_bits_fc=2))
    size = (tmp_path / "m.dsz").stat().st_size
    assert report.file_bytes == size and report.ratio == report.dense_bytes / size
    stripped = strip(copy.deepcopy(model)).state_dict()
    assert report.dense_bytes == sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
                                     for t in stripped.values())
    totals = report.totals
    assert totals["header_bytes"] + sum(r["stored_bytes"] for r in report.rows) + totals["padding_bytes"] == size
    assert totals["padding_bytes"] == 0  # version 3 packs the sections
    coded = [r for r in report.rows if r["codec"] == "deep_compression"]
    assert [r["name"] for r in coded] == ["0.weight", "4.weight"]
    for row, layer in zip(coded, (model[0], model[4])):
        weight = stripped[row["name"]]
        shared = layer.parametrizations.weight[0]
        assert isinstance(shared, SharedWeights)
        symbols = shared.indices.reshape(-1)[shared.indices.reshape(-1) != 0].numpy().astype(np.int64) - 1
        assert row["weight_entropy_bits"] == pytest.approx(entropy_bits(symbols, shared.centroids.numel()))
        assert row["nonzero"] == int(torch.count_nonzero(weight)) and row["numel"] == weight.numel()
        expected_fillers = len(positions_to_entries(np.flatnonzero(weight.numpy()), row["index_bits"])) - row["nonzero"]
        assert row["fillers"] == expected_fillers > 0  # 2-3 index bits force fillers at 70% sparsity
        assert row["weight_entropy_bits"] <= row["weight_stream_bits"]
        assert row["position_entropy_bits"] <= row["position_stream_bits"]
        streams = row["weight_stream_bits"] + row["position_stream_bits"] + 8 * row["codebook_bytes"]
        assert row["bits_per_nonzero"] == pytest.approx(streams / row["nonzero"])
    numel = sum(r["numel"] for r in coded)
    fraction = sum(r["nonzero"] for r in coded) / numel * (totals["weight_stream_bits"] / totals["coded_nonzero"]) / 32
    assert report.lab_estimate_fraction == pytest.approx(fraction)
    assert report.lab_estimate_ratio == pytest.approx(1 / fraction)
    assert json.loads(json.dumps(report.to_dict()))["file_bytes"] == size
    assert inspect_file(tmp_path / "m.dsz") == report


def test_an_index_bits_glob_that_matches_no_coded_weight_is_an_error(tmp_path):
    config = EncodeConfig(index_bits_by_pattern=(("4.*", 2), ("fc9.*", 3)))
    with pytest.raises(ConfigError, match="index_bits_by_pattern pattern 'fc9.*' matches no selected weight"):
        compress_model(quantized_tiny(), tmp_path / "m.dsz", config)
    assert not (tmp_path / "m.dsz").exists()


@pytest.mark.parametrize("coder", CODER_NAMES)
def test_writing_decodes_nothing_and_verifying_decodes_each_stream_once(coder, tmp_path, stream_decodes):
    model = quantized_tiny()
    report = compress_model(model, tmp_path / "m.dsz", EncodeConfig(coder=coder))
    assert stream_decodes == []  # accounted from the streams in memory
    coded = [r for r in report.rows if r["codec"] == "deep_compression"]
    streams = sum((r["weight_stream_bits"] > 0) + (r["position_stream_bits"] > 0) for r in coded)
    assert streams >= 2
    verified = compress_model(model, tmp_path / "v.dsz", EncodeConfig(coder=coder), verify=True)
    assert stream_decodes == [coder] * streams
    assert verified == dataclasses.replace(report, path=str(tmp_path / "v.dsz"))


def test_verify_catches_a_file_that_disagrees_with_what_was_written(tmp_path, monkeypatch):
    import deepshrink.compress as compress

    other = serialize(encode_model(quantized_tiny(bits=2)))  # a valid file, but not the one accounted for

    def write_other(path, tensors, model_spec=None, meta=None, count=0):
        for _ in tensors:  # encoded and accounted, as the real writer takes them
            pass
        return fmt.write_chunks(path, other), len(other[0])

    monkeypatch.setattr(compress, "write_tensors", write_other)
    compress_model(quantized_tiny(), tmp_path / "m.dsz")  # without verify nothing is read back
    with pytest.raises(FormatError, match="does not account like the tensors written"):
        compress_model(quantized_tiny(), tmp_path / "m.dsz", verify=True)


def test_file_columns_name_real_row_keys(tmp_path):
    from deepshrink.report import FILE_COLUMNS, render_table

    report = compress_model(quantized_tiny(), tmp_path / "m.dsz")
    for key, _label, _formatter in FILE_COLUMNS:
        assert all(key in row for row in report.rows), key
    assert render_table(report.rows, FILE_COLUMNS).row_count == len(report.rows)


# ---------------------------------------------------------------- attacks: one crafted file per check


@pytest.fixture(scope="module")
def base_bytes():
    return attacks.base_file()


@pytest.mark.parametrize("version", [2, 3, 4])
def test_attack_base_files_are_valid(version, tmp_path):
    (tmp_path / "base.dsz").write_bytes(attacks.base_file(version))
    header, tensors = read_file(tmp_path / "base.dsz")
    assert sorted(tensors) == ["a.bias", "a.weight", "bn.num_batches_tracked", "bn.running_var", "c.weight",
                               *(["g.bias"] if version >= 4 else []), "p.weight", "z.weight"]
    assert header["tensors"]["z.weight"]["coder"] == "ans" and header["tensors"]["c.weight"]["codec"] == "cabac"
    assert header["version"] == version
    assert header["tensors"]["bn.running_var"]["codec"] == ("constant" if version >= 3 else "raw")
    assert torch.equal(tensors["bn.running_var"], torch.ones(4, dtype=torch.float16))


@pytest.mark.parametrize("name", attacks.ATTACKS)
def test_crafted_file_raises_its_own_error(name, tmp_path):
    attack = attacks.ATTACKS[name]
    path = tmp_path / f"{name}.dsz"
    path.write_bytes(attack.craft(attacks.base_file(attack.version)))
    if attack.stage == "header":
        with pytest.raises(attack.error) as info:
            read_header(path)
        assert type(info.value) is attack.error and str(path) in str(info.value)
    else:
        read_header(path)  # only decoding can tell
    with pytest.raises(attack.error) as info:
        read_file(path)
    assert type(info.value) is attack.error
    with pytest.raises(attack.error):
        load(path)


def test_every_format_error_subclass_has_an_attack():
    covered = {a.error for a in attacks.ATTACKS.values()}
    assert {cls for cls in vars(sys.modules["deepshrink.errors"]).values()
            if isinstance(cls, type) and issubclass(cls, FormatError) and cls is not FormatError} <= covered
    assert CodecError in covered


def test_out_of_range_symbols_from_a_coder_are_caught(base_bytes, tmp_path, monkeypatch):
    # the coders reject such streams themselves; this checks the format's own guard behind them
    (tmp_path / "f.dsz").write_bytes(base_bytes)
    huffman = type(get_coder("huffman"))
    real_decode = huffman.decode
    monkeypatch.setattr(huffman, "decode", lambda self, *a: real_decode(self, *a) + 3)
    with pytest.raises(TensorInfoMismatch, match="weights stream holds symbol"):
        read_file(tmp_path / "f.dsz")


def test_coder_crash_becomes_a_codec_error(base_bytes, tmp_path, monkeypatch):
    (tmp_path / "f.dsz").write_bytes(base_bytes)

    def crash(self, *args):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(type(get_coder("ans")), "decode", crash)
    with pytest.raises(CodecError, match="z.weight.*IndexError"):
        read_file(tmp_path / "f.dsz")


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="nope.dsz: cannot read"):
        read_header(tmp_path / "nope.dsz")


def test_expansion_limit_can_be_raised_for_trusted_files(tmp_path):
    coded = encode_quantized(np.zeros(3 << 20, np.uint8), np.ones(1, np.float32), 1, 16, "ans")
    write_file(tmp_path / "zeros.dsz", {"w": coded})
    with pytest.raises(TensorInfoMismatch, match="max_expansion"):
        read_file(tmp_path / "zeros.dsz")
    assert read_file(tmp_path / "zeros.dsz", max_expansion=10**6)[1]["w"].count_nonzero() == 0


def test_a_file_at_the_decoding_bounds_loads_and_one_past_them_is_refused_before_decoding(tmp_path, monkeypatch):
    numel = 200_000  # dense, one centroid, ANS: the cheapest bytes per element a writer can produce
    coded = encode_quantized(np.ones(numel, np.uint8), np.ones(1, np.float32), 1, 1, "ans")
    path = write_file(tmp_path / "w.dsz", {"b": RawTensor(np.zeros(10, np.float32)), "w": coded},
                      model_spec={"arch": "mlp"})
    file_bytes = path.stat().st_size
    at = -(-(numel - fmt.EXPANSION_ALLOWANCE) // file_bytes)  # the smallest max_expansion that admits it
    need = fmt.decode_memory(numel, 40)
    assert need == fmt.DECODE_BYTES_PER_ELEMENT * numel + 40
    header, tensors = read_file(path, max_expansion=at, max_memory=need)
    assert tensors["w"].numel() == numel and bool((tensors["w"] == 1).all())
    decoded = []
    for codec in CODECS.values():
        monkeypatch.setattr(codec, "decode", lambda *args: decoded.append(args))
    past = [({"max_expansion": at - 1}, f"more than {fmt.EXPANSION_ALLOWANCE + (at - 1) * file_bytes} allowed"),
            ({"max_expansion": at, "max_memory": need - 1}, f"needs about {need:,} bytes .* max_memory={need - 1:,}"),
            ({}, f"max_expansion={fmt.DEFAULT_MAX_EXPANSION}")]  # the default refuses it: no real file is this dense
    for options, words in past:
        for reader in (read_file, load):
            with pytest.raises(TensorInfoMismatch, match=words):
                reader(path, **options)
    assert decoded == []  # refused from the header alone
    with pytest.raises(ConfigError, match="max_memory"):
        read_file(path, max_memory=-1)


# ---------------------------------------------------------------- fuzz: bounded time and memory, own errors only

TIME_LIMIT_S = 2.0
MEMORY_LIMIT = 50 << 20


def _split(data: bytes) -> tuple[dict, bytes, int]:
    header, payload = attacks.split(data)
    return header, payload, len(data) - len(payload)


def _assert_bounded(data: bytes, path: Path, case: str) -> None:
    """Read ``data``: success or a DeepShrinkError, within the time and (numpy) memory bounds."""
    path.write_bytes(data)
    tracemalloc.reset_peak()
    start_mem, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    try:
        read_file(path)
    except DeepShrinkError:
        pass
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{case}: {type(e).__name__} escaped: {e}")
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - start_mem
    assert elapsed < TIME_LIMIT_S, f"{case}: took {elapsed:.2f}s"
    assert peak < MEMORY_LIMIT, f"{case}: allocated {peak / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    out = {}
    for coder in MODEL_CODERS:
        path = tmp_path_factory.mktemp(coder) / "m.dsz"
        compress_model(quantized_tiny(), path, EncodeConfig(coder=coder, index_bits_conv=4, index_bits_fc=3))
        out[coder] = path.read_bytes()
    torch.manual_seed(1)
    wide = nn.Sequential(nn.Linear(8, 200), nn.ReLU(), nn.Linear(200, 3))  # 200 biases: a grid is smaller
    prune_model(wide, PruneConfig(method="percentile", q=70))
    quantize_model(wide, QuantizeConfig(bits=3))
    path = tmp_path_factory.mktemp("grid") / "m.dsz"
    compress_model(wide, path, EncodeConfig(grid_bits=6))
    assert read_header(path)["tensors"]["0.bias"]["codec"] == "grid"
    out["grid"] = path.read_bytes()
    return out


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _int_fields(obj, path=()):
    """Paths of every integer in the header, skipping long coder tables (sampled separately)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _int_fields(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from _int_fields(v, path + (i,))
    elif isinstance(obj, int) and not isinstance(obj, bool):
        yield path


def _with(header: dict, path: tuple, value) -> dict:
    header = copy.deepcopy(header)
    obj = header
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value
    return header


@pytest.mark.parametrize("coder", FUZZED)
def test_fuzz_byte_flips(coder, model_files, tmp_path, traced):
    data = model_files[coder]
    rng = np.random.default_rng(1234)
    for case in range(300):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), rng.integers(1, 5)):
            mutated[pos] ^= int(rng.integers(1, 256))
        _assert_bounded(bytes(mutated), tmp_path / "f.dsz", f"flip case {case}")


@pytest.mark.parametrize("coder", FUZZED)
def test_fuzz_corrupt_streams_with_valid_checksums(coder, model_files, tmp_path, traced):
    # a hostile writer recomputes CRCs: the decoders themselves must reject or bound the damage
    header, payload, start = _split(model_files[coder])
    assert header["version"] == fmt.VERSION  # one payload CRC32
    spans = fmt.open_file(_write(tmp_path, model_files[coder])).sections
    sections = [(name, part) for name, e in header["tensors"].items() for part in STREAMS.get(e["codec"], ())]
    assert sections
    rng = np.random.default_rng(99)
    for case in range(150):
        name, part = sections[rng.integers(len(sections))]
        begin, end = spans[f"{name}/{part}"]
        if end == begin:
            continue
        body = bytearray(payload)
        body[rng.integers(begin, end)] ^= int(rng.integers(1, 256))
        fixed = _with(header, ("payload_crc32",), zlib.crc32(bytes(body)))
        _assert_bounded(attacks.join(fixed, bytes(body)), tmp_path / "f.dsz", f"stream case {case} {name}/{part}")


@pytest.mark.parametrize("coder", ["huffman", "cabac"])
def test_fuzz_truncation_at_every_boundary(coder, model_files, tmp_path, traced):
    data = model_files[coder]
    header, payload, start = _split(data)
    cuts = {0, 1, 8, 12, 19, 20, start - 1, start, len(data) - 1}
    for begin, end in fmt.open_file(_write(tmp_path, data)).sections.values():
        cuts.update((start + begin, start + end))
    cuts.update(int(c) for c in np.random.default_rng(5).integers(0, len(data), 20))
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        with pytest.raises(FormatError):
            read_header(_write(tmp_path, data[:cut]))
        _assert_bounded(data[:cut], tmp_path / "f.dsz", f"truncated at {cut}")


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "t.dsz"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("coder", FUZZED)
def test_fuzz_inflated_numbers_in_the_header(coder, model_files, tmp_path, traced):
    header, payload, _ = _split(model_files[coder])
    paths = list(_int_fields(header))
    assert len(paths) > 30
    for path in paths:
        for value in (-1, 0, 2**31 - 1, 2**31, 2**40, 2**64):
            _assert_bounded(attacks.join(_with(header, path, value), payload), tmp_path / "f.dsz", f"{path}={value}")
    for name, entry in header["tensors"].items():  # 1000x more elements: within the expansion limit
        shape = entry["shape"]
        grown = _with(header, ("tensors", name, "shape"), [shape[0] * 1000, *shape[1:]] if shape else [1000])
        _assert_bounded(attacks.join(grown, payload), tmp_path / "f.dsz", f"{name} first dim x1000")
        if entry["codec"] != "raw":
            numel = math.prod(entry["shape"]) * 1000
            for key in ("num_nonzero", "num_entries") if entry["codec"] == "deep_compression" else ("num_nonzero",):
                inflated = _with(grown, ("tensors", name, key), numel)
                _assert_bounded(attacks.join(inflated, payload), tmp_path / "f.dsz", f"{name} {key}={numel}")
    for header_len in (2**32, len(payload) * 10**6):
        data = attacks.join(header, payload, header_len=header_len)
        _assert_bounded(data, tmp_path / "f.dsz", f"header_len={header_len}")


def test_worst_case_file_at_the_expansion_limit_stays_small(tmp_path):
    # ANS with one centroid and dense 1-bit positions: near-zero bits per element, the cheapest way to
    # ask for elements. At the limit, decoding must still fit the fuzz memory bound.
    one = np.ones(1, np.float32)
    probe = b"".join(serialize({"w": encode_quantized(np.ones(1 << 16, np.uint8), one, 1, 1, "ans")}))
    numel = fmt.EXPANSION_ALLOWANCE + fmt.DEFAULT_MAX_EXPANSION * (len(probe) - 8)
    coded = encode_quantized(np.ones(numel, np.uint8), one, 1, 1, "ans")
    path = write_file(tmp_path / "w.dsz", {"w": coded})
    assert path.stat().st_size < 1024
    tracemalloc.start()
    try:
        decoded = read_file(path)[1]["w"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.numel() == numel and bool((decoded == 1).all())
    assert peak < min(MEMORY_LIMIT, 32 * numel)
