"""A new coder and a new pruning rule are one module each: registered from here, never touching the package."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

import deepshrink
from deepshrink import format as fmt
from deepshrink.checkpoint import save_checkpoint
from deepshrink.cli import main
from deepshrink.coding import CODERS, register
from deepshrink.compress import compress_model
from deepshrink.compression import masks, strip
from deepshrink.encode import EncodeConfig
from deepshrink.errors import CodecError, ConfigError
from deepshrink.format import read_header
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
    parsed = fmt._parse(tmp_path / "m.dsz", fmt.DEFAULT_MAX_EXPANSION)
    entry = parsed.header["tensors"]["fc3.weight"]
    length = entry["weights_stream"]["bytes"]
    assert fmt._max_symbols(CODERS["fixed16"], length) == entry["num_nonzero"]  # 16 bits each, exactly


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
