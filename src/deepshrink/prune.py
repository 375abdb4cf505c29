"""Stage 1: magnitude pruning. Masks are computed from plain tensors and attached as parametrizations.

A pruned weight is ``where(mask, original, 0)`` on every forward pass, so pruned entries stay exactly
zero whatever the optimizer does to the stored original (momentum, weight decay, Adam moments).
Retraining in your own loop therefore needs nothing beyond attaching the masks::

    masks = prune_model(model, PruneConfig(method="percentile", q=90))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for x, y in batches:                      # your loop, unchanged
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    zero_pruned_(model, opt)                  # tidy stored originals and optimizer state afterwards

Masks compose: pruning an already-pruned weight can only remove more entries (``apply_mask`` ANDs).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from torch.nn.utils import parametrize

from .parametrizations import Masked, SharedWeights, parametrizations_of, parametrized_tensors
from .ranking import count_nonfinite, smallest_magnitudes
from .config import check_patterns_match, enum_value, first_match, pattern_values
from .errors import ConfigError
from .layers import MIN_DIMS, as_kinds, as_patterns, by_kind, kind_pairs, resolve, select_weights, tie_parametrizations

logger = logging.getLogger(__name__)


class PruneMethod(str, Enum):
    """The built-in pruning rules (``PRUNERS`` holds these and any rule registered later).

    STD: keep ``|w| >= s * std(w)`` per layer (the lab's rule; s is a quality parameter).
    PERCENTILE: prune the q% smallest magnitudes of each layer (exact count).
    GLOBAL: prune the q% smallest magnitudes over all selected weights together (exact count).
    """

    STD = "std"
    PERCENTILE = "percentile"
    GLOBAL = "global"


class Scope(str, Enum):
    """How a pruning rule ranks weights (``torch.nn.utils.prune``'s PRUNING_TYPE).

    LAYER: each weight on its own: ``mask(weight, amount, prev_mask, *, scores) -> bool mask``.
    GLOBAL: all selected weights together: ``mask(weights, amount, prev_masks, *, scores) -> {name: mask}``.
    """

    LAYER = "layer"
    GLOBAL = "global"


@dataclass(frozen=True)
class PruningRule:
    """A registered pruning rule: a mask function, its scope, and the config field it reads."""

    name: str
    mask: Callable  # see Scope for the signature; True = keep
    scope: str = Scope.LAYER.value
    amount: str = "q"  # "q" (percent pruned, q_by_pattern overrides) or "s" (std multiple, s_by_pattern)
    per_layer: str | None = None  # GLOBAL rules: the LAYER rule for weights with a per-layer override


#: Pruning rules by name; ``PruneConfig.method`` picks one. Add one with ``@register_pruner``.
PRUNERS: dict[str, PruningRule] = {}


def register_pruner(
    name: str, *, scope: str = "layer", amount: str = "q", per_layer: str | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register a mask function as pruning rule ``name`` (see ``Scope`` for its signature).

    Raises:
        ConfigError: a bad scope or amount, a name already taken, or a GLOBAL rule's per-layer rule
            that is not a registered LAYER rule.
    """
    scope = enum_value(Scope, scope, "pruning scope")
    if amount not in ("q", "s"):
        raise ConfigError(f"pruning rule {name!r}: amount must be 'q' or 's', got {amount!r}")
    if per_layer is not None and (per_layer not in PRUNERS or PRUNERS[per_layer].scope != Scope.LAYER.value):
        raise ConfigError(f"pruning rule {name!r}: per_layer {per_layer!r} is not a registered per-layer rule")

    def add(mask: Callable) -> Callable:
        if name in PRUNERS:
            raise ConfigError(f"pruning rule {name!r} is already registered")
        PRUNERS[name] = PruningRule(name, mask, scope, amount, per_layer)
        return mask

    return add


# ---------------------------------------------------------------------------------------------------
# Functional core: plain tensors in, bool masks out (True = keep).
# ---------------------------------------------------------------------------------------------------


def _check_s(s: float) -> float:
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s < 0:
        raise ConfigError(f"s must be a finite number >= 0 (keep |w| >= s * std(w)), got {s!r}")
    return float(s)


def _check_q(q: float, warn: bool = True) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 100:
        raise ConfigError(f"q must be a percentage in [0, 100] (share of weights pruned), got {q!r}")
    if warn and q == 100:
        logger.warning("q=100 prunes every weight it applies to")
    return float(q)


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_scores(t: torch.Tensor, prev_mask: torch.Tensor | None, what: str) -> None:
    """Real dtype, and finite wherever the entry is still alive (pruned entries may hold anything)."""
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise ConfigError(f"{what} must be a real-valued tensor, got dtype {t.dtype}")
    bad = count_nonfinite(t, prev_mask)
    if bad:
        raise ConfigError(f"{what} holds {bad} NaN/inf values; magnitudes cannot be ranked")


def _check_like(t: torch.Tensor | None, weight: torch.Tensor, what: str, dtype: torch.dtype | None = None):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(weight.shape):
        raise ConfigError(f"{what} has shape {tuple(t.shape)}, expected the weight's shape {tuple(weight.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ConfigError(f"{what} must have dtype {dtype}, got {t.dtype}")


@register_pruner(PruneMethod.STD.value, amount="s")
def std_mask(
    weight: torch.Tensor,
    s: float,
    prev_mask: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the entries with ``|score| >= s * std(score)`` (scores default to the weight itself).

    The std is the population std (ddof=0, like ``np.std``) computed in float64. With ``prev_mask`` only
    entries it keeps can survive, and the std is taken over those kept entries only: the threshold
    describes the weights still alive, so re-applying the same ``s`` prunes further (iterative pruning).

    Args:
        weight: any-shaped real tensor.
        s: quality parameter, finite and >= 0 (0 keeps everything not already pruned).
        prev_mask: bool tensor shaped like ``weight``; False entries stay pruned.
        scores: ranking values shaped like ``weight`` (importance scores); default ``weight``.

    Returns:
        bool tensor shaped like ``weight`` (True = keep), on the weight's device.

    Raises:
        ConfigError: bad ``s``, a shape/dtype mismatch, or NaN scores.
    """
    s = _check_s(s)
    scores = weight if scores is None else scores
    _check_like(scores, weight, "scores")
    _check_like(prev_mask, weight, "prev_mask", torch.bool)
    _check_scores(scores, prev_mask, "scores" if scores is not weight else "weight")
    scores = scores.detach()
    kept_values = scores if prev_mask is None else scores[prev_mask]
    if kept_values.numel() == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    # float64 so the threshold matches numpy's on large layers
    std = kept_values.to(torch.float64).var(correction=0).sqrt().item()
    keep = scores.abs() >= s * std
    return keep if prev_mask is None else keep & prev_mask


@register_pruner(PruneMethod.PERCENTILE.value)
def percentile_mask(
    weight: torch.Tensor,
    q: float,
    prev_mask: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune the ``q`` % smallest ``|score|`` of one layer: exactly ``round(q / 100 * n)`` entries.

    ``round`` is Python's (half to even), so sparsity equals ``q`` within one weight. Ties in magnitude are
    broken by flat index (lower index pruned first), so the result is deterministic. With ``prev_mask``,
    ``q`` is the target *total* sparsity of the layer: already-pruned entries count towards it, and if the
    layer is already sparser nothing more is pruned.

    Args:
        weight: any-shaped real tensor.
        q: percentage in [0, 100]; 100 prunes everything (with a logged warning).
        prev_mask: bool tensor shaped like ``weight``; False entries stay pruned.
        scores: ranking values shaped like ``weight``; default ``weight``.

    Returns:
        bool tensor shaped like ``weight`` (True = keep).

    Raises:
        ConfigError: bad ``q``, a shape/dtype mismatch, or NaN scores.
    """
    return global_masks(
        {"weight": weight},
        q,
        None if prev_mask is None else {"weight": prev_mask},
        scores=None if scores is None else {"weight": scores},
    )["weight"]


@register_pruner(PruneMethod.GLOBAL.value, scope="global", per_layer=PruneMethod.PERCENTILE.value)
def global_masks(
    weights: dict[str, torch.Tensor],
    q: float,
    prev_masks: dict[str, torch.Tensor] | None = None,
    *,
    scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune the ``q`` % smallest ``|score|`` over all given weights together (exact count).

    Exactly ``round(q / 100 * N)`` entries end up pruned, N being the total number of entries; entries
    already pruned by ``prev_masks`` count towards it. Ties are broken by the dict's order, then flat
    index. The threshold is found by an exact radix select over the magnitudes' float bit patterns, one
    layer at a time, so no concatenated copy of all weights is ever made.

    Args:
        weights: ``{name: tensor}`` (names are only used in messages and as keys of the result).
        q: percentage in [0, 100].
        prev_masks: optional ``{name: bool mask}`` for some or all names.
        scores: optional ``{name: ranking values}`` for some or all names; default the weights.

    Returns:
        ``{name: bool mask}`` (True = keep), in the order of ``weights``.

    Raises:
        ConfigError: bad ``q``, unknown names, shape/dtype mismatches, or NaN scores.
    """
    q = _check_q(q)
    prev_masks = prev_masks or {}
    scores = scores or {}
    for label, extra in (("prev_masks", prev_masks), ("scores", scores)):
        unknown = set(extra) - set(weights)
        if unknown:
            raise ConfigError(f"{label} names {sorted(unknown)} are not among the weights {list(weights)}")
    ranked: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for name, w in weights.items():
        sc = scores.get(name, w)
        _check_like(sc, w, f"scores[{name!r}]")
        _check_like(prev_masks.get(name), w, f"prev_masks[{name!r}]", torch.bool)
        _check_scores(sc, prev_masks.get(name), f"{name!r} scores")
        ranked.append((sc.detach(), prev_masks.get(name)))

    total = sum(w.numel() for w in weights.values())
    already = sum(m.numel() - int(torch.count_nonzero(m)) for _, m in ranked if m is not None)
    to_prune = max(0, round(q / 100 * total) - already)
    if to_prune and already > 0:
        logger.debug("%d entries already pruned; pruning %d more", already, to_prune)
    keep = smallest_magnitudes(ranked, to_prune)
    for (_, m), mask in zip(ranked, keep):  # in place: the pruned marks become the keep mask
        torch.logical_not(mask, out=mask)
        if m is not None:
            mask &= m
    return dict(zip(weights, keep))


# ---------------------------------------------------------------------------------------------------
# Model layer: select weights by pattern, attach/update Masked parametrizations by FQN.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning step (``dataclasses.asdict`` goes into checkpoint meta)."""

    method: str = "percentile"  # a name in PRUNERS; exact per-layer sparsity is easiest to reason about
    s: float = 0.5  # std method: quality parameter; 0.5 prunes ~38% of a Gaussian layer
    q: float = 50.0  # percentile/global methods: % of weights pruned; a gentle first step
    include: tuple[str, ...] | None = None  # FQN globs; None = every weight of the selected kinds
    exclude: tuple[str, ...] = ()  # FQN globs removed after include
    kinds: tuple[str, ...] | None = None  # weight kinds (layers.KINDS); None = all
    q_by_pattern: tuple[tuple[str, float], ...] = ()  # per-layer q overrides, first matching glob wins
    s_by_pattern: tuple[tuple[str, float], ...] = ()  # per-layer s overrides, first matching glob wins
    q_by_kind: tuple[tuple[str, float], ...] = ()  # (kind, q): e.g. ("attention", 60); patterns win over kinds
    s_by_kind: tuple[tuple[str, float], ...] = ()  # (kind, s) for method std
    min_dims: int = MIN_DIMS  # floating parameters with at least this many dims are compressible
    min_numel: int = 1  # ... and at least this many elements

    def __post_init__(self):
        method = self.method.value if isinstance(self.method, Enum) else self.method  # plain str: JSON/YAML-safe
        if not isinstance(method, str) or method not in PRUNERS:
            raise ConfigError(f"unknown prune method {self.method!r}; valid: {', '.join(PRUNERS)}")
        rule = PRUNERS[method]
        _check_s(self.s)
        _check_q(self.q, warn=False)
        set_ = object.__setattr__  # frozen: normalise once here (lists from YAML become tuples)
        set_(self, "method", method)
        set_(self, "s", float(self.s))
        set_(self, "q", float(self.q))
        set_(self, "include", None if self.include is None else as_patterns(self.include, "include"))
        set_(self, "exclude", as_patterns(self.exclude, "exclude"))
        set_(self, "kinds", None if self.kinds is None else as_kinds(self.kinds))
        set_(self, "q_by_pattern", pattern_values(self.q_by_pattern, "q_by_pattern", _checked(_check_q, warn=False)))
        set_(self, "s_by_pattern", pattern_values(self.s_by_pattern, "s_by_pattern", _checked(_check_s)))
        set_(self, "q_by_kind", kind_pairs(self.q_by_kind, "q_by_kind", _checked(_check_q, warn=False)))
        set_(self, "s_by_kind", kind_pairs(self.s_by_kind, "s_by_kind", _checked(_check_s)))
        wrong = "s" if rule.amount == "q" else "q"
        for by in ("pattern", "kind"):
            if getattr(self, f"{wrong}_by_{by}"):
                users = ", ".join(repr(r.name) for r in PRUNERS.values() if r.amount == wrong)
                raise ConfigError(f"{wrong}_by_{by} applies to method {users}; method {method!r} uses "
                                  f"{rule.amount}_by_{by}")
        overrides = self.q_by_pattern + self.s_by_pattern + self.q_by_kind + self.s_by_kind
        if rule.scope == Scope.GLOBAL.value and rule.per_layer is None and overrides:
            raise ConfigError(f"method {method!r} ranks all weights together and takes no per-layer overrides")


def _checked(check: Callable, **kwargs) -> Callable:
    """A ``pattern_values`` check from a value check, naming the entry in its message."""

    def run(value, label: str) -> float:
        try:
            return check(value, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None

    return run


def _refuse_quantized(fqn: str, plist: list[nn.Module]) -> None:
    shared = next((p for p in plist if isinstance(p, SharedWeights)), None)
    if shared is not None:
        raise ConfigError(
            f"{fqn} is quantized (SharedWeights, {shared.bits} bits) and cannot be pruned further; "
            "prune before quantizing, or strip() the model first"
        )


def _ranking_view(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values to rank, current mask or None). Ranks ``original`` when Masked is the only parametrization:
    kept entries equal the effective weight and pruned ones are excluded by the mask, so no copy is made."""
    plist = parametrizations_of(module, name)
    if len(plist) == 1 and isinstance(plist[0], Masked):
        return module.parametrizations[name].original.detach(), plist[0].mask
    mask = next((p.mask for p in plist if isinstance(p, Masked)), None)
    with torch.no_grad():
        return getattr(module, name).detach(), mask


def prune_model(
    model: nn.Module, config: PruneConfig, scores: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Compute masks for the selected weights and attach them (ANDed into any existing masks).

    Masks are computed on the *effective* current weights, so repeated calls compose. All masks are
    computed before any is attached: a bad layer leaves the model unchanged.

    Args:
        model: any ``nn.Module``.
        config: method, amount, selection and per-layer overrides.
        scores: optional ``{fqn: importance scores}`` ranking some weights instead of their magnitudes.

    Returns:
        ``{fqn: bool mask}`` for every selected weight (True = keep), in module order: the masks the model
        now holds where a weight had none (no copy is made; clone one before changing it).

    Raises:
        ConfigError: a selected weight is quantized, holds NaN/inf, a pattern matches nothing, bad scores.
    """
    refs = select_weights(model, config.include, config.exclude, config.kinds,
                          min_dims=config.min_dims, min_numel=config.min_numel)
    fqns = [r.fqn for r in refs]
    kind_of = {r.fqn: r.kind for r in refs}
    selected = ", ".join(fqns)
    for label in ("q_by_pattern", "s_by_pattern"):
        check_patterns_match(getattr(config, label), fqns, label)
    scores = scores or {}
    unknown = set(scores) - set(fqns)
    if unknown:
        raise ConfigError(f"scores given for unselected weights {sorted(unknown)}; selected: {selected}")
    if not refs:
        logger.warning("prune_model: the model has no weights of kinds %s", list(config.kinds or ("any",)))
        return {}

    views: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for fqn in fqns:
        module, name = resolve(model, fqn)
        _refuse_quantized(fqn, parametrizations_of(module, name))
        weight, mask = _ranking_view(module, name)
        bad = count_nonfinite(weight, mask)
        if bad:
            raise ConfigError(f"{fqn}: {bad} of {weight.numel()} weights are NaN/inf; they cannot be ranked")
        views[fqn] = (weight, mask)

    rule = PRUNERS[config.method]
    amount = getattr(config, rule.amount)
    overrides = getattr(config, f"{rule.amount}_by_pattern")
    by_kinds = getattr(config, f"{rule.amount}_by_kind")
    new: dict[str, torch.Tensor] = {}
    ranked_together: dict[str, torch.Tensor] = {}
    for fqn, (w, m) in views.items():
        own = first_match(fqn, overrides)
        own = by_kind(kind_of[fqn], by_kinds) if own is None else own
        if rule.scope == Scope.LAYER.value:
            new[fqn] = rule.mask(w, amount if own is None else own, m, scores=scores.get(fqn))
        elif own is not None:  # a global rule prunes overridden layers on their own
            new[fqn] = PRUNERS[rule.per_layer].mask(w, own, m, scores=scores.get(fqn))
        else:
            ranked_together[fqn] = w
    if ranked_together:
        prev = {f: views[f][1] for f in ranked_together if views[f][1] is not None}
        new.update(rule.mask(ranked_together, amount, prev,
                             scores={f: scores[f] for f in ranked_together if f in scores}))
    new = {fqn: new[fqn] for fqn in fqns}

    undo: list[Callable[[], None]] = []
    try:
        for fqn, mask in new.items():  # masks made here: the model takes them as they are, no copy
            undo.append(_apply_mask(model, fqn, mask))
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    tie_parametrizations(model)
    kept_by_layer = {fqn: int(torch.count_nonzero(mask)) for fqn, mask in new.items()}  # no int64 copy of a mask
    for fqn, mask in new.items():
        logger.debug("pruned %s: sparsity %.4f", fqn, 1 - kept_by_layer[fqn] / max(mask.numel(), 1))
    total = sum(m.numel() for m in new.values())
    kept = sum(kept_by_layer.values())
    logger.info("pruned %d weights (%s): sparsity %.4f", len(new), rule.name, 1 - kept / max(total, 1))
    return new


def apply_mask(model: nn.Module, fqn: str, mask: torch.Tensor) -> None:
    """Attach ``Masked(mask)`` to weight ``fqn``, or AND ``mask`` into its existing ``Masked``.

    The mask is copied (later changes to the caller's tensor do not reach the model). On failure the
    model is left as it was.

    Raises:
        ConfigError: unknown ``fqn``, a non-bool mask, a shape mismatch, or a quantized weight.
    """
    _apply_mask(model, fqn, mask.clone() if isinstance(mask, torch.Tensor) else mask)
    tie_parametrizations(model)


def _apply_mask(model: nn.Module, fqn: str, mask: torch.Tensor) -> Callable[[], None]:
    """apply_mask that returns a function undoing it (prune_model rolls back several layers). A new
    ``Masked`` holds ``mask`` itself (moved to the weight's device), not a copy: the caller's is a copy."""
    module, name = resolve(model, fqn)
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"{fqn}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ConfigError(f"{fqn}: mask must have dtype torch.bool, got {mask.dtype}")
    plist = parametrizations_of(module, name)
    _refuse_quantized(fqn, plist)
    with torch.no_grad():
        shape = tuple(getattr(module, name).shape)
    if tuple(mask.shape) != shape:
        raise ConfigError(f"{fqn}: mask shape {tuple(mask.shape)} does not match weight shape {shape}")

    existing = next((p for p in plist if isinstance(p, Masked)), None)
    if existing is not None:
        old = existing.mask.clone()
        existing.mask.logical_and_(mask.to(existing.mask.device))
        return lambda: existing.mask.copy_(old)

    device = module.parametrizations[name].original.device if plist else getattr(module, name).device
    try:
        # unsafe: no trial forward (a copy of the weight) to learn what the checked shape already says
        parametrize.register_parametrization(module, name, Masked(mask.to(device), copy=False), unsafe=True)
    except Exception as e:
        _drop_last_parametrization(module, name, len(plist))
        raise ConfigError(f"{fqn}: cannot attach a mask ({type(e).__name__}: {e})") from None
    return lambda: _drop_last_parametrization(module, name, len(plist))


def _drop_last_parametrization(module: nn.Module, name: str, keep: int) -> None:
    """Undo a registration: back to ``keep`` parametrizations on ``module.name`` (0 = plain tensor)."""
    if not parametrize.is_parametrized(module, name):
        return
    if keep == 0:
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    else:
        plist = module.parametrizations[name]
        while len(plist) > keep:
            del plist[len(plist) - 1]


@torch.no_grad()
def zero_pruned_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write 0 into each masked weight's stored ``original`` (and the optimizer's per-weight state) at
    pruned positions, so checkpoints carry no stale values. The forward pass is unchanged."""
    for fqn, module, name, plist in parametrized_tensors(model):
        if not plist or not isinstance(plist[0], Masked):
            continue  # mask positions refer to the original only when Masked comes first
        original = module.parametrizations[name].original
        pruned = ~plist[0].mask
        original.masked_fill_(pruned, 0)
        if optimizer is not None:
            for value in optimizer.state.get(original, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == original.shape:
                    value.masked_fill_(pruned, 0)
        logger.debug("zeroed %d pruned entries of %s", int(torch.count_nonzero(pruned)), fqn)


@torch.no_grad()
def sparsity(model: nn.Module, include: Sequence[str] | None = None) -> float:
    """Fraction of exactly-zero entries over the compressible weights (effective values); 0.0 if none."""
    total = zeros = 0
    for ref in select_weights(model, include):
        module, name = resolve(model, ref.fqn)
        w = getattr(module, name)
        total += w.numel()
        zeros += w.numel() - int(torch.count_nonzero(w))
    return zeros / total if total else 0.0
