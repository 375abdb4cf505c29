"""Which weights of a model get compressed: chosen by layer type and name pattern, never by fixed names.

A weight is addressed by its fully qualified name (FQN) in ``model.state_dict()`` terms, e.g.
``"layer1.0.conv1.weight"``. Custom layers opt in by defining ``compressible_weights()`` that returns
the names of their own parameters to compress (e.g. ``["weight"]``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError

#: Layer types compressed by default, and the kind the paper's per-type settings refer to.
LAYER_KINDS: dict[type[nn.Module], str] = {
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.Linear: "fc",
}


@dataclass(frozen=True)
class WeightRef:
    """One compressible weight: where it lives and what kind of layer owns it."""

    fqn: str  # e.g. "features.0.weight"
    module_name: str  # e.g. "features.0"
    param_name: str  # e.g. "weight"
    kind: str  # "conv", "fc" or "custom"
    layer_type: str  # class name of the owning module, e.g. "Conv2d"


def _kind_of(module: nn.Module) -> str | None:
    for cls, kind in LAYER_KINDS.items():
        if isinstance(module, cls):
            return kind
    return "custom" if callable(getattr(module, "compressible_weights", None)) else None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_weights(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    kinds: Sequence[str] = ("conv", "fc", "custom"),
) -> list[WeightRef]:
    """Return the model's compressible weights in module order.

    Args:
        model: any ``nn.Module``.
        include: glob patterns on the weight FQN (``"layer1.*"``); None selects every supported layer.
        exclude: glob patterns removed after ``include``.
        kinds: layer kinds to consider ("conv", "fc", "custom").

    Raises:
        ConfigError: a pattern matches nothing, or a kind is unknown.
    """
    as_kinds(kinds)
    refs = []
    for module_name, module in model.named_modules():
        kind = _kind_of(module)
        if kind is None or kind not in kinds:
            continue
        names = list(module.compressible_weights()) if kind == "custom" else ["weight"]
        # parametrize swaps the class for a generated "Parametrized<Name>": report the user's name
        layer_type = type(module).__name__.removeprefix("Parametrized")
        for param_name in names:
            fqn = f"{module_name}.{param_name}" if module_name else param_name
            refs.append(WeightRef(fqn, module_name, param_name, kind, layer_type))
    for patterns, label in ((include or (), "include"), (exclude, "exclude")):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(r.fqn, p) for r in refs):
                valid = ", ".join(r.fqn for r in refs) or "(none)"
                raise ConfigError(f"{label} pattern {p!r} matches no compressible weight; weights: {valid}")
    if include is not None:
        refs = [r for r in refs if _matches(r.fqn, include)]
    return [r for r in refs if not _matches(r.fqn, exclude)]


def as_patterns(value, what: str) -> tuple[str, ...]:
    """Normalise a config's glob list (a str, list or tuple of str; YAML gives lists) to a tuple."""
    if isinstance(value, str):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ConfigError(f"{what} must be a sequence of strings, got {value!r}") from None
    if not all(isinstance(v, str) for v in out):
        raise ConfigError(f"{what} must be a sequence of strings, got {value!r}")
    return out


def resolve(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    """Split ``"a.b.weight"`` into (module ``a.b``, ``"weight"``), with a clear error if absent."""
    module_name, _, param_name = fqn.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise ConfigError(f"model has no module {module_name!r} (from weight {fqn!r})") from None
    if not hasattr(module, param_name):
        raise ConfigError(f"module {module_name!r} has no tensor {param_name!r}")
    return module, param_name


def as_kinds(value) -> tuple[str, ...]:
    """A config's layer kinds as a tuple, each one of "conv", "fc", "custom" (checked when the config is made)."""
    kinds = as_patterns(value, "kinds")
    unknown = set(kinds) - {"conv", "fc", "custom"}
    if unknown:
        raise ConfigError(f"unknown layer kind(s) {sorted(unknown)}; valid: conv, fc, custom")
    return kinds
