"""Which weights of a model get compressed: chosen by what a tensor is, never by fixed names.

By default every floating-point parameter with at least 2 dimensions is compressible, whatever
module holds it (``min_dims``/``min_numel`` change the threshold). Each weight gets a *kind*, so
settings can differ per kind (the paper's conv 8 / fc 5 bits, generalised):

==============  ==========================================================================
kind            tensors
==============  ==========================================================================
``conv``        weights of Conv1d/2d/3d and ConvTranspose1d/2d/3d (grouped, depthwise, lazy)
``fc``          ``nn.Linear`` weights (and ``nn.Bilinear``, Hugging Face's GPT-2 ``Conv1D``)
``attention``   ``nn.MultiheadAttention``: ``in_proj_weight``, ``q/k/v_proj_weight``, ``bias_k/v``
                and ``out_proj.weight``. ``out_proj`` is an ``nn.Linear``, but it is one of the
                block's four projections, so one ``attention`` setting covers the whole block.
                Transformers that build attention from plain ``nn.Linear`` layers (Hugging Face
                BERT, for one) report those projections as ``fc``.
``rnn``         ``weight_ih_l*``, ``weight_hh_l*``, ``weight_hr_l*`` of RNN/LSTM/GRU (and cells)
``embedding``   ``nn.Embedding`` and ``nn.EmbeddingBag`` tables
``other``       any other parameter: a bare ``nn.Parameter`` (a learned position embedding),
                a third-party layer deepshrink does not know
``custom``      what a layer's ``compressible_weights()`` returns
==============  ==========================================================================

A weight is addressed by its fully qualified name (FQN) in ``model.state_dict()`` terms, e.g.
``"layer1.0.conv1.weight"``. A layer that defines ``compressible_weights()`` (returning names of its
own tensors, e.g. ``["kernel"]``) decides for itself: exactly those tensors are selected, whatever
their shape, and its other parameters are not.

A parameter reachable under several names (tied weights, e.g. an output projection sharing the
input embedding's tensor) is one weight: its ``fqn`` is the first name in module order and the others
are its ``aliases``. ``tie_parametrizations`` gives every alias the same parametrizations (the same
objects) as the first name, so masks and codebooks stay shared and the weight is stored once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize

from .errors import ConfigError

#: Every weight kind, in the order tables list them.
KINDS: tuple[str, ...] = ("conv", "fc", "attention", "rnn", "embedding", "other", "custom")

#: Layer types whose parameters have a kind of their own (checked in order; anything else is "other").
LAYER_KINDS: dict[type[nn.Module], str] = {
    NonDynamicallyQuantizableLinear: "attention",  # nn.MultiheadAttention.out_proj (before nn.Linear)
    nn.MultiheadAttention: "attention",
    nn.modules.conv._ConvNd: "conv",  # Conv1d/2d/3d, ConvTranspose1d/2d/3d, their lazy forms
    nn.Linear: "fc",
    nn.Bilinear: "fc",
    nn.RNNBase: "rnn",  # RNN, LSTM, GRU
    nn.RNNCellBase: "rnn",  # RNNCell, LSTMCell, GRUCell
    nn.Embedding: "embedding",
    nn.EmbeddingBag: "embedding",
}

#: Third-party layers known by their qualified class name (importing their packages is not needed).
LAYER_KINDS_BY_NAME: dict[str, str] = {
    "transformers.pytorch_utils.Conv1D": "fc",  # GPT-2's linear layers (a Linear with a transposed weight)
}

MIN_DIMS = 2  # default: matrices and up; biases, norms' scales and scalars stay raw


@dataclass(frozen=True)
class WeightRef:
    """One compressible weight: where it lives and what kind of tensor it is."""

    fqn: str  # e.g. "features.0.weight"
    module_name: str  # e.g. "features.0"
    param_name: str  # e.g. "weight"
    kind: str  # one of KINDS
    layer_type: str  # class name of the owning module, e.g. "Conv2d"
    aliases: tuple[str, ...] = ()  # other names of the same tensor (tied weights)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.fqn, *self.aliases)


def weight_kind(module: nn.Module, param_name: str) -> str:
    """The kind of ``module``'s tensor ``param_name`` (see the module docstring)."""
    if _hook_names(module) is not None:
        return "custom"
    for cls, kind in LAYER_KINDS.items():
        if isinstance(module, cls):
            return kind
    for cls in type(module).__mro__:
        kind = LAYER_KINDS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    return "other"


def _hook_names(module: nn.Module) -> list[str] | None:
    hook = getattr(module, "compressible_weights", None)
    return list(hook()) if callable(hook) else None


def _layer_type(module: nn.Module) -> str:
    # parametrize swaps the class for a generated "Parametrized<Name>": report the user's name
    return type(module).__name__.removeprefix("Parametrized")


def _join(module_name: str, name: str) -> str:
    return f"{module_name}.{name}" if module_name else name


def named_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Every parameter as (module name, module, tensor name, stored tensor), in module order.

    A parametrized tensor appears under its plain name with its stored ``original``; parametrize's
    own modules (``parametrizations``, ``Masked``, ``SharedWeights``) are skipped. A tensor tied to
    several names appears once per name.
    """
    internal: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in internal:
            continue
        if parametrize.is_parametrized(module):
            internal.update(id(m) for m in module.parametrizations.modules())
            for name, plist in module.parametrizations.items():
                if plist.is_tensor:
                    yield module_name, module, name, plist.original
        for name, p in module._parameters.items():
            if p is not None:
                yield module_name, module, name, p


def _matches(names: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _check_threshold(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def select_weights(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    kinds: Sequence[str] | None = None,
    *,
    min_dims: int = MIN_DIMS,
    min_numel: int = 1,
) -> list[WeightRef]:
    """Return the model's compressible weights in module order, each tensor once.

    Args:
        model: any ``nn.Module``.
        include: glob patterns on the weight FQN (``"layer1.*"``), matched against every name of a
            tied tensor; None selects every compressible weight.
        exclude: glob patterns removed after ``include``.
        kinds: weight kinds to consider (see ``KINDS``); None = all.
        min_dims: a floating parameter with at least this many dimensions is compressible.
        min_numel: ... and at least this many elements.

    Raises:
        ConfigError: a pattern matches nothing, a kind is unknown, a threshold is negative, or a
        layer's ``compressible_weights()`` names a tensor it does not have.
    """
    kinds = KINDS if kinds is None else as_kinds(kinds)
    _check_threshold(min_dims, "min_dims")
    _check_threshold(min_numel, "min_numel")
    found: dict[int, list] = {}  # id(tensor) -> [fqn, module name, module, tensor name, kind, aliases]
    for module_name, module, name, tensor in named_tensors(model):
        key = id(tensor)
        if key in found:
            found[key][5].append(_join(module_name, name))
            continue
        hooked = _hook_names(module)
        if hooked is not None:
            if name not in hooked:
                continue
        elif (not tensor.is_floating_point() or isinstance(tensor, nn.parameter.UninitializedParameter)
              or tensor.dim() < min_dims or tensor.numel() < min_numel):
            continue
        found[key] = [_join(module_name, name), module_name, module, name, weight_kind(module, name), []]
    for module_name, module in model.named_modules():  # hook names that are not parameters (buffers...)
        for name in _hook_names(module) or ():
            if not hasattr(module, name):
                raise ConfigError(f"{_layer_type(module)} {module_name!r}: compressible_weights() names "
                                  f"{name!r}, which the layer does not have")
            tensor = getattr(module, name)
            if isinstance(tensor, torch.Tensor) and id(tensor) not in found and not any(
                    f[2] is module and f[3] == name for f in found.values()):
                found[id(tensor)] = [_join(module_name, name), module_name, module, name, "custom", []]
    refs = [WeightRef(fqn, mname, pname, kind, _layer_type(module), tuple(aliases))
            for fqn, mname, module, pname, kind, aliases in found.values() if kind in kinds]
    for patterns, label in ((include or (), "include"), (exclude, "exclude")):
        for p in patterns:
            if not any(_matches(r.names, [p]) for r in refs):
                valid = ", ".join(r.fqn for r in refs) or "(none)"
                raise ConfigError(f"{label} pattern {p!r} matches no compressible weight; weights: {valid}")
    if include is not None:
        refs = [r for r in refs if _matches(r.names, include)]
    return [r for r in refs if not _matches(r.names, exclude)]


def kind_pairs(value, what: str, check) -> tuple[tuple[str, object], ...]:
    """Normalise ``{kind: value}`` or ``[(kind, value), ...]`` (YAML gives either) to checked pairs.

    ``check(value, label)`` validates and converts each value, as for ``config.pattern_values``.
    """
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must map weight kinds to values, got {value!r}") from None
    for kind, _ in pairs:
        if kind not in KINDS:
            raise ConfigError(f"{what}: unknown weight kind {kind!r}; valid: {', '.join(KINDS)}")
    return tuple((kind, check(v, f"{what} entry {kind!r}")) for kind, v in pairs)


def by_kind(kind: str, pairs: Sequence[tuple[str, object]]):
    """The value ``pairs`` give ``kind``, or None."""
    return next((v for k, v in pairs if k == kind), None)


# --- tied weights ---------------------------------------------------------------------------------


def tied_weights(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every parameter reachable under more than one name (any shape)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for module_name, _, name, tensor in named_tensors(model):
        fqn = _join(module_name, name)
        if id(tensor) in first:
            tied[fqn] = first[id(tensor)]
        else:
            first[id(tensor)] = fqn
    return tied


def tie_parametrizations(model: nn.Module) -> None:
    """Give every alias of a tied weight the parametrizations of its first name (the same objects).

    Masks and codebooks are then one set of tensors that both names use in their forward passes;
    pruning, quantizing or stripping the first name and calling this keeps the aliases in step.
    """
    for alias, fqn in tied_weights(model).items():
        module, name = resolve(model, fqn)
        alias_module, alias_name = resolve(model, alias)
        want = list(module.parametrizations[name]) if parametrize.is_parametrized(module, name) else []
        have = (list(alias_module.parametrizations[alias_name])
                if parametrize.is_parametrized(alias_module, alias_name) else [])
        if len(want) == len(have) and all(a is b for a, b in zip(want, have)):
            continue
        if have:  # the stored tensor is the shared one: dropping the alias's list changes no value
            parametrize.remove_parametrizations(alias_module, alias_name, leave_parametrized=False)
        for p in want:
            parametrize.register_parametrization(alias_module, alias_name, p, unsafe=True)


def retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each ``alias`` name the same ``nn.Parameter`` as its first name (after loading a file).

    Raises:
        ConfigError: a name is missing, is not a plain parameter, or the shapes differ.
    """
    for alias, fqn in tied.items():
        module, name = resolve(model, fqn)
        alias_module, alias_name = resolve(model, alias)
        target, current = getattr(module, name), getattr(alias_module, alias_name)
        if target is current:
            continue
        if not isinstance(target, nn.Parameter) or alias_name not in alias_module._parameters:
            raise ConfigError(f"cannot tie {alias!r} to {fqn!r}: both must be plain parameters")
        if target.shape != current.shape:
            raise ConfigError(f"cannot tie {alias!r} {tuple(current.shape)} to {fqn!r} {tuple(target.shape)}")
        setattr(alias_module, alias_name, target)


def place(model: nn.Module, name: str, tensor: torch.Tensor, assign: bool = False) -> None:
    """Put ``tensor`` at state-dict entry ``name`` of ``model``: copied into the tensor there (in place), or
    with ``assign`` made that tensor (in the entry's dtype; a parameter keeps ``requires_grad``): what
    ``load_state_dict`` does for one entry, through the owning module's own loading, so its hooks run.

    Raises:
        ConfigError: no module takes ``name``; RuntimeError: ``load_state_dict``'s, e.g. a shape mismatch.
    """
    prefix, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        owner = None
    if owner is not None:
        current = getattr(owner, attr, None)
        if assign and isinstance(current, torch.Tensor):
            tensor = tensor.to(current.dtype)
        if attr not in owner.load_state_dict({attr: tensor}, strict=False, assign=assign).unexpected_keys:
            return
    # a state dict whose keys are not module paths (hooks rename them): the whole model's loading finds it
    if name in model.load_state_dict({name: tensor}, strict=False, assign=assign).unexpected_keys:
        raise ConfigError(f"the model's state dict has no entry {name!r} to load into")


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
    # a parametrized tensor is a property that computes the whole weight: ask without reading it
    if not (parametrize.is_parametrized(module, param_name) or hasattr(module, param_name)):
        raise ConfigError(f"module {module_name!r} has no tensor {param_name!r}")
    return module, param_name


def as_kinds(value) -> tuple[str, ...]:
    """A config's weight kinds as a tuple, each one of ``KINDS`` (checked when the config is made)."""
    kinds = as_patterns(value, "kinds")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ConfigError(f"unknown weight kind(s) {sorted(unknown)}; valid: {', '.join(KINDS)}")
    return kinds
