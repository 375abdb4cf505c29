"""The file format's ``cabac`` codec (version 2) and ``grid`` codec (version 4), the ``auto`` choice, and
loading files of earlier versions."""

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshrink import format as fmt
from deepshrink.coding import level_coder
from deepshrink.codecs.cabac import CabacTensor, decode_cabac, encode_levels, indices_to_levels, levels_to_values
from deepshrink.coding import row_length_of
from deepshrink.codecs.deep_compression import CodedTensor, encode_quantized
from deepshrink.codecs.grid import decode_grid, encode_grid
from deepshrink.codecs.raw import RawTensor
from deepshrink.encode import EncodeConfig, encode_weight, stored_bytes
from deepshrink.errors import ConfigError, UnsupportedVersion
from deepshrink.compress import compress_model, load
from deepshrink.format import inspect_file, read_file, read_header, serialize, write_file

FIXTURE_V1 = Path(__file__).parent / "format_fixtures" / "v1-huffman-ans.dsz"
FIXTURE_V3 = Path(__file__).parent / "format_fixtures" / "v3-cabac-constant.dsz"


def dense(indices, codebook):
    return np.where(indices > 0, np.concatenate([[0.0], codebook]).astype(np.float32)[indices], 0.0)


def quantized(rng, shape, k, density):
    indices = np.where(rng.random(shape) < density, rng.integers(1, k + 1, shape), 0)
    codebook = np.sort(rng.normal(size=k)).astype(np.float32)[rng.permutation(k)]  # any order
    return indices, codebook


def test_levels_follow_the_sorted_codebook():
    codebook = np.array([0.5, -0.25, -2.0, 0.0, 3.0], np.float32)
    indices = np.array([[0, 1, 2, 3], [4, 5, 0, 1]])
    levels, sorted_codebook, num_negative = indices_to_levels(indices, codebook)
    assert sorted_codebook.tolist() == [-2.0, -0.25, 0.0, 0.5, 3.0] and num_negative == 2
    assert levels.tolist() == [[0, 2, -1, -2], [1, 3, 0, 2]]  # -2.0 -> -2, -0.25 -> -1, 0.0 -> 1, 0.5 -> 2
    assert np.array_equal(levels_to_values(levels, sorted_codebook, num_negative), dense(indices, codebook))


@pytest.mark.parametrize("shape, rows", [((7,), 7), ((), 1), ((0,), 1), ((4, 9), 9), ((3, 2, 3, 3), 18), ((0, 5), 1)])
def test_row_length_is_one_output_row(shape, rows):
    assert row_length_of(shape) == rows


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(0,), (1,), (50,), (6, 40), (4, 3, 3, 3), (300, 1)]),
    k=st.integers(1, 256),
    density=st.floats(0.0, 1.0),
    codebook_dtype=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_cabac_tensor_round_trips_bit_exactly(shape, k, density, codebook_dtype, seed):
    indices, codebook = quantized(np.random.default_rng(seed), shape, k, density)
    coded = encode_levels(indices, codebook, 8, codebook_dtype)
    stored = codebook.astype(codebook_dtype).astype(np.float32)
    assert np.array_equal(decode_cabac(coded), dense(indices, stored))


def test_every_level_count_up_to_256_through_a_file(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {}
    for k in range(1, 257, 5):
        indices, codebook = quantized(rng, (8, 30), k, 0.5)
        tensors[f"w{k}"] = (indices, codebook)
    write_file(tmp_path / "f.dsz", {n: encode_levels(i, c, 8) for n, (i, c) in tensors.items()})
    header, decoded = read_file(tmp_path / "f.dsz")
    assert header["version"] == fmt.VERSION
    for name, (indices, codebook) in tensors.items():
        assert np.array_equal(decoded[name].numpy(), dense(indices, codebook)), name


def test_encoder_checks_its_input():
    with pytest.raises(ConfigError, match="outside 0..3"):
        encode_levels(np.array([0, 4]), np.zeros(3, np.float32), 2)
    with pytest.raises(ConfigError, match="do not fit in 1 bits"):
        encode_levels(np.array([0, 1]), np.zeros(3, np.float32), 1)
    with pytest.raises(ConfigError, match="integers"):
        encode_levels(np.array([0.0, 1.0]), np.zeros(3, np.float32), 2)
    with pytest.raises(ConfigError, match="unknown coder"):
        EncodeConfig(coder="zip")


# --- auto -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, density", [((300, 784), 0.08), ((10, 100), 0.3), ((16, 8, 3, 3), 0.5), ((64,), 1.0)])
def test_auto_is_the_smallest_candidate(shape, density):
    rng = np.random.default_rng(int(np.prod(shape)))
    indices, codebook = quantized(rng, shape, 32, density)
    candidates = [encode_quantized(indices, codebook, 5, 5, c) for c in ("huffman", "ans")]
    candidates.append(encode_levels(indices, codebook, 5))
    chosen = encode_weight(indices, codebook, 5, 5, "auto")
    assert stored_bytes(chosen) == min(map(stored_bytes, candidates))


@pytest.mark.parametrize("shape, density, k", [((10, 128), 0.1, 6), ((40, 40), 0.3, 16), ((300, 784), 0.08, 32)])
def test_auto_estimates_each_layouts_share_of_the_file(shape, density, k):
    # stored_bytes counts coder params as the header deflates them, so auto's file is (near) the smallest
    rng = np.random.default_rng(k)
    indices, codebook = quantized(rng, shape, k, density)
    files = {c: len(b"".join(serialize({"w": encode_weight(indices, codebook, 5, 5, c)}))) for c in ("huffman", "ans", "cabac")}
    auto = len(b"".join(serialize({"w": encode_weight(indices, codebook, 5, 5, "auto")})))
    assert auto <= min(files.values()) + 8  # entries differ by a few keys outside the params


def test_auto_picks_cabac_where_contexts_pay():
    # dead input columns and rows with their own scale, as in a pruned fc layer
    rng = np.random.default_rng(0)
    weights = rng.laplace(size=(300, 784)) * rng.uniform(0.3, 3, (300, 1)) * (rng.random(784) < 0.6)
    indices = np.where(np.abs(weights) > 2, np.clip(np.round(weights), -16, 15).astype(np.int64) + 17, 0)
    codebook = np.arange(-16, 16, dtype=np.float32)
    chosen = encode_weight(indices, codebook, 5, 5, "auto")
    assert isinstance(chosen, CabacTensor)
    assert stored_bytes(chosen) < 0.9 * stored_bytes(encode_quantized(indices, codebook, 5, 5, "huffman"))


def _quantized_model():
    from deepshrink.quantize import QuantizeConfig, quantize_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    with torch.no_grad():
        model[0].weight[:, ::3] = 0  # dead inputs
        model[0].weight[model[0].weight.abs() < 0.08] = 0
    quantize_model(model, QuantizeConfig(bits=4))
    return model


@pytest.mark.parametrize("coder", ["cabac", "auto"])
def test_models_compress_and_load_with_the_new_coders(coder, tmp_path):
    model = _quantized_model()
    reference = compress_model(model, tmp_path / "huffman.dsz", EncodeConfig(coder="huffman"))
    report = compress_model(model, tmp_path / f"{coder}.dsz", EncodeConfig(coder=coder))
    expected = read_file(tmp_path / "huffman.dsz")[1]
    header, tensors = read_file(tmp_path / f"{coder}.dsz")
    assert all(torch.equal(tensors[name], expected[name]) for name in expected)
    codecs = {entry["codec"] for entry in header["tensors"].values()} - {"constant"}
    assert header["version"] == fmt.VERSION
    if coder == "cabac":
        assert codecs == {"raw", "cabac"}
        assert {r["codec"] for r in report.rows} - {"constant"} == {"raw", "cabac"}
        assert report.totals["coded_nonzero"] > 0
    else:
        assert report.file_bytes <= reference.file_bytes


def test_the_writer_writes_the_current_version_only(tmp_path):
    indices, codebook = quantized(np.random.default_rng(1), (4, 5), 3, 0.5)
    raw = {"b": RawTensor(np.zeros(2, np.float32))}
    paper, levels = {**raw, "w": encode_quantized(indices, codebook, 2, 3)}, {**raw, "w": encode_levels(indices, codebook, 2)}
    for tensors in (paper, levels):
        assert b"".join(serialize(tensors))[8:10] == (4).to_bytes(2, "little")
    with pytest.raises(TypeError):
        serialize(levels, version=2)  # older versions are read (their committed files are tested), not written
    header, tensors = read_file(write_file(tmp_path / "levels.dsz", levels))
    assert header["tensors"]["w"]["coder_params"]["context_model"] == level_coder.CONTEXT_MODEL
    assert torch.equal(tensors["w"], torch.from_numpy(dense(indices, codebook)))


# --- version 1 ------------------------------------------------------------------------------------


def test_a_version_1_file_written_before_cabac_still_loads():
    # written by deepshrink at bf2a331 (format version 1), committed as bytes
    data = FIXTURE_V1.read_bytes()
    assert data[8:10] == (1).to_bytes(2, "little")
    header, tensors = read_file(FIXTURE_V1)
    assert header["version"] == 1 and header["meta"]["written_by"].endswith("(format version 1)")
    rng = np.random.default_rng(2026)  # the generator's own recipe
    indices = np.where(rng.random((12, 20)) < 0.25, rng.integers(1, 5, (12, 20)), 0)
    codebook = np.array([-0.75, -0.25, 0.5, 1.0], np.float32)
    assert np.array_equal(tensors["fc.weight"].numpy(), dense(indices, codebook))
    assert np.array_equal(tensors["conv.weight"].numpy(), dense(indices, codebook).reshape(12, 5, 2, 2))
    assert np.array_equal(tensors["fc.bias"].numpy(), np.arange(12, dtype=np.float32) / 8)
    assert inspect_file(FIXTURE_V1).file_bytes == len(data)
    assert isinstance(load(FIXTURE_V1), dict)


def test_a_version_3_file_written_before_grid_still_loads():
    # written by deepshrink at 2a54fbe (format version 3: header deflated without the dictionary)
    data = FIXTURE_V3.read_bytes()
    assert data[8:10] == (3).to_bytes(2, "little")
    header, tensors = read_file(FIXTURE_V3)
    assert header["version"] == 3 and header["meta"]["written_by"].endswith("(format version 3)")
    assert [header["tensors"][n]["codec"] for n in ("bn.running_var", "conv.weight", "fc.bias", "fc.weight")] == [
        "constant", "deep_compression", "raw", "cabac"]
    rng = np.random.default_rng(2026)  # the generator's recipe, as for version 1
    indices = np.where(rng.random((12, 20)) < 0.25, rng.integers(1, 5, (12, 20)), 0)
    codebook = np.array([-0.75, -0.25, 0.5, 1.0], np.float32)
    assert np.array_equal(tensors["fc.weight"].numpy(), dense(indices, codebook))
    assert np.array_equal(tensors["conv.weight"].numpy(), dense(indices, codebook).reshape(12, 5, 2, 2))
    assert np.array_equal(tensors["fc.bias"].numpy(), np.arange(12, dtype=np.float32) / 8)
    assert torch.equal(tensors["bn.running_var"], torch.ones(4))
    assert inspect_file(FIXTURE_V3).file_bytes == len(data)


def test_versions_past_4_are_refused(tmp_path):
    data = bytearray(FIXTURE_V1.read_bytes())
    data[8:10] = (5).to_bytes(2, "little")
    (tmp_path / "v5.dsz").write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersion, match="version 5"):
        read_header(tmp_path / "v5.dsz")
    assert fmt.VERSIONS == (1, 2, 3, 4)


# --- version 4: the grid codec and the header's dictionary ----------------------------------------


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=300), bits=st.integers(2, 16))
def test_grid_round_trip_moves_each_value_by_at_most_half_a_step(values, bits):
    array = np.array(values, np.float32)
    grid = encode_grid(array, bits)
    top = (1 << (bits - 1)) - 1
    if np.float32(np.abs(array.astype(np.float64)).max() / top) < np.finfo(np.float32).tiny:
        assert grid is None  # all zero, or a step below float32's normal range: no grid
        return
    decoded = decode_grid(grid)
    assert decoded.dtype == np.float32 and decoded.shape == array.shape
    levels = np.rint(decoded / np.float32(grid.step))
    assert np.abs(levels).max() <= top and np.array_equal(decoded, levels.astype(np.float32) * np.float32(grid.step))
    assert np.all(np.abs(decoded.astype(np.float64) - array) <= grid.step * (0.5 + 1e-6))
    assert grid.num_nonzero == np.count_nonzero(levels)


def test_grid_tensors_round_trip_through_a_file_and_need_version_4(tmp_path):
    rng = np.random.default_rng(4)
    grids = {"b": encode_grid(rng.normal(0, 0.1, 200), 8), "z": encode_grid(np.array([0.0, 0.0, 1e-3]), 3),
             "m": encode_grid(rng.normal(0, 1.0, (3, 40)), 6)}  # the format takes any shape: rows of 40
    assert grids["m"].coder_params["row_length"] == 40 and grids["z"].num_nonzero == 1
    path = write_file(tmp_path / "grid.dsz", grids)
    header, tensors = read_file(path)
    assert header["version"] == 4 and {e["codec"] for e in header["tensors"].values()} == {"grid"}
    for name, grid in grids.items():
        assert np.array_equal(tensors[name].numpy(), decode_grid(grid))
    report = inspect_file(path)
    assert report.totals["grid_bytes"] == sum(len(g.stream) for g in grids.values()) and report.totals["coded_tensors"] == 0


def test_grid_bits_put_biases_on_a_grid_where_that_is_smaller(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
    plain, gridded = tmp_path / "plain.dsz", tmp_path / "grid.dsz"
    compress_model(model, plain, EncodeConfig(raw_dtype="float16"))
    compress_model(model, gridded, EncodeConfig(raw_dtype="float16", grid_bits=6))
    codecs = {n: e["codec"] for n, e in read_header(gridded)["tensors"].items()}
    assert codecs == {"0.bias": "grid", "0.weight": "raw", "2.bias": "raw", "2.weight": "raw"}  # 3 biases: raw is smaller
    assert gridded.stat().st_size < plain.stat().st_size - 100  # 256 float16 biases: 512 B raw
    bias = model[0].bias.detach()
    loaded = load(gridded)  # no model spec: the state dict
    step = read_header(gridded)["tensors"]["0.bias"]["step"]
    assert step == pytest.approx(float(bias.abs().max()) / 31, rel=1e-6)
    assert torch.all((loaded["0.bias"] - bias).abs() <= step / 2 * (1 + 1e-6))
    assert torch.equal(loaded["2.bias"], model[2].bias.detach().half().float())
    with pytest.raises(ConfigError, match="grid_bits"):
        EncodeConfig(grid_bits=1)


def test_the_header_dictionary_shrinks_the_header(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    chunks = serialize({n: RawTensor(t.detach().numpy()) for n, t in model.state_dict().items()},
                       {"arch": "mlp"}, {"encode": {"coder": "auto"}})
    with_dictionary = len(chunks[0]) - fmt.PREFIX_SIZE
    text = zlib.decompressobj(zdict=fmt.HEADER_DICTIONARY).decompress(chunks[0][fmt.PREFIX_SIZE:])
    assert with_dictionary < 0.8 * len(zlib.compress(text, 9))  # version 3 deflated the same JSON without it
    assert fmt.HEADER_DICTIONARY.isascii() and len(fmt.HEADER_DICTIONARY) <= 32768  # deflate's window


def test_docs_state_the_header_dictionary_byte_for_byte():
    # another implementation reads the dictionary off docs/format.md: it must be the code's
    text = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    section = text[text.index("**The preset dictionary**"):]
    start = section.index("```text\n") + 8
    block = section[start : section.index("\n```", start)]
    assert "".join(block.split("\n")).encode("ascii") == fmt.HEADER_DICTIONARY
    assert f"{len(fmt.HEADER_DICTIONARY):,} ASCII bytes" in section and f"`{zlib.adler32(fmt.HEADER_DICTIONARY):#010x}`" in section


def test_coded_tensor_classes_are_distinct():
    assert not issubclass(CabacTensor, CodedTensor)
