"""Stage 1: mask rules on plain tensors, attaching masks to models, and retraining in a plain torch loop."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink import checkpoint
from deepshrink.parametrizations import Masked, SharedWeights, masks, restore_compression, strip
from deepshrink.errors import ConfigError
from deepshrink.prune import (
    PruneConfig,
    PruneMethod,
    apply_mask,
    global_masks,
    percentile_mask,
    prune_model,
    sparsity,
    std_mask,
    zero_pruned_,
)


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # 0: conv 4x1x3x3 (36 weights), 3: fc 10x64 (640), 5: fc 3x10 (30); input (B, 1, 6, 6)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 3))


def pruned_count(mask: torch.Tensor) -> int:
    return int((~mask).sum())


# ---------------------------------------------------------------- functional core


@pytest.mark.parametrize("shape", [(7,), (13, 5), (4, 3, 3, 3), (1000,)])
@pytest.mark.parametrize("q", [0.0, 1.0, 12.5, 33.3, 50.0, 90.0, 99.9])
def test_percentile_prunes_exact_count(shape, q):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    mask = percentile_mask(w, q)
    n = w.numel()
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert pruned_count(mask) == round(q / 100 * n)
    assert abs(pruned_count(mask) / n - q / 100) <= 1 / n
    if 0 < pruned_count(mask) < n:  # every pruned magnitude <= every kept magnitude
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_percentile_ties_break_by_index():
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, 2.0])
    mask = percentile_mask(w, 50)  # 3 pruned: 0.5, then the first two of the tied 1.0s
    assert mask.tolist() == [False, False, True, True, False, True]


def test_percentile_with_prev_mask_counts_towards_target():
    w = torch.randn(200, generator=torch.Generator().manual_seed(2))
    prev = percentile_mask(w, 30)
    mask = percentile_mask(w * prev, 50, prev)
    assert pruned_count(mask) == 100
    assert not (mask & ~prev).any()  # nothing pruned comes back
    # already sparser than asked: nothing more is pruned, nothing is revived
    assert torch.equal(percentile_mask(w, 10, prev), prev)


def test_percentile_prev_mask_can_keep_large_pruned_entries_pruned():
    w = torch.tensor([5.0, 4.0, 0.1, 0.2, 0.3, 0.4])
    prev = torch.tensor([False, True, True, True, True, True])  # the largest weight already pruned
    mask = percentile_mask(w, 50, prev)
    assert mask.tolist() == [False, True, False, False, True, True]


def test_percentile_scores_rank_instead_of_weight():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert percentile_mask(w, 50, scores=scores).tolist() == [True, True, False, False]


@pytest.mark.parametrize("s", [0.0, 0.25, 0.7, 1.5, 3.0])
def test_std_rule_matches_numpy(s):
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(3))
    a = w.numpy()
    expected = np.abs(a) >= s * np.std(a)
    assert np.array_equal(std_mask(w, s).numpy(), expected)


def test_std_with_prev_mask_uses_std_of_kept_entries():
    w = torch.randn(500, generator=torch.Generator().manual_seed(4))
    prev = std_mask(w, 0.5)
    mask = std_mask(w, 0.5, prev)
    a, p = w.numpy(), prev.numpy()
    expected = (np.abs(a) >= 0.5 * np.std(a[p])) & p
    assert np.array_equal(mask.numpy(), expected)
    assert pruned_count(mask) > pruned_count(prev)  # same s again prunes further: iterative pruning
    assert not std_mask(w, 0.5, torch.zeros_like(prev)).any()  # nothing alive: nothing kept


def test_global_prunes_exact_total_with_ties_and_mixed_dtypes():
    g = torch.Generator().manual_seed(5)
    weights = {
        "a": torch.randn(40, 30, generator=g),
        "b": torch.randint(-3, 4, (77,), generator=g).float(),  # many exact ties
        "c": (torch.randn(300, generator=g) * 0.1).double(),
        "d": torch.randn(50, generator=g).half(),
    }
    total = sum(w.numel() for w in weights.values())
    for q in (0.0, 17.0, 50.0, 83.3, 100.0):
        result = global_masks(weights, q)
        assert list(result) == list(weights)
        pruned = sum(pruned_count(m) for m in result.values())
        assert pruned == round(q / 100 * total)
        kept = torch.cat([w.double().abs()[result[k]].reshape(-1) for k, w in weights.items()])
        cut = torch.cat([w.double().abs()[~result[k]].reshape(-1) for k, w in weights.items()])
        if kept.numel() and cut.numel():
            assert cut.max() <= kept.min()


def test_global_matches_sort_reference():
    g = torch.Generator().manual_seed(6)
    weights = {"x": torch.randn(123, generator=g), "y": torch.randn(17, 9, generator=g) * 3}
    flat = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    k = round(0.6 * flat.numel())
    order = torch.sort(flat, stable=True).indices[:k]
    reference = torch.ones_like(flat, dtype=torch.bool)
    reference[order] = False
    result = global_masks(weights, 60)
    assert torch.equal(torch.cat([m.reshape(-1) for m in result.values()]), reference)


def test_global_with_prev_masks_composes():
    g = torch.Generator().manual_seed(7)
    weights = {"a": torch.randn(100, generator=g), "b": torch.randn(60, generator=g)}
    first = global_masks(weights, 25)
    second = global_masks(weights, 50, first)
    assert sum(pruned_count(m) for m in second.values()) == 80
    assert all(not (second[k] & ~first[k]).any() for k in weights)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), "1"])
def test_std_rejects_bad_s(bad):
    with pytest.raises(ConfigError, match="s must be"):
        std_mask(torch.randn(5), bad)


@pytest.mark.parametrize("bad", [-1, 100.5, float("nan")])
def test_percentile_rejects_bad_q(bad):
    with pytest.raises(ConfigError, match=r"q must be .*" + str(bad).replace(".", r"\.")):
        percentile_mask(torch.randn(5), bad)


def test_q_100_prunes_everything_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="deepshrink.prune"):
        mask = percentile_mask(torch.randn(9), 100)
    assert not mask.any()
    assert "q=100" in caplog.text


def test_core_rejects_mismatched_masks_and_nan():
    w = torch.randn(4, 3)
    with pytest.raises(ConfigError, match=r"prev_mask.*\(3, 4\).*\(4, 3\)"):
        std_mask(w, 1.0, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="dtype torch.bool"):
        percentile_mask(w, 10, torch.ones(4, 3))
    with pytest.raises(ConfigError, match="NaN"):
        percentile_mask(torch.tensor([1.0, float("nan")]), 50)
    with pytest.raises(ConfigError, match="not among the weights"):
        global_masks({"a": w}, 10, {"b": torch.ones(4, 3, dtype=torch.bool)})


# ---------------------------------------------------------------- config


def test_config_validates_and_round_trips_json():
    config = PruneConfig(method=PruneMethod.GLOBAL, q=80, include=["3.*", "5.*"], q_by_pattern=[["5.*", 40]])
    assert config.method == "global" and type(config.method) is str
    assert config.include == ("3.*", "5.*") and config.q_by_pattern == (("5.*", 40.0),)
    assert json.loads(json.dumps(dataclasses.asdict(config)))["method"] == "global"
    with pytest.raises(ConfigError, match="unknown prune method 'l1'; valid: std, percentile, global"):
        PruneConfig(method="l1")
    with pytest.raises(ConfigError, match="q must be .*150"):
        PruneConfig(q=150)
    with pytest.raises(ConfigError, match="q_by_pattern entry 'fc.*'.*-5"):
        PruneConfig(q_by_pattern=(("fc.*", -5),))
    with pytest.raises(ConfigError, match="s_by_pattern applies to method 'std'"):
        PruneConfig(method="percentile", s_by_pattern=(("*", 1.0),))


# ---------------------------------------------------------------- model layer


def test_prune_model_percentile_per_layer_with_overrides():
    model = tiny_model()
    config = PruneConfig(method="percentile", q=75, q_by_pattern=(("5.*", 20), ("*", 90)))  # first match wins
    result = prune_model(model, config)
    assert list(result) == ["0.weight", "3.weight", "5.weight"]
    expected = {"0.weight": 0.90, "3.weight": 0.90, "5.weight": 0.20}
    for fqn, mask in result.items():
        module = model.get_submodule(fqn.rpartition(".")[0])
        assert isinstance(module.parametrizations.weight[0], Masked)
        assert pruned_count(mask) == round(expected[fqn] * mask.numel())
        assert torch.equal(module.weight == 0, ~mask)  # effective weight is zero exactly where pruned


def test_prune_model_std_matches_core_on_each_layer():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    result = prune_model(model, PruneConfig(method="std", s=0.8, s_by_pattern=(("0.*", 0.3),)))
    for fqn, mask in result.items():
        assert torch.equal(mask, std_mask(before[fqn], 0.3 if fqn == "0.weight" else 0.8))


def test_prune_model_global_exact_and_overrides_local():
    model = tiny_model()
    result = prune_model(model, PruneConfig(method="global", q=70, q_by_pattern=(("0.*", 10),)))
    assert pruned_count(result["0.weight"]) == round(0.10 * 36)
    shared_total = 640 + 30
    assert pruned_count(result["3.weight"]) + pruned_count(result["5.weight"]) == round(0.7 * shared_total)


def test_prune_model_composes_with_existing_masks():
    model = tiny_model()
    first = prune_model(model, PruneConfig(q=50))
    second = prune_model(model, PruneConfig(q=80))
    for fqn in first:
        assert pruned_count(second[fqn]) == round(0.8 * second[fqn].numel())
        assert not (second[fqn] & ~first[fqn]).any()
        module = model.get_submodule(fqn.rpartition(".")[0])
        assert len(module.parametrizations.weight) == 1  # ANDed into the same Masked, not stacked


def test_prune_model_selection_by_patterns_and_kinds():
    model = tiny_model()
    assert list(prune_model(model, PruneConfig(include=("3.*", "5.*"), exclude=("5.*",)))) == ["3.weight"]
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[5])
    assert list(prune_model(tiny_model(), PruneConfig(kinds=("conv",)))) == ["0.weight"]
    with pytest.raises(ConfigError, match="include pattern 'fc.*' matches no compressible weight"):
        prune_model(tiny_model(), PruneConfig(include=("fc.*",)))
    with pytest.raises(ConfigError, match="q_by_pattern pattern '9.*' matches no selected weight"):
        prune_model(tiny_model(), PruneConfig(q_by_pattern=(("9.*", 10),)))


def test_prune_model_rejects_nan_weights_naming_layer_and_changes_nothing():
    model = tiny_model()
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"3\.weight: 1 of 640 weights are NaN/inf"):
        prune_model(model, PruneConfig(q=50))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_non_finite_values_at_pruned_positions_are_ignored():
    model = tiny_model()
    first = prune_model(model, PruneConfig(q=50, include=("3.*",)))["3.weight"]
    with torch.no_grad():
        original = model[3].parametrizations.weight.original
        original[~first] = float("nan")  # stale garbage where the mask hides it
    second = prune_model(model, PruneConfig(q=75, include=("3.*",)))["3.weight"]
    assert pruned_count(second) == 480 and not (second & ~first).any()
    assert std_mask(original.detach(), 1.0, first).shape == first.shape
    with pytest.raises(ConfigError, match="1 NaN/inf"):
        std_mask(torch.tensor([1.0, float("inf"), 2.0]), 1.0)


def test_prune_model_rejects_quantized_weight():
    model = tiny_model()
    w = model[5].weight.detach()
    indices = torch.randint(0, 5, w.shape, dtype=torch.uint8)
    parametrize.register_parametrization(model[5], "weight", SharedWeights(torch.linspace(-1, 1, 4), indices, 2))
    with pytest.raises(ConfigError, match=r"5\.weight is quantized \(SharedWeights, 2 bits\)"):
        prune_model(model, PruneConfig())
    with pytest.raises(ConfigError, match=r"5\.weight is quantized"):
        apply_mask(model, "5.weight", torch.ones(w.shape, dtype=torch.bool))
    assert torch.equal(masks(model)["5.weight"], indices != 0)


def test_prune_model_uses_importance_scores():
    model = tiny_model()
    scores = torch.arange(30, dtype=torch.float32).reshape(3, 10)  # ranks by position, not by weight
    result = prune_model(model, PruneConfig(include=("5.*",), q=50), scores={"5.weight": scores})
    assert torch.equal(result["5.weight"], scores >= 15)


def test_apply_mask_ands_into_existing_and_copies_input():
    model = tiny_model()
    a = torch.rand(3, 10, generator=torch.Generator().manual_seed(8)) > 0.3
    b = torch.rand(3, 10, generator=torch.Generator().manual_seed(9)) > 0.3
    apply_mask(model, "5.weight", a)
    a.fill_(False)  # the model holds its own copy
    apply_mask(model, "5.weight", b)
    a = torch.rand(3, 10, generator=torch.Generator().manual_seed(8)) > 0.3
    assert torch.equal(masks(model)["5.weight"], a & b)
    assert (model[5].weight[~(a & b)] == 0).all() and (model[5].weight[a & b] != 0).all()
    assert len(model[5].parametrizations.weight) == 1


def test_apply_mask_bad_input_leaves_model_unchanged():
    model = tiny_model()
    with pytest.raises(ConfigError, match=r"5\.weight: mask shape \(10, 3\) does not match weight shape \(3, 10\)"):
        apply_mask(model, "5.weight", torch.ones(10, 3, dtype=torch.bool))
    assert not parametrize.is_parametrized(model[5])

    first = torch.rand(3, 10, generator=torch.Generator().manual_seed(10)) > 0.5
    apply_mask(model, "5.weight", first)
    with pytest.raises(ConfigError, match=r"5\.weight: mask shape \(30,\)"):
        apply_mask(model, "5.weight", torch.zeros(30, dtype=torch.bool))
    with pytest.raises(ConfigError, match="mask must have dtype torch.bool, got torch.float32"):
        apply_mask(model, "5.weight", torch.zeros(3, 10))
    with pytest.raises(ConfigError, match="no module '7'"):
        apply_mask(model, "7.weight", first)
    assert torch.equal(masks(model)["5.weight"], first)


def test_prune_model_rolls_back_all_layers_when_attaching_fails(monkeypatch):
    import deepshrink.prune as prune_module

    model = tiny_model()
    apply_mask(model, "0.weight", torch.ones(4, 1, 3, 3, dtype=torch.bool))
    real = prune_module._apply_mask

    def failing(model_, fqn, mask):
        if fqn == "5.weight":
            raise RuntimeError("simulated failure")
        return real(model_, fqn, mask)

    monkeypatch.setattr(prune_module, "_apply_mask", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        prune_model(model, PruneConfig(q=60))
    assert masks(model)["0.weight"].all()  # the AND into the existing mask was undone
    assert not parametrize.is_parametrized(model[3])  # the new parametrization was removed


def test_masks_survive_state_dict_restore(tmp_path):
    model = tiny_model()
    result = prune_model(model, PruneConfig(q=60))
    path = checkpoint.save_checkpoint(tmp_path / "m.pt", model, {"arch": "none", "kwargs": {}})
    payload = checkpoint.read_checkpoint(path)
    fresh = tiny_model(seed=1)
    restore_compression(fresh, payload["compression"], payload["state_dict"])
    fresh.load_state_dict(payload["state_dict"])
    restored = masks(fresh)
    assert restored.keys() == result.keys()
    assert all(torch.equal(restored[k], result[k]) for k in result)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(fresh(x), model(x))


def test_masks_survive_checkpoint_round_trip(tmp_path):
    from deepshrink.models import build_model

    spec = {"arch": "mlp", "kwargs": {}}
    model = build_model(spec)
    result = prune_model(model, PruneConfig(method="std", s=0.6))
    path = checkpoint.save_checkpoint(tmp_path / "mlp.pt", model, spec)
    loaded, _ = checkpoint.load_checkpoint(path)
    restored = masks(loaded)
    assert restored.keys() == result.keys() and all(torch.equal(restored[k], result[k]) for k in result)
    assert sparsity(loaded) == pytest.approx(sparsity(model)) and sparsity(loaded) > 0


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adam-wd"],
)
def test_pruned_weights_stay_zero_in_plain_training_loop(make_optimizer):
    model = tiny_model()
    # optimizer created BEFORE pruning: parametrize keeps the same Parameter object as `original`
    optimizer = make_optimizer(model.parameters())
    result = prune_model(model, PruneConfig(q=70))
    kept_before = {f: model.get_submodule(f.rpartition(".")[0]).weight.detach().clone() for f in result}
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for fqn, mask in result.items():
        module = model.get_submodule(fqn.rpartition(".")[0])
        weight = module.weight
        assert (weight[~mask] == 0).all()
        assert not torch.equal(weight[mask], kept_before[fqn][mask])  # training did change kept weights
    # weight decay moved the stored originals at pruned positions; zero_pruned_ tidies them and the state
    original = model[3].parametrizations.weight.original
    pruned = ~result["3.weight"]
    assert (original[pruned] != 0).any()
    out_before = model(x)
    zero_pruned_(model, optimizer)
    assert (original[pruned] == 0).all()
    for value in optimizer.state[original].values():
        if isinstance(value, torch.Tensor) and value.shape == original.shape:
            assert (value[pruned] == 0).all()
    assert torch.equal(model(x), out_before)


def test_strip_leaves_plain_weights_with_zeros():
    model = tiny_model()
    param = model[3].weight
    result = prune_model(model, PruneConfig(q=50))
    with torch.no_grad():
        model[3].parametrizations.weight.original.add_(1.0)  # pruned originals are non-zero now
    x = torch.randn(2, 1, 6, 6)
    expected = model(x)
    strip(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(model[3]) is nn.Linear
    assert model[3].weight is param  # same Parameter: optimizer references stay valid
    assert torch.equal(model[3].weight == 0, ~result["3.weight"])
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    assert torch.equal(model(x), expected)
    assert masks(model) == {}


def test_strip_restores_quantized_weight_trainability():
    model = tiny_model()
    indices = torch.randint(0, 3, (3, 10), dtype=torch.uint8)
    model[5].weight.requires_grad_(False)
    parametrize.register_parametrization(model[5], "weight", SharedWeights(torch.tensor([-0.5, 0.5]), indices, 1))
    strip(model)
    assert model[5].weight.requires_grad
    assert set(torch.unique(model[5].weight).tolist()) <= {-0.5, 0.0, 0.5}


def test_strip_refuses_foreign_parametrizations():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = tiny_model()
    apply_mask(model, "0.weight", torch.ones(4, 1, 3, 3, dtype=torch.bool))
    parametrize.register_parametrization(model[3], "weight", Double())
    with pytest.raises(ConfigError, match=r"3\.weight carries parametrizations deepshrink did not attach \(Double\)"):
        strip(model)
    assert parametrize.is_parametrized(model[0])  # nothing was stripped


def test_sparsity_counts_effective_zeros():
    model = tiny_model()
    assert sparsity(model) == 0.0
    prune_model(model, PruneConfig(q=40, include=("3.*",)))
    assert sparsity(model, include=("3.*",)) == pytest.approx(256 / 640)
    assert sparsity(model) == pytest.approx(256 / (36 + 640 + 30))
