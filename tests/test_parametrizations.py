"""Compression state (deepshrink.parametrizations): quantization-aware retraining by reassignment."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepshrink.checkpoint import load_checkpoint, save_checkpoint
from deepshrink.parametrizations import Reassigned, SharedWeights, cheapest_level_bounds, parametrizations_of, reassigning
from deepshrink.errors import ConfigError
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model
from deepshrink.train import TrainConfig, evaluate, train

from test_train import FAST, one_thread, quadrant_data, tiny_mlp  # noqa: F401  (one_thread: autouse fixture)

finite = st.floats(-4, 4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(levels=st.lists(finite, min_size=1, max_size=12),
       penalties=st.lists(st.one_of(st.floats(0, 3, width=32), st.just(math.inf)), min_size=12, max_size=12),
       weights=st.lists(st.floats(-6, 6, allow_nan=False, width=32), min_size=1, max_size=50))
def test_the_cheapest_level_bounds_give_the_exhaustive_argmin(levels, penalties, weights):
    levels = torch.tensor(sorted(levels))
    penalties = torch.tensor(penalties[:levels.numel()])
    if torch.isinf(penalties).all():
        penalties[0] = 0.0
    w = torch.tensor(weights)
    bounds, winners = cheapest_level_bounds(levels, penalties)
    chosen = winners[torch.bucketize(w, bounds)]
    cost = (w[:, None].double() - levels[None].double()).square() + penalties[None].double()
    assert torch.all(cost[torch.arange(w.numel()), chosen] <= cost.min(1).values + 1e-9)


def quantized_mlp(bits: int = 2, lam: float = 0.0, method: str = "kmeans", q: float = 50) -> nn.Module:
    model = tiny_mlp()
    train(model, quadrant_data(), TrainConfig(epochs=3, batch_size=16, lr=0.05, **FAST))
    prune_model(model, PruneConfig(method="percentile", q=q))
    quantize_model(model, QuantizeConfig(bits=bits, method=method, lam=lam))
    return model


def shared(model: nn.Module) -> SharedWeights:
    return model.fc1.parametrizations.weight[0]


def test_entering_and_leaving_at_lambda_0_keeps_a_k_means_assignment():
    model = quantized_mlp()
    before = shared(model)
    centroids, indices = before.centroids.detach().clone(), before.indices.clone()
    with reassigning(model, 0.0) as layers:
        assert layers == 2
        assert isinstance(model.fc1.parametrizations.weight[0], Reassigned)
        assert model.fc1.parametrizations.weight.original.requires_grad
    after = shared(model)
    assert after is not before and not model.fc1.parametrizations.weight.original.requires_grad
    assert torch.equal(after.centroids.detach(), centroids) and torch.equal(after.indices, indices)


def test_retraining_moves_weights_between_fixed_levels_and_keeps_pruned_weights_zero():
    model = quantized_mlp(bits=2)
    data = quadrant_data()
    pruned = shared(model).indices == 0
    centroids, indices = shared(model).centroids.detach().clone(), shared(model).indices.clone()
    loss_before = evaluate(model, data)["loss"]
    train(model, data, TrainConfig(epochs=4, batch_size=16, lr=0.05, weight_decay=0, reassign_lam=0.0, **FAST))
    after = shared(model)
    assert set(after.centroids.tolist()) <= set(centroids.tolist())  # the levels never moved
    assert not torch.equal(after.indices, indices)  # but weights crossed to other levels
    assert torch.all(after.indices[pruned] == 0)
    assert torch.all(after.indices[~pruned] != 0)  # lambda 0 offers no zero level to kept weights
    assert evaluate(model, data)["loss"] < loss_before
    assert torch.equal(model.fc1.weight, after.codebook()[after.indices.long()].detach())


def test_a_rate_weight_sends_weights_to_zero_and_drops_levels_nobody_uses():
    model = quantized_mlp(bits=3)
    nonzero = int((shared(model).indices != 0).sum())
    with reassigning(model, 50.0):
        model(quadrant_data().images[:4].float())  # one training-mode step's counts: the rare levels cost more
    after = shared(model)
    assert int((after.indices != 0).sum()) < nonzero
    assert torch.all(torch.bincount(after.indices.long().reshape(-1), minlength=after.centroids.numel() + 1)[1:] > 0)


def test_an_error_inside_leaves_the_model_quantized_and_a_checkpoint_loads(tmp_path):
    model = quantized_mlp()
    with pytest.raises(RuntimeError, match="inside"):
        with reassigning(model, 0.01):
            raise RuntimeError("inside")
    assert [type(p) for p in parametrizations_of(model.fc1, "weight")] == [SharedWeights]
    path = save_checkpoint(tmp_path / "q.pt", model, {"arch": "mlp", "kwargs": {"num_classes": 4, "image_size": 4, "hidden": [32]}})
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)


def test_a_layer_pruned_to_nothing_passes_through():
    model = quantized_mlp(q=100)  # every weight pruned: no levels at all
    assert shared(model).centroids.numel() == 0
    with reassigning(model, 0.0):
        model(quadrant_data().images[:4].float())
    assert shared(model).centroids.numel() == 0 and not shared(model).indices.any()


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = Tied()
    quantize_model(model, QuantizeConfig(bits=2))
    with reassigning(model, 0.0):
        assert model.a.parametrizations.weight[0] is model.b.parametrizations.weight[0]
    assert model.a.parametrizations.weight[0] is model.b.parametrizations.weight[0]


@pytest.mark.parametrize("lam", [-1.0, math.nan, True, "0.1"])
def test_bad_lambdas_are_refused(lam):
    with pytest.raises(ConfigError, match="lambda"):
        with reassigning(quantized_mlp(), lam):
            pass
    with pytest.raises(ConfigError, match="reassign_lam"):
        TrainConfig(reassign_lam=lam)


def test_a_model_without_quantized_weights_is_refused():
    with pytest.raises(ConfigError, match="quantize it first"):
        train(tiny_mlp(), quadrant_data(), TrainConfig(epochs=1, reassign_lam=0.0, **FAST))
