"""Compression state: the parametrizations deepshrink attaches to weights, and everything that reads them.

A pruned weight carries ``Masked`` (a bool ``mask`` buffer); a quantized weight carries
``SharedWeights`` (trainable ``centroids`` and a fixed ``indices`` buffer, 0 = pruned). Both are
``torch.nn.utils.parametrize`` parametrizations, so they live in ``model.state_dict()``. This module
is their one home: the walk over parametrized weights, ``masks``, ``strip``, ``plain_state_dict``
(the stripped state dict, computed without touching the model) and ``compression_state`` /
``restore_compression`` (what a checkpoint records so that it loads with ``weights_only=True``).
Pruning, quantization, encoding and checkpoints import it; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import enum_value
from .errors import CheckpointError, ConfigError
from .layers import resolve, tie_parametrizations, weight_kind

# ---------------------------------------------------------------------------------------------------
# The parametrizations
# ---------------------------------------------------------------------------------------------------


class Masked(nn.Module):
    """Parametrization that zeroes the entries where ``mask`` is False."""

    kind = "masked"

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool, copy=True))  # never alias the caller's tensor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where, not multiply: exact zeros even when the original holds inf/nan
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "Masked":
        """Rebuild with placeholder tensors shaped like a saved state (values come from load_state_dict)."""
        return cls(torch.ones_like(tensors["mask"], dtype=torch.bool))


class GradientMode(str, Enum):
    """How the gradients of a centroid's member weights combine into the centroid's gradient.

    SUM: their sum (the paper's Eq. 3).
    AVG: their mean (the sum divided by the member count), so big clusters do not take bigger steps.
    """

    SUM = "sum"
    AVG = "avg"


def index_dtype(num_centroids: int) -> torch.dtype:
    """Smallest integer dtype that holds indices 0..num_centroids (0 = pruned)."""
    return torch.uint8 if num_centroids <= 255 else torch.int32


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (exact values, no arithmetic)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class SharedWeights(nn.Module):
    """Parametrization that replaces a weight by shared centroids gathered through fixed indices.

    Buffers/parameters (all in the module's state_dict):
        centroids: float Parameter of shape (K,), the shared non-zero values.
        indices: integer buffer shaped like the weight; 0 = pruned (zero), k = centroids[k-1].

    ``gradient`` ("sum" or "avg", see ``GradientMode``) is a plain attribute, not state.
    """

    kind = "shared"

    def __init__(self, centroids: torch.Tensor, indices: torch.Tensor, bits: int, gradient: str = "sum"):
        super().__init__()
        self.bits = int(bits)
        self.gradient = enum_value(GradientMode, gradient, "gradient mode")
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("indices", indices.to(index_dtype(centroids.numel())))

    def codebook(self) -> torch.Tensor:
        """(K+1,) tensor: 0.0 followed by the centroids."""
        return torch.cat([self.centroids.new_zeros(1), self.centroids])

    def member_counts(self) -> torch.Tensor:
        """(K,) number of weights assigned to each centroid."""
        counts = torch.bincount(self.indices.reshape(-1).long(), minlength=self.centroids.numel() + 1)
        return counts[1:self.centroids.numel() + 1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        centroids = self.centroids
        if self.gradient == GradientMode.AVG.value:
            # counts follow the indices buffer (e.g. after load_state_dict); identity on the values
            scale = 1.0 / self.member_counts().clamp_min(1).to(centroids.dtype)
            centroids = _ScaleGrad.apply(centroids, scale)
        # index_select's backward is a scatter-add: each centroid's grad is the SUM of its weights' grads
        codebook = torch.cat([centroids.new_zeros(1), centroids])
        flat = codebook.index_select(0, self.indices.reshape(-1).long())
        return flat.view(self.indices.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        extra = f", gradient={self.gradient}" if self.gradient != GradientMode.SUM.value else ""
        return f"bits={self.bits}, centroids={self.centroids.numel()}{extra}"

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], bits: int, gradient: str = "sum") -> "SharedWeights":
        """Rebuild with placeholder tensors shaped like a saved state (values come from load_state_dict)."""
        return cls(torch.zeros_like(tensors["centroids"]), torch.zeros_like(tensors["indices"]), bits, gradient)


def fold_zero_centroids(centroids: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the centroids that are exactly 0 and give their weights index 0 (pruned).

    A centroid can land on 0 (k-means on a symmetric cluster, or centroid training). Its weights are
    zeros all the same, but as non-zeros they would cost coded bits and ``masks()`` would disagree
    with ``sparsity()``: folding them into index 0 prunes them, with no change to any weight's value.

    Returns:
        (centroids without exact zeros, indices renumbered in the smallest index dtype).
    """
    zero = centroids.detach() == 0
    if not bool(zero.any()):
        return centroids, indices
    kept = ~zero
    renumber = torch.cat([kept.new_zeros(1, dtype=torch.long), torch.cumsum(kept.long(), 0) * kept.long()])
    folded = renumber.to(indices.device)[indices.long()]
    return centroids[kept], folded.to(index_dtype(int(kept.sum())))


#: Parametrization kinds deepshrink attaches, by the ``kind`` recorded in checkpoints.
PARAMETRIZATIONS: dict[str, type[nn.Module]] = {Masked.kind: Masked, SharedWeights.kind: SharedWeights}


# ---------------------------------------------------------------------------------------------------
# Reading a model's compression state
# ---------------------------------------------------------------------------------------------------


def parametrizations_of(module: nn.Module, name: str) -> list[nn.Module]:
    """The parametrizations on ``module.name`` in order of application ([] for a plain tensor)."""
    return list(module.parametrizations[name]) if parametrize.is_parametrized(module, name) else []


def shared_weights_of(module: nn.Module, name: str) -> SharedWeights | None:
    """The ``SharedWeights`` on ``module.name``, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, SharedWeights)), None)


def parametrized_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, list[nn.Module]]]:
    """Yield (fqn, module, tensor name, parametrization list) for every parametrized tensor."""
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                fqn = f"{module_name}.{name}" if module_name else name
                yield fqn, module, name, list(module.parametrizations[name])


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current keep-masks by FQN (copies). Quantized weights report their non-zero entries."""
    out: dict[str, torch.Tensor] = {}
    for fqn, _, _, plist in parametrized_tensors(model):
        for p in plist:
            if isinstance(p, Masked):
                m = p.mask.clone()
            elif isinstance(p, SharedWeights):  # a centroid trained onto 0 leaves its weights zero
                m = p.codebook().detach()[p.indices.long()] != 0
            else:
                continue
            out[fqn] = m if fqn not in out else out[fqn] & m
    return out


def strip(model: nn.Module) -> nn.Module:
    """Remove all deepshrink parametrizations, leaving plain weights that hold the effective values.

    Uses ``leave_parametrized=True``, so each weight stays the same ``Parameter`` object and optimizers
    holding it remain valid. Weights that were quantized get ``requires_grad=True`` back (quantizing
    froze the original). Returns ``model`` (modified in place).

    Raises:
        ConfigError: a tensor also carries a parametrization deepshrink did not attach (nothing is changed).
    """
    ours = tuple(PARAMETRIZATIONS.values())
    found = list(parametrized_tensors(model))
    for fqn, _, _, plist in found:
        foreign = [type(p).__name__ for p in plist if not isinstance(p, ours)]
        if foreign:
            raise ConfigError(f"{fqn} carries parametrizations deepshrink did not attach ({', '.join(foreign)}); "
                              "remove them first")
    for _, module, name, plist in found:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        weight = getattr(module, name)
        if any(isinstance(p, SharedWeights) for p in plist) and isinstance(weight, nn.Parameter):
            weight.requires_grad_(weight.is_floating_point())
    return model


def compression_state(model: nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Describe every parametrization deepshrink attached: ``{fqn: [{"kind": ..., **options}]}``."""
    state: dict[str, list[dict[str, Any]]] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            entries = []
            for p in plist:
                if type(p) not in PARAMETRIZATIONS.values():
                    raise CheckpointError(f"{module_name}.{param_name}: unknown parametrization {type(p).__name__}")
                entry: dict[str, Any] = {"kind": p.kind}
                if isinstance(p, SharedWeights):
                    entry["bits"] = p.bits
                    if p.gradient != "sum":
                        entry["gradient"] = p.gradient
                entries.append(entry)
            state[f"{module_name}.{param_name}" if module_name else param_name] = entries
    return state


def restore_compression(
    model: nn.Module, compression: dict[str, list[dict[str, Any]]], state_dict: dict[str, torch.Tensor]
) -> None:
    """Attach placeholder parametrizations so that ``model.load_state_dict(state_dict)`` fits."""
    for fqn, entries in compression.items():
        module, param_name = resolve(model, fqn)
        prefix = f"{fqn.rpartition('.')[0]}.parametrizations.{param_name}".lstrip(".")
        for i, entry in enumerate(entries):
            cls = PARAMETRIZATIONS.get(entry.get("kind"))
            if cls is None:
                raise CheckpointError(f"{fqn}: unknown compression kind {entry.get('kind')!r}")
            key = f"{prefix}.{i}."
            tensors = {k[len(key):]: v for k, v in state_dict.items() if k.startswith(key)}
            options = {k: v for k, v in entry.items() if k != "kind"}
            try:
                p = cls.from_state(tensors, **options)
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"{fqn}: saved {entry['kind']} state is incomplete ({e})") from None
            parametrize.register_parametrization(module, param_name, p, unsafe=True)
    tie_parametrizations(model)  # tied weights: one mask/codebook object under every name


def plain_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[SharedWeights, str]]]:
    """The state dict ``strip(model)`` would give, computed without touching the model.

    Returns:
        (state, shared): ``state`` maps plain names ("fc1.weight") to detached tensors, parametrized
        weights evaluated; ``shared`` maps the names whose last parametrization is ``SharedWeights``
        to (that parametrization, layer kind).
    """
    state = model.state_dict()
    replaced: dict[str, tuple[str, torch.Tensor]] = {}  # dropped prefix -> (plain name, value)
    shared: dict[str, tuple[SharedWeights, str]] = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            kind = weight_kind(module, param_name)
            fqn = f"{module_name}.{param_name}" if module_name else param_name
            prefix = f"{module_name}.parametrizations.{param_name}.".lstrip(".")
            with torch.no_grad():
                replaced[prefix] = (fqn, getattr(module, param_name).detach())
            if isinstance(plist[-1], SharedWeights):
                shared[fqn] = (plist[-1], kind)
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in replaced if key.startswith(p)), None)
        if prefix is None:
            plain[key] = value.detach()
        else:
            fqn, weight = replaced[prefix]
            plain.setdefault(fqn, weight)
    return plain, shared
