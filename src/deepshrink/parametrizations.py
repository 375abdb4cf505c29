"""Compression state: the parametrizations deepshrink attaches to weights, and everything that reads them.

A pruned weight carries ``Masked`` (a bool ``mask`` buffer); a quantized weight carries
``SharedWeights`` (trainable ``centroids`` and a fixed ``indices`` buffer, 0 = pruned); for the length of
a quantization-aware retraining (``reassigning``) it carries ``Reassigned`` instead. They are
``torch.nn.utils.parametrize`` parametrizations, so they live in ``model.state_dict()``. This module
is their one home: the walk over parametrized weights, ``masks``, ``strip``, ``plain_state_dict``
(the stripped state dict, computed without touching the model) and ``compression_state`` /
``restore_compression`` (what a checkpoint records so that it loads with ``weights_only=True``).
Pruning, quantization, encoding and checkpoints import it; it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import check_lam, enum_value
from .errors import CheckpointError, ConfigError
from .layers import resolve, tie_parametrizations, tied_weights, weight_kind

# ---------------------------------------------------------------------------------------------------
# The parametrizations
# ---------------------------------------------------------------------------------------------------


class Masked(nn.Module):
    """Parametrization that zeroes the entries where ``mask`` is False."""

    kind = "masked"

    def __init__(self, mask: torch.Tensor, copy: bool = True):
        super().__init__()
        # never alias the caller's tensor, unless told it is ours (``prune_model``'s own masks: no second copy)
        self.register_buffer("mask", mask.to(torch.bool, copy=copy))

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
        # index_select's backward is a scatter-add: each centroid's grad is the SUM of its weights' grads.
        # int32 indices: half the temporary of int64 ones, the same gather
        codebook = torch.cat([centroids.new_zeros(1), centroids])
        flat = codebook.index_select(0, self.indices.reshape(-1).int())
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
    return keep_centroids(centroids, indices, ~zero)


def keep_centroids(centroids: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The centroids where ``kept`` (bool, (K,)) is true, indices renumbered; the others' weights get index 0."""
    renumber = torch.cat([kept.new_zeros(1, dtype=torch.long), torch.cumsum(kept.long(), 0) * kept.long()])
    folded = renumber.to(indices.device)[indices.long()]
    return centroids[kept], folded.to(index_dtype(int(kept.sum())))


def cheapest_level_bounds(levels: torch.Tensor, penalties: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each level is the cheapest: ``argmin_k (w - levels[k])^2 + penalties[k]`` as intervals of w.

    Every cost is w^2 plus a line in w (slope ``-2 c``, intercept ``c^2 + p``), so the cheapest level
    is the lower envelope of K lines: a few intervals, found once per call, and each weight's level
    is then one ``torch.bucketize`` (O(n log K) time, O(n) memory, where a cost table would be n x K).

    Args:
        levels: (K,) float levels in ascending order.
        penalties: (K,) costs added to each level's squared error; +inf = never chosen.

    Returns:
        (bounds, winners): ``winners[i]`` (an index into ``levels``) is the cheapest level for w in
        ``(bounds[i-1], bounds[i]]``; ``bounds`` is ascending, one shorter than ``winners``.
    """
    c = levels.detach().double().cpu().tolist()
    intercept = [ci * ci + float(pi) for ci, pi in zip(c, penalties.detach().double().cpu().tolist())]
    hull: list[int] = []

    def crossing(a: int, b: int) -> float:  # c[a] < c[b]: a is cheaper below this w, b above
        return (intercept[b] - intercept[a]) / (2.0 * (c[b] - c[a]))

    for k in range(len(c)):
        if math.isinf(intercept[k]):
            continue
        if hull and c[hull[-1]] == c[k]:  # equal levels: the cheaper one stays
            if intercept[k] >= intercept[hull[-1]]:
                continue
            hull.pop()
        while len(hull) >= 2 and crossing(hull[-2], k) <= crossing(hull[-2], hull[-1]):
            hull.pop()  # hull[-1] is never the cheapest
        hull.append(k)
    bounds = [crossing(a, b) for a, b in zip(hull, hull[1:])]
    return torch.tensor(bounds, dtype=levels.dtype, device=levels.device), torch.tensor(hull, dtype=torch.long, device=levels.device)


class Reassigned(nn.Module):
    """Parametrization for quantization-aware retraining of a quantized weight (see ``reassigning``).

    The stored original is the layer's float weight, and it trains; the forward value is the level each
    weight is assigned to, and the gradient passes straight through to the float weight (the
    straight-through estimator, Bengio et al. 2013). The levels stay fixed. Every forward assigns each
    weight to the level minimising ``(w - c)^2 / scale + lam * bits(c)``, with ``bits`` from the level
    counts of the last training step (ECSQ's assignment, Choi et al. 2017; only training updates them), so
    weights cross to the neighbouring level as they train, and with ``lam > 0`` they may cross to zero
    (or back). Weights that were zero when retraining began (pruned) stay zero: their gradient is masked.

    Buffers: ``codebook`` (K+1,): 0.0 followed by the levels; ``keep`` bool, shaped like the weight;
    ``counts`` (K+1,): members of each codebook entry in the last training step.
    """

    def __init__(self, levels: torch.Tensor, keep: torch.Tensor, counts: torch.Tensor, lam: float, scale: float):
        super().__init__()
        self.lam, self.scale = float(lam), float(scale)
        self.register_buffer("codebook", torch.cat([levels.new_zeros(1), levels.detach()]).float())
        self.register_buffer("keep", keep.detach().clone().bool())
        self.register_buffer("counts", counts.detach().clone().double())

    def assign(self, weight: torch.Tensor) -> torch.Tensor:
        """Each weight's codebook index: 0 = zero, k = the k-th level (long, shaped like ``weight``)."""
        if self.lam > 0:
            counts = self.counts.clone()
            counts[0] = counts[0].clamp_min(1)  # zero is always on offer (as in quantize.ecsq_1d)
            penalties = self.scale * self.lam * -torch.log2(counts / counts.sum())  # empty level: +inf, never again
        else:  # distortion only: every level on offer, and zero to none (it would prune at no gain in rate)
            penalties = torch.zeros_like(self.counts)
            penalties[0] = math.inf
        order = torch.argsort(self.codebook)
        bounds, winners = cheapest_level_bounds(self.codebook[order], penalties.to(self.codebook.device)[order])
        if winners.numel() == 0:  # no level on offer (a layer pruned to nothing at lambda 0)
            return torch.zeros_like(weight, dtype=torch.long)
        indices = order[winners[torch.bucketize(weight.detach().float(), bounds)]]
        return torch.where(self.keep, indices, 0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            indices = self.assign(weight)
            if self.training:
                self.counts.copy_(torch.bincount(indices.reshape(-1), minlength=self.counts.numel()).double())
        straight_through = (weight - weight.detach()) * self.keep
        return self.codebook.to(weight.dtype)[indices] + straight_through

    def extra_repr(self) -> str:
        return f"levels={self.codebook.numel() - 1}, lam={self.lam:g}"


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


@dataclass(frozen=True)
class PlainTensor:
    """One entry of the state dict ``strip(model)`` would give, evaluated only when asked (``value``)."""

    name: str
    stored: torch.Tensor | None  # a plain parameter or buffer as the model holds it; None: parametrized
    module: nn.Module | None = None  # a parametrized weight's module and attribute, evaluated by ``value``
    attribute: str | None = None
    shared: SharedWeights | None = None  # the weight's last parametrization, where it is SharedWeights
    kind: str | None = None  # a parametrized weight's layer kind (``layers.weight_kind``)

    def value(self) -> torch.Tensor:
        """The detached tensor: the stored one itself, or a parametrized weight computed now (a new tensor)."""
        if self.stored is not None:
            return self.stored.detach()
        with torch.no_grad():
            return getattr(self.module, self.attribute).detach()


def plain_tensors(model: nn.Module) -> dict[str, PlainTensor]:
    """The plain state dict's entries in its order, none evaluated: a walk that holds one tensor at a time.

    Plain parameters and buffers are the model's own tensors (no copy); a parametrized weight is
    computed by ``PlainTensor.value`` when its turn comes, so no copy of the whole model is made.
    """
    state = model.state_dict(keep_vars=True)
    replaced: dict[str, PlainTensor] = {}  # dropped prefix -> the weight it stands for
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            fqn = f"{module_name}.{param_name}" if module_name else param_name
            prefix = f"{module_name}.parametrizations.{param_name}.".lstrip(".")
            shared = plist[-1] if isinstance(plist[-1], SharedWeights) else None
            replaced[prefix] = PlainTensor(fqn, None, module, param_name, shared, weight_kind(module, param_name))
    plain: dict[str, PlainTensor] = {}
    for key, value in state.items():
        prefix = next((p for p in replaced if key.startswith(p)), None)
        if prefix is None:
            plain[key] = PlainTensor(key, value)
        else:
            plain.setdefault(replaced[prefix].name, replaced[prefix])
    return plain


def plain_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[SharedWeights, str]]]:
    """The state dict ``strip(model)`` would give, computed without touching the model (every parametrized
    weight evaluated: a copy of each; ``plain_tensors`` walks them one at a time instead).

    Returns:
        (state, shared): ``state`` maps plain names ("fc1.weight") to detached tensors, parametrized
        weights evaluated; ``shared`` maps the names whose last parametrization is ``SharedWeights``
        to (that parametrization, layer kind).
    """
    tensors = plain_tensors(model)
    plain = {name: t.value() for name, t in tensors.items()}
    return plain, {name: (t.shared, t.kind) for name, t in tensors.items() if t.shared is not None}


# ---------------------------------------------------------------------------------------------------
# Quantization-aware retraining
# ---------------------------------------------------------------------------------------------------


@contextmanager
def reassigning(model: nn.Module, lam: float) -> Iterator[int]:
    """Within the block, every quantized weight retrains as a float weight that moves between its levels.

    Each ``SharedWeights`` becomes ``Reassigned`` with the same levels: its stored float weight (the
    values it had before quantization) trains with the straight-through estimator, and every training
    step reassigns each weight to its cheapest level for squared error / scale + ``lam`` x bits
    (``scale``: the mean square of the layer's non-zero float weights, as ``quantize.ecsq_1d`` scales
    it; ``lam``: the quantizer's own keeps its rate trade-off, 0 = nearest level and no new zeros). On
    leaving (also on an error), each weight becomes ``SharedWeights`` again with the last assignment:
    levels nobody uses are dropped, the float weight is frozen, and the centroids can train as before.
    Weights pruned before quantization stay zero throughout.

    A dependent-quantization (``dq``) layer loses its state machine here: its levels become a plain
    codebook, coded without the trellis model.

    Yields:
        the number of quantized weights being retrained.

    Raises:
        ConfigError: ``lam`` is negative or not finite, or the model has no quantized weight.
    """
    lam = check_lam(lam, "reassignment's lam")
    aliases = tied_weights(model)
    layers = []
    for fqn, module, name, plist in list(parametrized_tensors(model)):
        if fqn in aliases or not any(isinstance(p, SharedWeights) for p in plist):
            continue
        if len(plist) != 1:  # quantize_model bakes masks in: a list is a model deepshrink did not build
            raise ConfigError(f"{fqn}: expected one SharedWeights parametrization, found "
                              f"{', '.join(type(p).__name__ for p in plist)}")
        layers.append((fqn, module, name, plist[0]))
    if not layers:
        raise ConfigError("reassignment retrains quantized weights, and this model has none: quantize it first")
    for fqn, module, name, shared in layers:
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)  # the float weight again
        weight = getattr(module, name)
        keep = weight.detach() != 0  # quantize_model stored the pruned weights as exact zeros
        nonzero = weight.detach()[keep].double()
        scale = float(nonzero.square().mean()) if nonzero.numel() else 0.0
        counts = torch.bincount(shared.indices.reshape(-1).long(), minlength=shared.centroids.numel() + 1)
        parametrize.register_parametrization(
            module, name, Reassigned(shared.centroids.detach(), keep, counts, lam, scale if scale > 0 else 1.0))
        module.parametrizations[name].original.requires_grad_(True)
    tie_parametrizations(model)
    try:
        yield len(layers)
    finally:
        for fqn, module, name, shared in layers:
            plist = module.parametrizations[name]
            reassigned = plist[0]
            with torch.no_grad():
                indices = reassigned.assign(plist.original)
            used = torch.bincount(indices.reshape(-1), minlength=reassigned.codebook.numel())[1:] > 0
            centroids, indices = keep_centroids(reassigned.codebook[1:], indices, used)  # unused levels dropped
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            frozen = SharedWeights(centroids, indices, shared.bits, shared.gradient)
            parametrize.register_parametrization(module, name, frozen.to(centroids.device))
            module.parametrizations[name].original.requires_grad_(False)
        tie_parametrizations(model)
