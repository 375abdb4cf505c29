"""Stage 3: 1-D k-means (inits, empty clusters, parity with scikit-learn) and weight sharing on models
(zeros kept, codebook invariant under training, centroid gradients, checkpoints)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.checkpoint import read_checkpoint, save_checkpoint
from deepshrink.compress import compress_model, load
from deepshrink.parametrizations import Masked, SharedWeights, compression_state, masks, restore_compression
from deepshrink.errors import ConfigError
from deepshrink.layers import WeightRef
from deepshrink.prune import sparsity
from deepshrink.kmeans import CentroidInit, init_centroids, kmeans_1d
from deepshrink.quantize import QuantizeConfig, bits_for, codebooks, quantize_model, quantize_weight
from deepshrink.quantizers import QuantizeMethod, dependent_1d, ecsq_1d, uniform_1d
from deepshrink.train import fisher_diagonal

INITS = [m.value for m in CentroidInit]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def pruned_weights(n: int, seed: int, sparsity: float = 0.5, shift: float = 0.0, heavy: bool = False) -> np.ndarray:
    """Non-zero weights of a magnitude-pruned layer: bimodal, with a gap around zero (float32)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, n) * 0.02 if heavy else rng.normal(shift, 0.05, n)
    return w[np.abs(w) > np.quantile(np.abs(w), sparsity)].astype(np.float32)


def mse(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((values.astype(np.float64) - centroids[labels]) ** 2))


def sklearn_mse(values: np.ndarray, init: np.ndarray, max_iter: int, tol: float) -> float:
    from sklearn.cluster import KMeans

    x = values.astype(np.float64)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when it stops at max_iter
        km = KMeans(init.size, init=init[:, None], n_init=1, max_iter=max_iter, tol=tol, algorithm="lloyd").fit(x)
    return mse(values, km.cluster_centers_[:, 0], km.labels_)


def assert_lloyd_fixed_point(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> None:
    """Clusters are contiguous in value order, and every centroid is the mean of its members."""
    assert np.all(np.diff(centroids) > 0)
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(labels[order].astype(np.int64)) >= 0)
    counts = np.bincount(labels, minlength=centroids.size)
    assert counts.min() > 0
    means = np.bincount(labels, weights=values.astype(np.float64), minlength=centroids.size) / counts
    np.testing.assert_allclose(centroids, means, rtol=1e-12, atol=1e-15)


class TinyNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc1 = nn.Linear(6 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def masked_net(seed: int = 0, sparsity: float = 0.5) -> tuple[TinyNet, dict[str, torch.Tensor]]:
    """TinyNet with a magnitude mask (``Masked``) on every weight; returns the masks too."""
    model = TinyNet(seed)
    masks = {}
    for name in ("conv", "fc1", "fc2"):
        module = getattr(model, name)
        w = module.weight.detach()
        mask = w.abs() > w.abs().flatten().quantile(sparsity)
        parametrize.register_parametrization(module, "weight", Masked(mask))
        masks[f"{name}.weight"] = mask
    return model, masks


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def shared(model: nn.Module, name: str) -> SharedWeights:
    return getattr(model, name).parametrizations.weight[0]


# ---------------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------------


def test_linear_init_spaces_centroids_equally_between_min_and_max():
    values = pruned_weights(3000, seed=1)
    c = init_centroids(values, 16, "linear")
    assert c.dtype == np.float64 and c.size == 16
    assert c[0] == values.min() and c[-1] == values.max()
    np.testing.assert_allclose(np.diff(c), (float(values.max()) - float(values.min())) / 15, rtol=1e-9)


def test_density_init_takes_equally_spaced_cdf_levels():
    values = pruned_weights(3000, seed=2)
    c = init_centroids(values, 8, "density")
    np.testing.assert_allclose(c, np.quantile(values.astype(np.float64), (np.arange(8) + 0.5) / 8), rtol=1e-12)
    # equal steps in the empirical CDF: about n/8 values between consecutive centroids
    between = np.diff(np.searchsorted(np.sort(values), c))
    assert np.all(np.abs(between - values.size / 8) <= 1)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_seeded_inits_draw_distinct_values_from_the_weights_per_seed(init):
    values = pruned_weights(3000, seed=3)
    a = init_centroids(values, 16, init, seed=5)
    assert a.size == 16 and np.all(np.diff(a) > 0)
    assert np.isin(a, values.astype(np.float64)).all()
    np.testing.assert_array_equal(a, init_centroids(values, 16, init, seed=5))
    assert not np.array_equal(a, init_centroids(values, 16, init, seed=6))


def test_random_init_tops_up_when_draws_repeat_a_value():
    values = np.array([0.5] * 500 + [1.0, 2.0, 3.0], dtype=np.float32)  # most draws hit 0.5
    c = init_centroids(values, 4, "random", seed=0)
    np.testing.assert_array_equal(c, [0.5, 1.0, 2.0, 3.0])


def test_kmeans_pp_prefers_far_values():
    # 1000 values near 0 and one far outlier: D^2 sampling picks the outlier almost surely
    rng = np.random.default_rng(0)
    values = np.append(rng.normal(0, 1e-3, 1000), 100.0)
    hits = sum(100.0 in init_centroids(values, 2, "kmeans++", seed=s) for s in range(20))
    assert hits == 20


@pytest.mark.parametrize("init", INITS)
def test_init_accepts_enum_members_and_strings(init):
    values = pruned_weights(500, seed=5)
    np.testing.assert_array_equal(init_centroids(values, 4, CentroidInit(init), 3), init_centroids(values, 4, init, 3))


# ---------------------------------------------------------------------------------------------------
# kmeans_1d
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": np.array([]), "k": 2}, "empty"),
        ({"values": np.array([1.0, np.nan]), "k": 2}, "NaN/inf"),
        ({"values": np.array([1.0, np.inf]), "k": 2}, "NaN/inf"),
        ({"values": np.ones((2, 2)), "k": 2}, "1-D"),
        ({"values": np.array(["a", "b"]), "k": 2}, "real numbers"),
        ({"values": np.ones(3), "k": 0}, "k"),
        ({"values": np.ones(3), "k": 2.5}, "k"),
        ({"values": np.ones(3), "k": 2, "init": "uniform"}, "kmeans\\+\\+"),
        ({"values": np.ones(3), "k": 2, "max_iter": 0}, "max_iter"),
        ({"values": np.ones(3), "k": 2, "tol": -1.0}, "tol"),
    ],
)
def test_kmeans_rejects_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        kmeans_1d(**kwargs)


def test_fewer_distinct_values_than_k_returns_exactly_those_values():
    values = np.array([0.3, -0.1, 0.3, 0.7, -0.1, 0.7, 0.7], dtype=np.float32)
    for k in (3, 4, 16):
        c, labels = kmeans_1d(values, k)
        np.testing.assert_array_equal(c, np.array([-0.1, 0.3, 0.7], dtype=np.float32).astype(np.float64))
        np.testing.assert_array_equal(c[labels], values.astype(np.float64))
    c, labels = kmeans_1d(np.full(5, 2.0), 4)
    assert c.tolist() == [2.0] and labels.tolist() == [0] * 5


def test_empty_clusters_are_reseeded():
    # two tight clumps at -1 and +1: linear init puts centroids at -1/3 and +1/3, which attract nothing
    rng = np.random.default_rng(0)
    values = np.concatenate([-1 + rng.normal(0, 0.01, 500), 1 + rng.normal(0, 0.01, 500)])
    assert np.bincount(np.searchsorted([-2 / 3, 0, 2 / 3], values), minlength=4).tolist() == [500, 0, 0, 500]
    c, labels = kmeans_1d(values, 4, "linear")
    assert c.size == 4
    assert_lloyd_fixed_point(values, c, labels)
    two, two_labels = kmeans_1d(values, 2, "linear")
    assert mse(values, c, labels) < 0.8 * mse(values, two, two_labels)  # the extra centroids do work


def test_duplicate_initial_centroids_are_reseeded():
    # density init on heavily repeated values gives equal quantiles
    values = np.array([0.1] * 900 + list(np.linspace(0.2, 1.0, 100)))
    assert np.unique(init_centroids(values, 8, "density")).size < 8
    c, labels = kmeans_1d(values, 8, "density")
    assert c.size == 8
    assert_lloyd_fixed_point(values, c, labels)


@pytest.mark.parametrize("init", INITS)
def test_result_is_a_lloyd_fixed_point(init):
    values = pruned_weights(40_000, seed=6)  # > one 32k chunk of the labelling loop
    c, labels = kmeans_1d(values, 16, init, seed=3, max_iter=500, tol=0.0)
    assert c.size == 16 and labels.shape == values.shape
    assert_lloyd_fixed_point(values, c, labels)
    # converged: every value is nearest to its own centroid (ties aside)
    nearest = np.abs(values[:, None].astype(np.float64) - c[None, :]).min(axis=1)
    np.testing.assert_allclose(np.abs(values - c[labels]), nearest, atol=1e-12)


def test_many_clusters_use_the_binary_search_labels():
    values = pruned_weights(20_000, seed=7)
    c, labels = kmeans_1d(values, 256, "linear")
    assert c.size == 256
    assert_lloyd_fixed_point(values, c, labels)


def test_integer_values_are_accepted():
    c, labels = kmeans_1d(np.array([1, 2, 10, 11, 12]), 2)
    np.testing.assert_allclose(c, [1.5, 11.0])
    assert labels.tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("init", INITS)
def test_mse_no_higher_than_sklearn(init):
    layers = [
        pruned_weights(4000, seed=10),
        pruned_weights(3000, seed=11, sparsity=0.8),
        pruned_weights(2500, seed=12, shift=0.01, sparsity=0.6),
        pruned_weights(3000, seed=13, heavy=True, sparsity=0.7),
        pruned_weights(1500, seed=14, heavy=True, sparsity=0.4),
    ]
    for i, values in enumerate(layers):
        for k in (4, 16, 32):
            start = init_centroids(values, k, init, seed=i)
            c, labels = kmeans_1d(values, k, init, seed=i, max_iter=300, tol=1e-7)
            ours, theirs = mse(values, c, labels), sklearn_mse(values, start, 300, 1e-7)
            assert ours <= theirs * (1 + 1e-9), (i, k, ours, theirs)


def test_more_centroids_never_hurt_much_and_quantize_well():
    values = pruned_weights(5000, seed=20)
    errors = [mse(values, *kmeans_1d(values, 2**b)) for b in (1, 2, 3, 4, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-3 * float(np.var(values))


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"bits_conv": 0}, "bits_conv"),
        ({"bits_fc": 20}, "bits_fc"),
        ({"bits_by_pattern": (("fc*", 0),)}, "fc\\*"),
        ({"bits_by_pattern": ("fc*",)}, "pairs"),
        ({"init": "uniform"}, "linear"),
        ({"gradient": "mean"}, "avg"),
        ({"max_iter": 0}, "max_iter"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizeConfig(**kwargs)


def test_config_normalises_to_json_friendly_values():
    config = QuantizeConfig(init=CentroidInit.KMEANS_PP, gradient="avg", bits_by_pattern=[["fc*", 6]],
                            include=["conv*", "fc*"], kinds=["conv", "fc"])
    assert config.init == "kmeans++" and type(config.init) is str
    assert config.bits_by_pattern == (("fc*", 6),) and config.include == ("conv*", "fc*")
    assert QuantizeConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_bits_for_prefers_pattern_then_layer_kind_then_default():
    conv = WeightRef("features.0.weight", "features.0", "weight", "conv", "Conv2d")
    fc = WeightRef("classifier.1.weight", "classifier.1", "weight", "fc", "Linear")
    assert bits_for(conv, QuantizeConfig(bits=4)) == 4
    config = QuantizeConfig(bits=4, bits_conv=8, bits_fc=5)
    assert (bits_for(conv, config), bits_for(fc, config)) == (8, 5)
    config = QuantizeConfig(bits=4, bits_conv=8, bits_by_pattern=(("features.*", 3), ("*", 2)))
    assert (bits_for(conv, config), bits_for(fc, config)) == (3, 2)
    assert bits_for(fc, QuantizeConfig(bits=6, bits_conv=8)) == 6


# ---------------------------------------------------------------------------------------------------
# quantize_weight / quantize_model
# ---------------------------------------------------------------------------------------------------


def test_quantize_weight_keeps_zeros_at_index_zero():
    w = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, (20, 30)).astype(np.float32))
    w[w.abs() < 0.03] = 0
    centroids, indices = quantize_weight(w, bits=3)
    assert centroids.dtype == torch.float32 and centroids.shape == (8,)
    assert indices.shape == w.shape and indices.dtype == torch.uint8
    assert torch.equal(indices == 0, w == 0)
    assert int(indices.max()) == 8
    quantized = torch.cat([torch.zeros(1), centroids])[indices.long()]
    nonzero = w != 0
    assert ((quantized - w)[nonzero] ** 2).mean() < 0.05 * w[nonzero].var()  # 8 levels: ~50x below one level


def test_quantize_weight_edge_cases():
    centroids, indices = quantize_weight(torch.zeros(3, 4), bits=4)
    assert centroids.numel() == 0 and not indices.any()
    centroids, indices = quantize_weight(torch.tensor([0.0, 0.5, -0.5, 0.5]), bits=4)
    assert centroids.tolist() == [-0.5, 0.5] and indices.tolist() == [0, 2, 1, 2]
    with pytest.raises(ConfigError, match="bits"):
        quantize_weight(torch.ones(3), bits=0)
    with pytest.raises(ConfigError, match="NaN"):
        quantize_weight(torch.tensor([1.0, float("nan")]), bits=2)


def test_quantize_model_shares_weights_and_keeps_pruned_zeros():
    model, masks = masked_net()
    dense = {n: getattr(model, n.split(".")[0]).weight.detach().clone() for n in masks}
    info = quantize_model(model, QuantizeConfig(bits=2, bits_fc=3, bits_by_pattern=(("fc2.*", 4),)))
    assert list(info) == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert [info[f]["bits"] for f in info] == [2, 3, 4]
    for fqn, mask in masks.items():
        module = getattr(model, fqn.split(".")[0])
        plist = module.parametrizations.weight
        assert len(plist) == 1 and isinstance(plist[0], SharedWeights)  # Masked was baked in and removed
        assert not plist.original.requires_grad
        w = module.weight
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        assert torch.equal(plist[0].indices == 0, ~mask)
        values = torch.unique(w[w != 0])
        assert values.numel() <= 2 ** info[fqn]["bits"] == 2 ** plist[0].bits
        assert info[fqn]["num_centroids"] == plist[0].centroids.numel()
        assert info[fqn]["nonzero"] == int(mask.sum()) and info[fqn]["numel"] == mask.numel()
        expected = float(((w.detach().double() - dense[fqn].double())[mask] ** 2).mean())
        assert info[fqn]["mse"] == pytest.approx(expected, rel=1e-9)
    assert set(codebooks(model)) == set(masks)
    centroids, indices, bits = codebooks(model)["fc1.weight"]
    assert bits == 3 and torch.equal(torch.cat([torch.zeros(1), centroids])[indices.long()], model.fc1.weight)


def test_quantize_model_on_an_unpruned_model_and_with_selection():
    model = TinyNet()
    info = quantize_model(model, QuantizeConfig(bits=3, include=("fc*",), exclude=("fc2.*",)))
    assert list(info) == ["fc1.weight"]
    assert not parametrize.is_parametrized(model.conv) and not parametrize.is_parametrized(model.fc2)
    assert torch.unique(model.fc1.weight).numel() <= 8


def test_quantize_model_is_deterministic():
    a, _ = masked_net(seed=1)
    b, _ = masked_net(seed=1)
    config = QuantizeConfig(bits=3, init="kmeans++", seed=7)
    quantize_model(a, config)
    quantize_model(b, config)
    for (fa, (ca, ia, _)), (fb, (cb, ib, _)) in zip(codebooks(a).items(), codebooks(b).items()):
        assert fa == fb and torch.equal(ca, cb) and torch.equal(ia, ib)


def test_quantize_model_refuses_quantized_layers_and_leaves_model_unchanged_on_error():
    model, _ = masked_net()
    quantize_model(model, QuantizeConfig(bits=2, include=("fc2.*",)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="fc2.weight is already quantized"):
        quantize_model(model, QuantizeConfig(bits=2))
    assert isinstance(model.conv.parametrizations.weight[0], Masked)  # conv was not touched
    with torch.no_grad():
        model.fc1.parametrizations.weight.original[0, 0] = float("nan")
        model.fc1.parametrizations.weight[0].mask[0, 0] = True
    with pytest.raises(ConfigError, match="fc1.weight.*NaN"):
        quantize_model(model, QuantizeConfig(bits=2, exclude=("fc2.*",)))
    assert isinstance(model.conv.parametrizations.weight[0], Masked)
    assert before.keys() == model.state_dict().keys()
    with pytest.raises(ConfigError, match="bits_by_pattern pattern 'nope'"):
        quantize_model(TinyNet(), QuantizeConfig(bits_by_pattern=(("nope", 3),)))


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_quantize_model_refuses_foreign_parametrizations():
    model = TinyNet()
    parametrize.register_parametrization(model.fc1, "weight", Doubled())
    with pytest.raises(ConfigError, match=r"fc1.weight carries parametrizations .*\(Doubled\)"):
        quantize_model(model, QuantizeConfig(bits=2))
    assert not parametrize.is_parametrized(model.conv)


# ---------------------------------------------------------------------------------------------------
# the invariant under training, and centroid gradients
# ---------------------------------------------------------------------------------------------------


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for x, y in batches(steps):
        optimizer.zero_grad()
        with parametrize.cached():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4),
    ],
    ids=["sgd-momentum-wd", "adam"],
)
@pytest.mark.parametrize("gradient", ["sum", "avg"])
def test_training_keeps_the_codebook_invariant(make_optimizer, gradient):
    model, masks = masked_net()
    quantize_model(model, QuantizeConfig(bits=2, bits_fc=3, gradient=gradient))
    before = {f: (c.clone(), i.clone()) for f, (c, i, _) in codebooks(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} >= {id(shared(model, n).centroids) for n in ("conv", "fc1", "fc2")}
    train_steps(model, make_optimizer(params), steps=6)
    for fqn, (centroids, indices, bits) in codebooks(model).items():
        w = getattr(model, fqn.split(".")[0]).weight
        old_centroids, old_indices = before[fqn]
        assert torch.equal(indices, old_indices)  # assignments never change
        assert not torch.equal(centroids, old_centroids)  # but the shared values were trained
        assert torch.equal(w, torch.cat([torch.zeros(1), centroids])[indices.long()])  # exact values, exact places
        assert torch.equal(w[~masks[fqn]], torch.zeros_like(w[~masks[fqn]]))
        assert torch.unique(w[w != 0]).numel() <= 2**bits


def test_centroid_gradient_is_the_sum_of_member_gradients_and_avg_divides_by_counts():
    x, y = batches(1)[0]
    grads = {}
    for mode in ("sum", "avg"):
        model, _ = masked_net()
        quantize_model(model, QuantizeConfig(bits=3, gradient=mode))
        dense = TinyNet()
        plain = {k: v for k, v in model.state_dict().items() if "parametrizations" not in k}
        dense.load_state_dict(plain, strict=False)
        with torch.no_grad():
            for name in ("conv", "fc1", "fc2"):
                getattr(dense, name).weight.copy_(getattr(model, name).weight)
        for net in (model, dense):
            nn.functional.cross_entropy(net(x), y).backward()
        for name in ("conv", "fc1", "fc2"):
            sw = shared(model, name)
            k = sw.centroids.numel()
            index = sw.indices.flatten().long()
            dense_grad = getattr(dense, name).weight.grad.flatten().double()
            per_cluster = torch.bincount(index, weights=dense_grad, minlength=k + 1)[1:]
            if mode == "avg":
                per_cluster = per_cluster / torch.bincount(index, minlength=k + 1)[1:].clamp_min(1)
            assert per_cluster.abs().max() > 0
            torch.testing.assert_close(sw.centroids.grad.double(), per_cluster, rtol=1e-5, atol=1e-7)
            grads[mode, name] = sw.centroids.grad.clone()
    counts = shared(model, "fc1").member_counts().float()
    torch.testing.assert_close(grads["avg", "fc1"], grads["sum", "fc1"] / counts)


# ---------------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_codebooks(tmp_path):
    model, _ = masked_net()
    quantize_model(model, QuantizeConfig(bits=3, include=("fc*",)))  # conv stays Masked
    train_steps(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05), steps=2)
    path = save_checkpoint(tmp_path / "q.pt", model, {"factory": "test_quantize:TinyNet"})
    payload = read_checkpoint(path)
    assert payload["compression"] == {
        "conv.weight": [{"kind": "masked"}],
        "fc1.weight": [{"kind": "shared", "bits": 3}],
        "fc2.weight": [{"kind": "shared", "bits": 3}],
    }
    fresh = TinyNet(seed=123)
    restore_compression(fresh, payload["compression"], payload["state_dict"])
    fresh.load_state_dict(payload["state_dict"], strict=True)
    x = batches(1)[0][0]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for (fa, (ca, ia, ba)), (fb, (cb, ib, bb)) in zip(codebooks(model).items(), codebooks(fresh).items()):
        assert fa == fb and ba == bb and torch.equal(ca, cb) and torch.equal(ia, ib) and ia.dtype == ib.dtype


def test_state_dict_layout_is_centroids_and_indices_only():
    model = TinyNet()
    quantize_model(model, QuantizeConfig(bits=2, include=("fc2.*",), gradient="avg"))
    keys = {k for k in model.state_dict() if k.startswith("fc2.parametrizations")}
    assert keys == {"fc2.parametrizations.weight.original", "fc2.parametrizations.weight.0.centroids",
                    "fc2.parametrizations.weight.0.indices"}
    assert compression_state(model)["fc2.weight"][0]["bits"] == 2


def test_from_state_rebuilds_the_gradient_mode():
    sw = SharedWeights(torch.tensor([-1.0, 1.0]), torch.tensor([0, 1, 2, 2]), bits=1, gradient="avg")
    rebuilt = SharedWeights.from_state(dict(sw.state_dict()), bits=1, gradient="avg")
    rebuilt.load_state_dict(sw.state_dict())
    out = rebuilt(torch.zeros(4))
    out.sum().backward()
    assert rebuilt.gradient == "avg" and rebuilt.centroids.grad.tolist() == [1.0, 1.0]
    assert torch.equal(out, torch.tensor([0.0, -1.0, 1.0, 1.0]))


def test_load_checkpoint_rebuilds_a_quantized_builtin_model(tmp_path):
    models = pytest.importorskip("deepshrink.models")
    from deepshrink.checkpoint import load_checkpoint

    spec = {"arch": "mlp", "kwargs": {"hidden": [16]}}
    model = models.build_model(spec)
    quantize_model(model, QuantizeConfig(bits=2))
    path = save_checkpoint(tmp_path / "mlp.pt", model, spec)
    loaded, _ = load_checkpoint(path)
    for (fa, (ca, ia, _)), (fb, (cb, ib, _)) in zip(codebooks(model).items(), codebooks(loaded).items()):
        assert fa == fb and torch.equal(ca, cb) and torch.equal(ia, ib)


# ---------------------------------------------------------------------------------------------------
# rate-aware quantization: ECSQ and the uniform grid
# ---------------------------------------------------------------------------------------------------

LAMBDAS = [0.0, 0.003, 0.01, 0.03, 0.1]


def pruned_layer(seed: int = 0) -> torch.Tensor:
    """A (200, 150) weight with the 70% smallest magnitudes pruned (exact zeros)."""
    w = torch.from_numpy(np.random.default_rng(seed).normal(0, 0.05, (200, 150)).astype(np.float32))
    w[w.abs() < w.abs().flatten().quantile(0.7)] = 0
    return w


def index_entropy_bits(indices: torch.Tensor) -> float:
    from deepshrink.coding import entropy_bits

    flat = indices.reshape(-1).numpy().astype(np.int64)
    return entropy_bits(flat, int(flat.max()) + 1)


def huffman_bytes(centroids: torch.Tensor, indices: torch.Tensor, bits: int) -> int:
    from deepshrink.codecs.deep_compression import encode_quantized

    coded = encode_quantized(indices.numpy(), centroids.numpy(), bits, index_bits=5, coder="huffman")
    return len(coded.weights_stream) + len(coded.positions_stream) + coded.codebook.nbytes


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("k", [4, 64])
def test_ecsq_at_lambda_zero_is_exactly_kmeans(init, k):
    values = pruned_weights(6000, seed=3)
    centroids, labels = kmeans_1d(values, k, init, seed=5)
    levels, ecsq_labels = ecsq_1d(values, k, 0.0, init=init, seed=5, zeros=1234)
    assert np.array_equal(levels, centroids) and np.array_equal(ecsq_labels, labels)


def test_ecsq_rate_term_trades_distortion_for_fewer_bits():
    values = pruned_weights(20000, seed=1)
    zeros = 20000 - values.size
    rates, errors, counts = [], [], []
    for lam in LAMBDAS:
        levels, labels = ecsq_1d(values, 32, lam, zeros=zeros)
        assert np.all(np.diff(levels) > 0)
        symbols = np.concatenate([labels, np.full(zeros, np.searchsorted(levels, 0.0) if lam > 0 else levels.size)])
        from deepshrink.coding import entropy_bits

        rates.append(entropy_bits(symbols, levels.size + 1))
        errors.append(mse(values, levels, labels))
        counts.append(int(np.count_nonzero(levels)))
    assert all(a > b for a, b in zip(rates, rates[1:])), rates
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    assert counts[0] == 32 and counts[-1] < 16  # levels that lost all their members dropped out


def test_the_rate_term_lowers_entropy_and_real_huffman_bytes_monotonically():
    w = pruned_layer()
    entropies, sizes, errors = [], [], []
    for lam in LAMBDAS:
        centroids, indices = quantize_weight(w, bits=5, method="ecsq", lam=lam)
        entropies.append(index_entropy_bits(indices))
        sizes.append(huffman_bytes(centroids, indices, 5))
        q = torch.cat([torch.zeros(1), centroids])[indices.long()]
        errors.append(float((q - w).square().sum()))
    assert all(a > b for a, b in zip(entropies, entropies[1:])), entropies
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] < 0.7 * sizes[0]
    assert errors == sorted(errors)


def test_hessian_weights_protect_the_important_weights():
    values = pruned_weights(8000, seed=2)
    important = np.arange(values.size) % 2 == 0
    h = np.where(important, 100.0, 1.0)
    for lam in (0.0, 0.02):
        plain = ecsq_1d(values, 8, lam, zeros=100)
        weighted = ecsq_1d(values, 8, lam, h, zeros=100)
        err = [np.square(values - lv[lab])[important].mean() for lv, lab in (plain, weighted)]
        assert err[1] < err[0]


def test_ecsq_rejects_bad_settings():
    values = pruned_weights(100, seed=0)
    for kwargs, match in [({"lam": -1.0}, "lam"), ({"lam": float("nan")}, "lam"), ({"lam": True}, "lam"),
                          ({"lam": 0.1, "weights": np.ones(3)}, "weights"),
                          ({"lam": 0.1, "weights": -np.ones(values.size)}, "weights"),
                          ({"lam": 0.1, "zeros": -1}, "zeros"), ({"lam": 0.1, "iters": 0}, "iters")]:
        with pytest.raises(ConfigError, match=match):
            ecsq_1d(values, 4, **kwargs)
    with pytest.raises(ConfigError, match="num_levels"):
        uniform_1d(values, 1, 0.0)


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.1])
def test_uniform_levels_are_integer_multiples_of_one_step(lam):
    values = pruned_weights(10000, seed=4)
    step, q = uniform_1d(values, 30, lam, zeros=5000)
    assert step > 0 and q.dtype == np.int64 and np.abs(q).max() <= 15
    if lam == 0:  # distortion only: plain rounding to the final grid (no value beyond the top level)
        assert np.all(np.abs(values - q * step) <= step / 2 + 1e-9)
    # the model layer: 2^5 - 2 = 30 non-zero levels, the codebook is the used multiples of the step
    w = pruned_layer(seed=4)
    centroids, indices = quantize_weight(w, bits=5, method="uniform", lam=lam)
    step, q = uniform_1d(w[w != 0].numpy(), 30, lam, zeros=int((w == 0).sum()))
    used = np.unique(q[q != 0])
    assert torch.equal(centroids, torch.from_numpy(used * step).float())
    quantized = torch.cat([torch.zeros(1), centroids])[indices.long()]
    expected = torch.zeros_like(w)
    expected[w != 0] = torch.from_numpy(q * step).float()
    assert torch.equal(quantized, expected)


def test_uniform_rate_term_lowers_the_entropy():
    w = pruned_layer(seed=5)
    entropies = [index_entropy_bits(quantize_weight(w, bits=5, method="uniform", lam=lam)[1]) for lam in LAMBDAS]
    assert all(a > b for a, b in zip(entropies, entropies[1:])), entropies


# dependent (trellis-coded) quantization


def brute_force_path_cost(x, h, step, max_level, lam, row_length, sig_bits, mag_bits):
    """The cheapest cost over every level sequence the state machine allows, by exhaustive search (tiny inputs)."""
    from deepshrink.coding import level_kernels

    def search(i, state, left, cost):
        if i == x.size:
            return cost
        q = state & 1
        nz = 0 if i % row_length == 0 else left
        best = np.inf
        for j in range(-max_level, max_level + 1) if x[i] != 0 else (0,):
            if j and (j & 1) != q:
                continue  # quantizer 0 makes even levels, quantizer 1 odd ones (and zero)
            k = abs(j + q) // 2 if j > 0 else abs(j - q) // 2
            rate = sig_bits[q, nz, 1] + mag_bits[q, min(k, mag_bits.shape[1] - 1)] if k else sig_bits[q, nz, 0]
            here = cost + h[i] * (x[i] - j * step) ** 2 + lam * rate
            best = min(best, search(i + 1, level_kernels.DQ_NEXT[state, k & 1], int(j != 0), here))
        return best

    return search(0, 0, 0, 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_the_trellis_finds_the_cheapest_level_sequence(seed):
    from deepshrink import trellis

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1.5, 6) * (rng.random(6) < 0.8)
    h = rng.uniform(0.5, 2.0, 6)
    sig_bits = rng.uniform(0.2, 3.0, (2, 2, 2))
    mag_bits = rng.uniform(1.0, 6.0, (2, 4))
    out = np.zeros(6, dtype=np.int64)
    cost = trellis.viterbi(x, h, 0.7, 5, 0.3, 3, sig_bits, mag_bits, out)
    # the search only offers each quantizer's two levels around x: optimal whenever farther ones cost more
    assert cost == pytest.approx(brute_force_path_cost(x, h, 0.7, 5, 0.3, 3, sig_bits, mag_bits))
    assert cabac_follows(out) and np.all(out[x == 0] == 0)


def cabac_follows(levels) -> bool:
    from deepshrink.coding import level_coder

    return not np.any(levels) or level_coder.is_dependent(levels)


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.1])
def test_dependent_levels_follow_the_state_machine_and_keep_pruned_zeros(lam):
    w = pruned_layer(seed=6).numpy().reshape(-1)
    step, j = dependent_1d(w, 30, lam, row_length=150)
    assert step > 0 and j.dtype == np.int64 and np.abs(j).max() <= 15
    assert cabac_follows(j) and np.all(j[w == 0] == 0)
    if lam == 0:  # distortion only: never farther than a step of the weight's own quantizer
        assert np.all(np.abs(w - j * step)[w != 0] <= 2 * step + 1e-9)


def test_the_dependent_rate_term_lowers_the_coded_size_monotonically():
    from deepshrink.coding import level_coder

    w = pruned_layer(seed=7).numpy().reshape(-1)
    sizes, errors = [], []
    for lam in (0.0, 0.03, 0.3, 3.0):
        step, j = dependent_1d(w, 30, lam, row_length=150, step=0.01, iters=1)
        sizes.append(len(level_coder.encode(j, 150, context_model=level_coder.DEPENDENT_CONTEXT_MODEL)[0]))
        errors.append(float(np.square(w - j * step).sum()))
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert all(a < b for a, b in zip(errors, errors[1:])), errors


def test_dependent_quantization_beats_the_uniform_grid_at_equal_error():
    # the same uniform grid, coded with and without the trellis: at about equal squared error the
    # dependent levels take fewer bytes (the point of trellis-coded quantization)
    from deepshrink.coding import level_coder

    w = pruned_layer(seed=8).numpy().reshape(-1)
    nz = w != 0

    def uniform(step):
        q = np.rint(w / step).astype(np.int64)
        return len(level_coder.encode(q, 150)[0]), float(np.square(w - q * step)[nz].mean())

    steps = 0.004 * 1.15 ** np.arange(12)
    grid = sorted(uniform(s) for s in steps)
    for step in (0.006, 0.008):
        j_step, j = dependent_1d(w, 1000, 0.003, row_length=150, step=step, iters=2)
        size = len(level_coder.encode(j, 150, context_model=level_coder.DEPENDENT_CONTEXT_MODEL)[0])
        error = float(np.square(w - j * j_step)[nz].mean())
        sizes, errors = zip(*grid)
        at_equal_error = np.exp(np.interp(np.log(error), np.log(errors[::-1]), np.log(sizes[::-1])))
        assert size < 0.99 * at_equal_error


def test_dependent_quantize_weight_stores_a_grid_codebook_the_coder_follows():
    from deepshrink.codecs.cabac import decode_cabac, encode_levels
    from deepshrink.encode import encode_weight

    w = pruned_layer(seed=9)
    centroids, indices = quantize_weight(w, bits=5, method="dq", lam=0.01)
    step = float(centroids[1] - centroids[0])
    grid = np.rint(centroids.numpy() / step).astype(int)  # every multiple of the step between the extremes
    assert np.array_equal(grid, [j for j in range(grid[0], grid[-1] + 1) if j != 0])
    assert np.allclose(centroids.numpy(), grid * step, rtol=1e-5)
    assert centroids.numel() <= 30 and (indices[w == 0] == 0).all()
    coded = encode_levels(indices.numpy(), centroids.numpy(), 5)
    assert coded.coder_params["context_model"] == "sig24-sign27-gt24k-eg0-warmup-dq8"
    quantized = torch.cat([torch.zeros(1), centroids])[indices.long()]
    assert np.array_equal(decode_cabac(coded), quantized.numpy())
    assert encode_weight(indices.numpy(), centroids.numpy(), 5, 5, coder="auto").stream == coded.stream


def test_a_reordered_grid_keeps_its_own_order_in_the_file():
    from deepshrink.codecs.cabac import decode_cabac, encode_levels

    w = pruned_layer(seed=10)
    centroids, indices = quantize_weight(w, bits=5, method="dq", lam=0.01)
    n = int((centroids < 0).sum())
    moved = centroids.clone()
    moved[n - 3], moved[n - 2] = moved[n - 2].item(), moved[n - 3].item()  # levels -3 and -2 trained past each other
    coded = encode_levels(indices.numpy(), moved.numpy(), 5)
    assert coded.coder_params["context_model"] == "sig24-sign27-gt24k-eg0-warmup-dq8"
    assert coded.num_negative == n and np.array_equal(coded.codebook, moved.numpy())  # index order, unsorted
    expected = torch.cat([torch.zeros(1), moved])[indices.long()].numpy()
    assert np.array_equal(decode_cabac(coded), expected)
    # the split is searched near the count of negative values only: with every value made positive
    # (15 negative-born levels, 0 negative values) no split is tried that fits, and the plain model codes it
    positive = moved.abs()
    plain = encode_levels(indices.numpy(), positive.numpy(), 5)
    assert plain.coder_params["context_model"] == "sig24-sign27-gt12k-eg0-warmup"
    assert np.array_equal(decode_cabac(plain), torch.cat([torch.zeros(1), positive])[indices.long()].numpy())


def test_dependent_quantization_rejects_bad_settings():
    w = pruned_layer(seed=0).numpy().reshape(-1)
    for kwargs, match in [({"num_levels": 1}, "num_levels"), ({"lam": -1.0}, "lam"), ({"row_length": 0}, "row_length"),
                          ({"step": 0.0}, "step"), ({"step": float("nan")}, "step"), ({"iters": 0}, "iters"),
                          ({"weights": np.ones(3)}, "weights")]:
        with pytest.raises(ConfigError, match=match):
            dependent_1d(w, **{"num_levels": 30, "lam": 0.01, **kwargs})
    assert dependent_1d(np.zeros(10), 30, 0.1) == (1.0, pytest.approx(np.zeros(10)))


def test_weights_sent_to_the_zero_level_are_pruned_and_stay_zero_through_training():
    model, masks = masked_net(sparsity=0.3)
    before = {f: (getattr(model, f.split(".")[0]).weight != 0).clone() for f in masks}
    info = quantize_model(model, QuantizeConfig(bits=4, method="ecsq", lam=0.3))
    from deepshrink.parametrizations import masks as current_masks

    zeroed = 0
    for fqn, mask in current_masks(model).items():
        assert torch.equal(mask, shared(model, fqn.split(".")[0]).indices != 0)
        assert not (mask & ~before[fqn]).any()  # pruned weights stay pruned
        assert info[fqn]["zeroed"] == int((before[fqn] & ~mask).sum())
        assert info[fqn]["nonzero"] == int(mask.sum())
        zeroed += info[fqn]["zeroed"]
    assert zeroed > 0
    kept = current_masks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    train_steps(model, torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3), steps=4)
    for fqn, mask in kept.items():
        w = getattr(model, fqn.split(".")[0]).weight
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])) and (w[mask] != 0).all()


def test_ecsq_at_lambda_zero_quantizes_a_model_as_kmeans_does():
    a, _ = masked_net(seed=1)
    b, _ = masked_net(seed=1)
    quantize_model(a, QuantizeConfig(bits=3))
    quantize_model(b, QuantizeConfig(bits=3, method="ecsq", lam=0.0))
    for fqn, (c, i, _) in codebooks(a).items():
        c2, i2, _ = codebooks(b)[fqn]
        assert torch.equal(c, c2) and torch.equal(i, i2)


def test_fisher_diagonal_and_hessian_weighted_quantization():
    from deepshrink.data import Batches, ImageData

    g = torch.Generator().manual_seed(0)
    data = ImageData(images=torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g),
                     labels=torch.randint(0, 10, (64,), generator=g), classes=tuple("0123456789"),
                     mean=(0.5,), std=(0.25,), name="synthetic")
    model, masks = masked_net()
    weights = {f: getattr(model, f.split(".")[0]).weight.detach().clone() for f in masks}
    fisher = fisher_diagonal(model, data, batches=3, batch_size=16)
    assert set(fisher) == set(masks)
    for fqn, h in fisher.items():
        assert h.shape == masks[fqn].shape and (h >= 0).all() and h.sum() > 0
        assert torch.equal(getattr(model, fqn.split(".")[0]).weight, weights[fqn])  # model unchanged
    assert model.fc1.parametrizations.weight.original.requires_grad and model.training
    # one batch: exactly the squared gradient of that batch's loss w.r.t. the effective weight
    x, y = next(iter(Batches(data, 16, shuffle=True, seed=0)))
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    grad = torch.autograd.grad(loss, model.fc2.parametrizations.weight.original)[0]
    model.train()
    one = fisher_diagonal(model, data, batches=1, batch_size=16)["fc2.weight"]
    torch.testing.assert_close(one[masks["fc2.weight"]], grad.square()[masks["fc2.weight"]])
    with pytest.raises(ConfigError, match="importance"):
        quantize_model(model, QuantizeConfig(bits=3, method="ecsq", lam=0.01, hessian=True))
    with pytest.raises(ConfigError, match="hessian=False"):
        quantize_model(model, QuantizeConfig(bits=3, method="ecsq", lam=0.01), importance=fisher)
    info = quantize_model(model, QuantizeConfig(bits=3, method="ecsq", lam=0.01, hessian=True), importance=fisher)
    assert set(info) == set(masks)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "lloyd"}, "unknown quantization method 'lloyd'; valid: kmeans, ecsq, uniform, dq"),
    ({"method": "ecsq", "lam": -0.1}, "lam"),
    ({"method": "uniform", "lam": float("inf")}, "lam"),
    ({"method": "ecsq", "lam": "0.1"}, "lam"),
    ({"lam": 0.1}, "method 'kmeans' has no rate term"),
    ({"hessian": True}, "method 'kmeans' has no rate term"),
    ({"method": "ecsq", "hessian": "yes"}, "hessian"),
])
def test_rate_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizeConfig(**kwargs)


def test_rate_config_round_trips_through_json():
    config = QuantizeConfig(bits=5, method=QuantizeMethod.UNIFORM, lam=0.02)
    assert config.method == "uniform" and config.lam == 0.02
    assert QuantizeConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config


# ---------------------------------------------------------------------------------------------------
# a centroid exactly at zero
# ---------------------------------------------------------------------------------------------------


def test_a_centroid_exactly_at_zero_is_folded_into_index_0():
    # linear init -6, -2, 2, 6; Lloyd moves -0.5 next to 0.5, whose cluster then has mean exactly 0.0
    weight = torch.tensor([[-6.0, -5.5, -3.0, -2.5], [-0.5, 0.5, 5.5, 6.0]])
    centroids, indices = quantize_weight(weight, bits=2)
    assert centroids.tolist() == [-5.75, -2.75, 5.75]  # three centroids: the zero one is gone
    assert indices.tolist() == [[1, 1, 2, 2], [0, 0, 3, 3]]  # its weights are pruned (index 0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    quantize_model(model, QuantizeConfig(bits=2))
    assert masks(model)["0.weight"].tolist() == [[True] * 4, [False, False, True, True]]
    assert sparsity(model) == 0.25  # masks and sparsity agree


def test_a_centroid_trained_onto_zero_is_pruned_in_masks_and_in_the_file(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]))
    quantize_model(model, QuantizeConfig(bits=2))
    shared = model[0].parametrizations.weight[0]
    with torch.no_grad():
        shared.centroids[0] = 0.0  # as if centroid training had driven it there
    assert masks(model)["0.weight"].tolist() == [[False, True, True, True]] * 2
    report = compress_model(model, tmp_path / "m.dsz")
    row = next(r for r in report.rows if r["name"] == "0.weight")
    assert row["nonzero"] == 6 and row["bits"] == 2
    assert torch.equal(load(tmp_path / "m.dsz")["0.weight"], model[0].weight.detach())


def test_a_dependently_quantized_model_trains_its_grid_and_round_trips_through_the_file(tmp_path):
    from deepshrink.encode import EncodeConfig
    from deepshrink.format import read_header

    model, _ = masked_net(seed=2)
    quantize_model(model, QuantizeConfig(bits=4, method="dq", lam=0.01))
    before = {fqn: c.clone() for fqn, (c, _, _) in codebooks(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    for lr in (0.002, 0.05):
        # a small step moves the levels and keeps their order. A large one reorders them (fc1's cross
        # zero here), so a weight's rank is no longer its trellis level: the file keeps the grid's own
        # order instead, and the dependent model still applies
        train_steps(model, torch.optim.SGD(params, lr=lr, momentum=0.9), steps=4)
        compress_model(model, tmp_path / "m.dsz", EncodeConfig(coder="cabac"))
        entries = {fqn: entry for fqn, entry in read_header(tmp_path / "m.dsz")["tensors"].items()
                   if "coder_params" in entry}
        assert {e["coder_params"]["context_model"] for e in entries.values()} == {"sig24-sign27-gt24k-eg0-warmup-dq8"}
        assert all(not torch.equal(c, before[fqn]) for fqn, (c, _, _) in codebooks(model).items())
        reordered = [fqn for fqn, (c, _, _) in codebooks(model).items() if (torch.diff(c) <= 0).any()]
        assert bool(reordered) == (lr == 0.05)
        decoded = load(tmp_path / "m.dsz")
        for name in ("conv", "fc1", "fc2"):
            assert torch.equal(decoded[f"{name}.weight"], getattr(model, name).weight.detach())
