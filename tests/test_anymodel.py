"""Any model, any weight: one model per family through prune -> retrain -> quantize -> encode -> load.

Every family runs with the default selection (every floating parameter with >= 2 dims) and checks
that masks are honoured inside the module's own forward (MultiheadAttention reads ``in_proj_weight``
directly, the fused RNN kernels read ``_flat_weights``): the output must equal a plain model whose
weights were zeroed by hand, before and after optimizer steps.
"""

import pytest
import torch
from torch import nn

import deepshrink
from deepshrink.compress import compress_model
from deepshrink.parametrizations import masks, plain_state_dict
from deepshrink.errors import ConfigError, TensorInfoMismatch
from deepshrink.format import open_file, read_file, read_header
from deepshrink.layers import select_weights, tied_weights
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model
from deepshrink.report import layer_summary

# ---------------------------------------------------------------- one small model per family (factories)


class Encoder(nn.Module):
    """A tiny vision-transformer-like encoder: learned position parameter, TransformerEncoder, head."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 8) * 0.1)  # bare parameter: kind "other"
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x + self.pos).mean(1))


class CrossAttention(nn.Module):
    """MultiheadAttention with separate q/k/v projections (kdim/vdim differ from embed_dim)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)

    def forward(self, x):
        q, k, v = x[..., :8], x[..., :6], x[..., 4:8]
        out, weights = self.attn(q, k, v, need_weights=True)  # the need_weights path
        return out + weights.sum()


class Recurrent(nn.Module):
    def __init__(self, cls=nn.LSTM, **kwargs):
        super().__init__()
        self.rnn = cls(8, 6, num_layers=2, batch_first=True, **kwargs)
        self.head = nn.Linear(6 * (2 if kwargs.get("bidirectional") else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def lstm():
    return Recurrent(nn.LSTM, proj_size=0)


def gru():
    return Recurrent(nn.GRU, bidirectional=True)


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.bag = nn.EmbeddingBag(20, 8, mode="mean")
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        idx = (x.abs() * 7).long().clamp_max(19)[..., 0]  # (B, T) token ids from the shared float input
        return self.head(self.emb(idx).mean(1) + self.bag(idx))


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(5, 4, 3, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.up(x.view(-1, 5, 2, 4)).mean((2, 3)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False)
        self.pw = nn.Conv1d(5, 3, 1)

    def forward(self, x):
        return self.pw(self.dw(x.view(-1, 5, 2, 4)).flatten(2)).mean(2)


class TiedLM(nn.Module):
    """Output projection tied to the input embedding (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        idx = (x.abs() * 7).long().clamp_max(19)[..., 0]
        return self.out(torch.tanh(self.mix(self.emb(idx)))).mean(1)


FAMILIES = {
    "transformer": Encoder,
    "mha-qkv": CrossAttention,
    "lstm": lstm,
    "gru": gru,
    "embedding": Bag,
    "conv-transpose": Upsample,
    "depthwise": Depthwise,
    "tied": TiedLM,
}


def make_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(seed))  # (B, T, 8); 40 values per item


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]()


def hand_zeroed(name: str, model: nn.Module) -> nn.Module:
    """A plain model holding ``model``'s effective weights (zeros written by hand, no parametrization)."""
    plain = build(name)
    state, _ = plain_state_dict(model)
    plain.load_state_dict(state)
    return plain


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding: the weights are compared bit for bit elsewhere, but a parametrized
    weight is a freshly allocated tensor and CPU matmul kernels may sum in another order depending on
    memory alignment. Ignoring a mask changes outputs by orders of magnitude more (checked below)."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def big_weights(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point() and p.dim() >= 2}


# ---------------------------------------------------------------- the round trip, per family


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_round_trip(name, tmp_path):
    model = build(name)
    x = make_input()
    refs = select_weights(model)
    assert {n for r in refs for n in r.names} == big_weights(model)
    assert [row["name"] for row in layer_summary(model)] == [r.fqn for r in refs]

    # prune: masks are honoured inside each module's own forward (eval and train mode)
    keep = prune_model(model, PruneConfig(q=50))
    assert sorted(keep) == sorted(r.fqn for r in refs)
    for mode in (False, True):
        model.train(mode)
        plain = hand_zeroed(name, model).train(mode)
        with torch.no_grad():  # eval + no_grad takes MultiheadAttention's native fast path
            assert same(model(x), plain(x))
            unmasked = build(name).train(mode)
            assert not same(unmasked(x), plain(x))  # the check above would catch ignored masks
        assert same(model(x), plain(x))

    # retrain a few steps: pruned entries stay exactly zero, kept ones move, forward still exact
    before = {fqn: w.clone() for fqn, w in plain_state_dict(model)[0].items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model.train()
    for step in range(3):
        opt.zero_grad()
        model(make_input(10 + step)).square().mean().backward()
        opt.step()
    after, _ = plain_state_dict(model)
    for fqn, mask in masks(model).items():
        assert torch.all(after[fqn][~mask] == 0), fqn
        assert not torch.equal(after[fqn][mask], before[fqn][mask]), f"{fqn} did not train"
    with torch.no_grad():
        assert same(model.eval()(x), hand_zeroed(name, model).eval()(x))

    # quantize, encode: every selected weight coded (a tied one once), decoded bit for bit
    quantize_model(model, QuantizeConfig(bits=3))
    path = tmp_path / "m.dsz"
    compress_model(model, path)
    header, stored = read_file(path)
    coded = {n for n, e in header["tensors"].items() if e["codec"] in ("deep_compression", "cabac")}
    assert coded == {r.fqn for r in refs}
    expected, _ = plain_state_dict(model)
    decoded = open_file(path).with_aliases(stored)
    assert decoded.keys() == expected.keys()
    for key, value in expected.items():
        assert decoded[key].dtype == value.dtype and torch.equal(decoded[key], value), key

    # load into a model the caller built: same forward, bit for bit
    loaded = deepshrink.load(path, model=FAMILIES[name]())
    model.eval()
    with torch.no_grad():
        assert same(loaded.eval()(x), model(x))
    assert tied_weights(loaded) == tied_weights(model)


def test_tied_weight_is_pruned_quantized_and_stored_once(tmp_path):
    model = build("tied")
    (ref,) = [r for r in select_weights(model) if r.kind == "embedding"]
    assert ref.fqn == "emb.weight" and ref.aliases == ("out.weight",)
    prune_model(model, PruneConfig(q=60))
    assert model.out.parametrizations.weight[0] is model.emb.parametrizations.weight[0]  # one mask
    quantize_model(model, QuantizeConfig(bits=2))
    assert model.out.parametrizations.weight[0] is model.emb.parametrizations.weight[0]  # one codebook
    assert torch.equal(model.out.weight, model.emb.weight)
    path = tmp_path / "t.dsz"
    compress_model(model, path)
    header = read_header(path)
    assert "out.weight" not in header["tensors"] and header["meta"]["tied_weights"] == {"out.weight": "emb.weight"}

    untied = FAMILIES["tied"]()
    untied.out.weight = nn.Parameter(torch.zeros(20, 8))  # the caller's model lost the tie: load restores it
    loaded = deepshrink.load(path, model=untied)
    assert loaded.out.weight is loaded.emb.weight
    assert torch.equal(loaded.emb.weight, model.emb.weight)


def test_include_matches_any_name_of_a_tied_weight():
    model = build("tied")
    assert [r.fqn for r in select_weights(model, include=["out.*"])] == ["emb.weight"]


def test_kinds_and_per_kind_settings():
    model = build("transformer")
    kinds = {r.fqn: r.kind for r in select_weights(model)}
    assert kinds["pos"] == "other" and kinds["head.weight"] == "fc"
    assert kinds["encoder.layers.0.self_attn.in_proj_weight"] == "attention"
    assert kinds["encoder.layers.0.self_attn.out_proj.weight"] == "attention"
    assert kinds["encoder.layers.0.linear1.weight"] == "fc"
    assert {r.kind for r in select_weights(lstm())} == {"rnn", "fc"}
    assert {r.kind for r in select_weights(Bag())} == {"embedding", "fc"}
    assert {r.kind for r in select_weights(Upsample())} == {"conv", "fc"}

    keep = prune_model(model, PruneConfig(q=50, q_by_kind={"attention": 80, "other": 0}))
    sparsity = {f: 1 - m.float().mean().item() for f, m in keep.items()}
    assert sparsity["encoder.layers.1.self_attn.in_proj_weight"] == pytest.approx(0.8, abs=0.01)
    assert sparsity["pos"] == 0 and sparsity["head.weight"] == pytest.approx(0.5, abs=0.05)
    layers = quantize_model(model, QuantizeConfig(bits=4, bits_by_kind=[("attention", 6)], bits_fc=5))
    assert layers["encoder.layers.0.self_attn.out_proj.weight"]["bits"] == 6
    assert layers["head.weight"]["bits"] == 5 and layers["pos"]["bits"] == 4


def test_thresholds_and_kind_errors():
    model = build("transformer")
    names = {r.fqn for r in select_weights(model, min_dims=1)}
    assert "encoder.layers.0.norm1.weight" in names and "head.bias" in names
    assert "pos" not in {r.fqn for r in select_weights(model, min_numel=41)}
    with pytest.raises(ConfigError, match="unknown weight kind 'lstm'"):
        QuantizeConfig(bits_by_kind={"lstm": 4})
    with pytest.raises(ConfigError, match="min_dims must be an integer"):
        select_weights(model, min_dims=-1)
    with pytest.raises(ConfigError, match="q_by_kind"):
        PruneConfig(method="std", q_by_kind={"fc": 50})


def test_load_into_a_model_that_differs_lists_every_difference(tmp_path):
    model = build("lstm")
    quantize_model(model, QuantizeConfig(bits=2))
    compress_model(model, tmp_path / "m.dsz")
    other = Recurrent(nn.LSTM, proj_size=2)  # adds weight_hr_l*, changes shapes
    with pytest.raises(TensorInfoMismatch) as e:
        deepshrink.load(tmp_path / "m.dsz", model=other)
    message = str(e.value)
    assert "not in the model" not in message or "weight_hr_l0" in message
    assert "missing from the file (2): rnn.weight_hr_l0, rnn.weight_hr_l1" in message
    assert "shape mismatch" in message and "rnn.weight_hh_l0 (24, 6) in the file, (24, 2) in the model" in message


def test_encode_include_exclude_stores_unselected_weights_raw(tmp_path):
    from deepshrink.encode import EncodeConfig

    model = build("lstm")
    quantize_model(model, QuantizeConfig(bits=2))
    compress_model(model, tmp_path / "m.dsz", EncodeConfig(exclude=("head.*",)))
    tensors = read_header(tmp_path / "m.dsz")["tensors"]
    assert tensors["head.weight"]["codec"] == "raw" and tensors["rnn.weight_ih_l0"]["codec"] != "raw"
    with pytest.raises(ConfigError, match="encode include pattern .nope.. matches no selected weight"):
        compress_model(model, tmp_path / "x.dsz", EncodeConfig(include=("nope*",)))


# ---------------------------------------------------------------- the command line on user models' files


class DigitsLSTM(nn.Module):
    """A user model for sklearn's 8x8 digits: each image row is a time step."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.rnn = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.rnn(x.flatten(1, 2))[0][:, -1])  # (B, 1, 8, 8) -> (B, 8, 8) -> (B, 10)


def digits_lstm(hidden: int = 12):
    torch.manual_seed(0)
    return DigitsLSTM(hidden)


@pytest.fixture
def user_file(tmp_path):
    model = digits_lstm(hidden=12)
    prune_model(model, PruneConfig(q=50))
    quantize_model(model, QuantizeConfig(bits=3))
    path = tmp_path / "user.dsz"
    spec = {"factory": "test_anymodel:digits_lstm", "kwargs": {"hidden": 12}}
    compress_model(model, path, model_spec=spec, meta={"dataset": {"name": "digits"}})
    return path, model


def test_cli_eval_summary_inspect_decode_on_a_user_models_file(user_file, tmp_path, capsys):
    from deepshrink.cli import main

    path, model = user_file
    assert main(["eval", str(path)]) == 2  # the file names a factory: refused until trusted or named
    assert "--model test_anymodel:digits_lstm" in capsys.readouterr().err
    assert main(["eval", str(path), "--model", "test_anymodel:digits_lstm", "--model-kwargs", '{"hidden": 12}']) == 0
    named = capsys.readouterr().out
    assert main(["eval", str(path), "--trust-factory"]) == 0
    trusted = capsys.readouterr().out
    assert "accuracy" in named and named.split(":", 1)[1] == trusted.split(":", 1)[1]

    assert main(["summary", str(path), "--trust-factory", "--json"]) == 0
    rows = __import__("json").loads(capsys.readouterr().out)["layers"]
    assert [r["name"] for r in rows] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"]
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in rows)

    assert main(["inspect", str(path), "--model", "test_anymodel:DigitsLSTM", "--model-kwargs", '{"hidden": 5}']) == 2
    assert "shape mismatch" in capsys.readouterr().err
    assert main(["decode", str(path), "--trust-factory", "--out", str(tmp_path / "s.pt")]) == 0
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(state["rnn.weight_hh_l0"], model.rnn.weight_hh_l0)


def test_cli_eval_of_a_recipes_file_needs_no_dataset(tmp_path, capsys):
    from deepshrink.cli import main
    from deepshrink.pipeline import Recipe, run_recipe

    recipe = Recipe.from_dict({
        "name": "tiny", "model": {"arch": "mlp", "kwargs": {"hidden": [16]}},
        "dataset": {"name": "digits", "root": str(tmp_path / "somewhere")},
        "stages": [{"train": {"epochs": 1}}, {"prune": {"q": 50}}, {"quantize": {"bits": 3}}, {"encode": {}}],
    })
    result = run_recipe(recipe, tmp_path / "run")
    path = result.stages[-1]["file"]
    record = read_header(path)["meta"]["dataset"]
    assert record["name"] == "digits" and "root" not in record  # a path belongs to one machine
    assert record["image_shape"] == [1, 8, 8] and record["num_classes"] == 10 and len(record["mean"]) == 1
    capsys.readouterr()
    assert main(["eval", str(path), "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {100 * result.stages[-1]['decoded_accuracy']:.2f}%" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN's fused RNN and flatten_parameters)")
@pytest.mark.parametrize("name", ["lstm", "gru", "transformer"])
def test_masks_survive_cudnn_and_flatten_parameters(name):
    model = build(name).cuda()
    x = make_input().cuda()
    keep = prune_model(model, PruneConfig(q=50))
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()  # packs cuDNN's weight buffer: must not bring pruned values back
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        opt.zero_grad()
        model(make_input(10 + step).cuda()).square().mean().backward()
        opt.step()
    state, _ = plain_state_dict(model)
    for fqn, mask in keep.items():
        assert torch.all(state[fqn][~mask] == 0), fqn
    plain = build(name).cuda()
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-4)


def test_recipe_options_select_and_set_per_kind():
    from deepshrink.pipeline import make_config

    config = make_config(PruneConfig, {"q": 40, "q_by_kind": {"rnn": 70}, "include": ["rnn.*"], "min_dims": 2}, "s")
    keep = prune_model(lstm(), config)
    assert sorted(keep) == ["rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l0", "rnn.weight_ih_l1"]
    assert all(1 - m.float().mean().item() == pytest.approx(0.7, abs=0.01) for m in keep.values())
    quantize = make_config(QuantizeConfig, {"bits_by_kind": [["rnn", 5]], "exclude": ["head.*"]}, "s")
    assert quantize.bits_by_kind == (("rnn", 5),)


def test_tied_weights_survive_a_checkpoint(tmp_path):
    from deepshrink.checkpoint import load_checkpoint, save_checkpoint

    model = build("tied")
    prune_model(model, PruneConfig(q=50))
    save_checkpoint(tmp_path / "c.pt", model, {"factory": "test_anymodel:TiedLM", "kwargs": {}})
    loaded, _ = load_checkpoint(tmp_path / "c.pt", trust_factory=True)  # the test's own factory
    assert loaded.out.parametrizations.weight[0] is loaded.emb.parametrizations.weight[0]
    assert loaded.out.parametrizations.weight.original is loaded.emb.parametrizations.weight.original
    quantize_model(loaded, QuantizeConfig(bits=2))
    assert torch.equal(loaded.out.weight, loaded.emb.weight)
    assert torch.equal(masks(loaded)["emb.weight"], masks(model)["emb.weight"])


# ---------------------------------------------------------------- BatchNorm folding (EncodeConfig.fold_batchnorm)


class ConvBN(nn.Module):
    """Conv -> BatchNorm2d -> Linear -> BatchNorm1d -> BatchNorm1d(affine=False) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn1d = nn.BatchNorm1d(5, eps=0.1)  # large enough that a fold that forgets sqrt(1 + eps) shows
        self.plain_bn = nn.BatchNorm1d(5, affine=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(self.plain_bn(self.bn1d(self.fc(x))))


def conv_bn() -> ConvBN:
    """A ConvBN in eval mode whose BatchNorms hold statistics and affine parameters far from 0 and 1."""
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.bn, model.bn1d, model.plain_bn):
            bn.running_mean.normal_(0, 2)
            bn.running_var.uniform_(0.05, 5)
            bn.num_batches_tracked.fill_(7)
            if bn.affine:
                bn.weight.normal_(1, 0.5)
                bn.bias.normal_(0, 0.5)
    return model.eval()


def encode_options(path) -> dict:
    return read_header(path)["meta"]["encode"]


def test_fold_batchnorm_keeps_eval_outputs_and_resets_statistics(tmp_path):
    from deepshrink.encode import EncodeConfig

    model = conv_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    compress_model(model, tmp_path / "m.dsz", EncodeConfig(fold_batchnorm=True))
    assert encode_options(tmp_path / "m.dsz")["fold_batchnorm"] is True
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())  # the caller's model is untouched
    assert model.bn.running_var.min() < 0.5 and not model.training

    loaded = deepshrink.load(tmp_path / "m.dsz", model=ConvBN()).eval()
    with torch.no_grad():
        got = loaded(x)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    for name in ("bn", "bn1d"):
        bn, original = getattr(loaded, name), getattr(model, name)
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert bn.num_batches_tracked.item() == 7  # kept as it is
        assert not torch.allclose(bn.weight, original.weight) and not torch.allclose(bn.bias, original.bias)
    for key in ("plain_bn.running_mean", "plain_bn.running_var"):  # no affine parameters to fold into: as is
        assert torch.equal(loaded.state_dict()[key], before[key])


def test_batchnorm_is_stored_as_is_by_default(tmp_path):
    model = conv_bn()
    compress_model(model, tmp_path / "m.dsz")
    assert encode_options(tmp_path / "m.dsz")["fold_batchnorm"] is False
    loaded = deepshrink.load(tmp_path / "m.dsz", model=ConvBN()).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


class TiedBN(nn.Module):
    """Two BatchNorms sharing one gamma: folding either would change the other's."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_fold_batchnorm_leaves_quantized_and_tied_batchnorm_weights_alone(tmp_path):
    from deepshrink.encode import EncodeConfig

    model = conv_bn()
    quantize_model(model, QuantizeConfig(bits=2, include=("bn.weight",), min_dims=1))
    compress_model(model, tmp_path / "q.dsz", EncodeConfig(fold_batchnorm=True))
    assert read_header(tmp_path / "q.dsz")["tensors"]["bn.weight"]["codec"] != "raw"  # still coded
    loaded = deepshrink.load(tmp_path / "q.dsz", model=ConvBN()).state_dict()
    plain, _ = plain_state_dict(model)
    for key in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert torch.equal(loaded[key], plain[key]), key
    assert torch.equal(loaded["bn1d.running_var"], torch.ones(5))  # the other BatchNorm is folded

    tied = TiedBN().eval()
    with torch.no_grad():
        for bn in (tied.a, tied.b):
            bn.running_mean.normal_(0, 2)
            bn.running_var.uniform_(0.05, 5)
    compress_model(tied, tmp_path / "t.dsz", EncodeConfig(fold_batchnorm=True))
    loaded = deepshrink.load(tmp_path / "t.dsz", model=TiedBN()).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tied.state_dict().items())  # neither BatchNorm folded


def test_fold_batchnorm_stats_core():
    from deepshrink.batchnorm import fold_batchnorm_stats

    weight, bias = torch.tensor([1.5, -0.5, 0.0]), torch.tensor([0.1, 0.2, -0.3])
    mean, var = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([4.0, 0.25, 1.0])
    scale, shift, zeros, ones = fold_batchnorm_stats(weight, bias, mean, var, eps=1e-3)
    w, b, m, v = (t.double() for t in (weight, bias, mean, var))
    assert torch.equal(scale, (w * (1 + 1e-3) ** 0.5 / (v + 1e-3).sqrt()).float())
    assert torch.equal(shift, (b - w * m / (v + 1e-3).sqrt()).float())
    assert torch.equal(zeros, torch.zeros(3)) and torch.equal(ones, torch.ones(3))
    folded = fold_batchnorm_stats(weight.half(), bias.half(), mean.double(), var.double(), eps=1e-3)
    assert [t.dtype for t in folded] == [torch.float16, torch.float16, torch.float64, torch.float64]
    with pytest.raises(ConfigError, match="layer3.bn: cannot fold BatchNorm: running_var . eps must be positive"):
        fold_batchnorm_stats(weight, bias, mean, torch.tensor([1.0, -1.0, 1.0]), 1e-5, where="layer3.bn")
    with pytest.raises(ConfigError, match="must be positive"):
        fold_batchnorm_stats(weight, bias, mean, torch.tensor([1.0, float("nan"), 1.0]), 1e-5)


def test_fold_batchnorm_option_is_checked_and_accepted_by_recipes():
    from deepshrink.encode import EncodeConfig
    from deepshrink.pipeline import stage_config

    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match=f"fold_batchnorm must be true or false, got {bad!r}"):
            EncodeConfig(fold_batchnorm=bad)
    assert stage_config("encode", {"fold_batchnorm": True, "raw_dtype": "float16"}, "stage 3").fold_batchnorm is True
    with pytest.raises(ConfigError, match="stage 3: fold_batchnorm must be true or false, got 'yes'"):
        stage_config("encode", {"fold_batchnorm": "yes"}, "stage 3")
