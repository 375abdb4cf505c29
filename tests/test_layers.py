import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.layers import resolve, select_weights


class Gate(nn.Module):
    """A custom layer that opts in through the compressible_weights() protocol."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 4))
        self.scale = nn.Parameter(torch.ones(4))

    def compressible_weights(self):
        return ["kernel"]


def make_model():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 4), Gate())


def test_selects_conv_linear_and_custom_layers_by_type():
    refs = select_weights(make_model())
    assert [(r.fqn, r.kind, r.layer_type) for r in refs] == [
        ("0.weight", "conv", "Conv2d"),
        ("3.weight", "fc", "Linear"),
        ("4.kernel", "custom", "Gate"),
    ]


def test_include_exclude_and_kinds():
    model = make_model()
    assert [r.fqn for r in select_weights(model, kinds=("fc",))] == ["3.weight"]
    assert [r.fqn for r in select_weights(model, include=["0.*", "3.*"], exclude=["3.*"])] == ["0.weight"]


def test_pattern_matching_nothing_is_an_error_that_lists_the_weights():
    with pytest.raises(ConfigError, match=r"'nope\.\*' matches no compressible weight.*0\.weight"):
        select_weights(make_model(), include=["nope.*"])
    with pytest.raises(ConfigError, match="unknown weight kind"):
        select_weights(make_model(), kinds=("lstm",))


def test_resolve_names_the_missing_part():
    model = make_model()
    module, name = resolve(model, "3.weight")
    assert module is model[3] and name == "weight"
    with pytest.raises(ConfigError, match="no module '9'"):
        resolve(model, "9.weight")
    with pytest.raises(ConfigError, match="no tensor 'bogus'"):
        resolve(model, "3.bogus")
