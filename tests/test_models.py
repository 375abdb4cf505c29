"""Architectures, specs and foreign-weight loading (deepshrink.models)."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from deepshrink.errors import CheckpointError, ConfigError
from deepshrink.models import MODELS, PadShortcut, build_model, load_foreign_weights, model_spec, register_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
PRETRAINED = SHARED / "pretrained"
CIFAR_JPEG = SHARED / "datasets" / "cifar10-jpeg"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("lenet300", 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),  # 266,610 as in the paper
        ("lenet5", 20 * 25 + 20 + 50 * 20 * 25 + 50 + 800 * 500 + 500 + 500 * 10 + 10),  # 431,080
        ("mlp", 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10),
    ],
)
def test_parameter_counts_match_the_architectures(arch, expected):
    assert n_params(build_model(arch)) == expected


@pytest.mark.parametrize("arch, millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85)])
def test_cifar_resnet_sizes_match_the_resnet_paper(arch, millions):
    assert round(n_params(build_model(arch)) / 1e6, 2) == millions


@pytest.mark.parametrize(
    "spec, input_shape, classes",
    [
        ("mlp", (5, 1, 8, 8), 10),
        ("lenet300", (5, 1, 28, 28), 10),
        ("lenet5", (5, 1, 28, 28), 10),
        ("resnet20", (5, 3, 32, 32), 10),
        ({"arch": "resnet32", "kwargs": {"num_classes": 100, "in_channels": 1}}, (2, 1, 32, 32), 100),
        ({"arch": "lenet5", "kwargs": {"num_classes": 3, "in_channels": 3}}, (2, 3, 28, 28), 3),
        ({"arch": "mlp", "kwargs": {"hidden": [7], "image_size": 4, "num_classes": 2}}, (2, 1, 4, 4), 2),
    ],
)
def test_forward_gives_one_logit_row_per_image(spec, input_shape, classes):
    out = build_model(spec)(torch.randn(*input_shape))
    assert out.shape == (input_shape[0], classes)


def test_resnet_uses_option_a_shortcuts_without_extra_parameters():
    model = build_model("resnet20")
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16)(x)  # 16 -> 32 channels, stride 2
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_resnet_names_match_the_reference_implementation():
    names = set(build_model("resnet20").state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.bn2.bias",
                "layer3.2.conv2.weight", "linear.weight", "linear.bias"):
        assert key in names


def test_unknown_arch_lists_the_valid_names():
    with pytest.raises(ConfigError, match="resnet20") as info:
        build_model("resnet21")
    assert "resnet21" in str(info.value) and "lenet300" in str(info.value)


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"arch": "mlp", "factory": "x:y"}, "exactly one"),
        ({"kwargs": {}}, "exactly one"),
        ({"arch": "mlp", "kwargs": [1]}, "kwargs"),
        ({"arch": "mlp", "kwargs": {"depth": 3}}, "depth"),
        ("no_such_module_xyz:build", "cannot import"),
        ("torch.nn:NoSuchThing", "no attribute"),
        ("math:pi", "not callable"),
        ("builtins:dict", "expected a torch.nn.Module"),
        ("just_a_module:", "package.module:function"),
    ],
)
def test_bad_specs_raise_config_error_naming_the_problem(spec, words):
    with pytest.raises(ConfigError, match=words):
        build_model(spec, trust_factory=True)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"hidden": [1e6, 1e6]}, "1,000,076,000,010 parameter/buffer elements, over the limit of 2,147,483,648"),
        ({"hidden": ["x"]}, "ValueError"),
        ({"hidden": 5}, "TypeError"),
        ({"num_classes": 1e6}, "must be tuple of ints"),
        ({"num_classes": -3}, "negative dimension"),
    ],
)
def test_kwargs_from_a_file_fail_fast_with_one_config_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        build_model({"arch": "mlp", "kwargs": kwargs})


def test_model_bound_is_counted_without_allocating():
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ConfigError, match="over the limit of 1,000"):
        build_model("lenet300", max_elements=1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20  # lenet300 would take 1 MB of float32: built on the meta device only
    with pytest.raises(ConfigError, match="exceeds"):
        build_model({"arch": "mlp", "kwargs": {"hidden": [1] * 10_000}})  # a spec of 30 KB


def test_factory_specs_are_refused_unless_trusted(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "marker_module_for_models_test.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("os:system", "marker_module_for_models_test:build"):
        with pytest.raises(ConfigError, match="--trust-factory .* trust_factory=True"):
            build_model({"factory": target, "kwargs": {"command": f"touch {marker}"}})
    assert not marker.exists()


def test_factory_spec_builds_a_user_model(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_test.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(width=3):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, width))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = model_spec("user_models_for_test:tiny", width=5)
    assert spec == {"factory": "user_models_for_test:tiny", "kwargs": {"width": 5}}
    model = build_model(spec, trust_factory=True)
    assert model(torch.randn(2, 1, 2, 2)).shape == (2, 5)
    assert isinstance(build_model("user_models_for_test:tiny", trust_factory=True)[1], nn.Linear)


def test_model_spec_for_builtins_and_registry():
    assert model_spec("lenet5", num_classes=3) == {"arch": "lenet5", "kwargs": {"num_classes": 3}}

    @register_model("tiny_for_test")
    def tiny(num_classes=2):
        return nn.Linear(3, num_classes)

    try:
        assert isinstance(build_model("tiny_for_test"), nn.Linear)
        with pytest.raises(ConfigError, match="already registered"):
            register_model("tiny_for_test")(tiny)
    finally:
        MODELS.pop("tiny_for_test")


# ---------------------------------------------------------------- foreign weights


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module_prefix"])
def test_foreign_weights_load_from_common_layouts(tmp_path, wrap):
    source = build_model("lenet5")
    state = source.state_dict()
    payload = {
        "raw": state,
        "state_dict": {"state_dict": state, "epoch": 3, "best_acc": 0.99},
        "model": {"model": state},
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }[wrap]
    torch.save(payload, tmp_path / "w.pt")
    target = load_foreign_weights(build_model("lenet5"), tmp_path / "w.pt")
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value)


def test_foreign_weights_report_missing_unexpected_and_shape_mismatches(tmp_path):
    state = build_model("lenet5").state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["fc2.bias"]
    state["fc1.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as info:
        load_foreign_weights(build_model("lenet5"), tmp_path / "w.pt")
    message = str(info.value)
    assert "missing (1): fc2.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "fc1.weight: file (3, 3) vs model (500, 800)" in message


class _NotATensor:
    pass


def test_foreign_weights_refuse_pickled_objects(tmp_path):
    torch.save({"state_dict": build_model("mlp").state_dict(), "obj": _NotATensor()}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_foreign_weights(build_model("mlp"), tmp_path / "w.pt")


def test_foreign_weights_reject_missing_files_and_non_state_dicts(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_foreign_weights(build_model("mlp"), tmp_path / "absent.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        load_foreign_weights(build_model("mlp"), tmp_path / "w.pt")


@pytest.mark.parametrize("arch, file", [("resnet20", "resnet20-12fca82f.th"), ("resnet56", "resnet56-4bfd9763.th")])
def test_pretrained_cifar_resnets_load_strictly(arch, file):
    path = PRETRAINED / file
    if not path.is_file():
        pytest.skip(f"{path} absent (shared pretrained weights are only on the project's machines)")
    model = load_foreign_weights(build_model(arch), path)
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.layer1[0].conv1.weight, raw["module.layer1.0.conv1.weight"])
    assert torch.equal(model.linear.bias, raw["module.linear.bias"])


@pytest.mark.slow
def test_pretrained_resnet20_scores_81_percent_on_cifar10_jpeg():
    path = PRETRAINED / "resnet20-12fca82f.th"
    if not path.is_file() or not (CIFAR_JPEG / "test").is_dir():
        pytest.skip("shared ResNet-20 weights or cifar10-jpeg absent")
    from deepshrink.data import load_dataset
    from deepshrink.train import evaluate

    data = load_dataset("imagefolder", root=CIFAR_JPEG, split="test")
    # the reference model was trained with ImageNet normalisation, not this folder's statistics
    data = dataclasses.replace(data, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model = load_foreign_weights(build_model("resnet20"), path)
    result = evaluate(model, data)
    assert result["n"] == 10_000
    assert result["accuracy"] == pytest.approx(0.810, abs=0.003)  # datasets/README.md: 81.0% on this set
