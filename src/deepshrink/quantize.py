"""Stage 3: trained quantization by per-layer weight sharing: k-means, entropy-constrained (ECSQ), uniform
or dependent.

A quantized weight is ``codebook[indices]`` where index 0 is the pruned value (exactly zero) and
indices 1..K point at the K trainable centroids. Gradients reach each centroid as the sum of its
weights' gradients (the paper's Eq. 3) through the gather's backward; assignments never change.
Fine-tuning the centroids therefore needs nothing beyond an optimizer over the model's parameters::

    layers = quantize_model(model, QuantizeConfig(bits=4))      # {fqn: {"bits", "mse", ...}}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    for x, y in batches:                                        # your loop, unchanged
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

The 1-D quantizers themselves are ``quantizers.py``. Rate-aware methods (``QuantizeConfig(method="ecsq" |
"uniform" | "dq", lam=...)``) trade distortion for the file's size: each weight takes the level
minimising squared error (optionally Fisher-weighted, ``hessian=True``: ``train.fisher_diagonal``) plus
``lam`` times the level's code length. Zero is one of the levels: weights sent there become pruned
(index 0) and stay zero through training, like pruned ones.
"""

from __future__ import annotations

import logging
import numbers
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .coding import row_length_of
from .config import check_bits, check_lam, check_patterns_match, enum_value, first_match, pattern_values
from .errors import ConfigError
from .layers import (MIN_DIMS, WeightRef, as_kinds, as_patterns, by_kind, kind_pairs, resolve, select_weights,
                     tie_parametrizations)
from .parametrizations import GradientMode, Masked, SharedWeights, fold_zero_centroids, index_dtype, shared_weights_of
from .kmeans import CentroidInit, kmeans_1d
from .quantizers import QuantizeMethod, dependent_1d, ecsq_1d, uniform_1d

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one weight-sharing step (``dataclasses.asdict`` goes into checkpoint meta)."""

    bits: int = 4  # 16 shared values per layer: the lab's setting, small codebooks, little accuracy loss
    bits_conv: int | None = None  # conv layers; None = ``bits`` (the paper used 8 for AlexNet's convs)
    bits_fc: int | None = None  # fully connected layers; None = ``bits`` (the paper used 5)
    bits_by_pattern: tuple[tuple[str, int], ...] = ()  # FQN glob -> bits; first match wins, beats kinds
    bits_by_kind: tuple[tuple[str, int], ...] = ()  # (kind, bits), e.g. ("attention", 6); beats bits_conv/fc
    init: str = "linear"  # a CentroidInit value; linear keeps large weights represented (paper's best)
    seed: int = 0  # seeds random/kmeans++ inits; each layer derives its own seed from this and its FQN
    max_iter: int = 100  # Lloyd iterations per layer; 1-D k-means rarely needs more
    include: tuple[str, ...] | None = None  # FQN globs; None = every weight of the selected kinds
    exclude: tuple[str, ...] = ()  # FQN globs removed after include
    kinds: tuple[str, ...] | None = None  # weight kinds (layers.KINDS); None = all
    gradient: str = "sum"  # a GradientMode value; sum is the paper's Eq. 3
    min_dims: int = MIN_DIMS  # floating parameters with at least this many dims are compressible
    min_numel: int = 1  # ... and at least this many elements
    method: str = "kmeans"  # a QuantizeMethod value; kmeans is the paper's (no rate term)
    lam: float = 0.0  # ecsq/uniform: bits traded per unit of relative squared error; 0 = distortion only
    hessian: bool = False  # ecsq/uniform: weight the error by a diagonal Fisher estimate (fisher_diagonal)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once here (lists from YAML become tuples)
        set_(self, "method", enum_value(QuantizeMethod, self.method, "quantization method"))
        set_(self, "lam", check_lam(self.lam))
        if not isinstance(self.hessian, bool):
            raise ConfigError(f"hessian must be true or false, got {self.hessian!r}")
        if self.method == QuantizeMethod.KMEANS.value and (self.lam > 0 or self.hessian):
            raise ConfigError(f"method 'kmeans' has no rate term: lam={self.lam} and hessian={self.hessian} "
                              "apply to method 'ecsq' or 'uniform'")
        set_(self, "bits", check_bits(self.bits))
        for name in ("bits_conv", "bits_fc"):
            value = getattr(self, name)
            set_(self, name, None if value is None else check_bits(value, name))
        set_(self, "bits_by_pattern", pattern_values(self.bits_by_pattern, "bits_by_pattern", check_bits))
        set_(self, "init", enum_value(CentroidInit, self.init, "centroid init"))
        set_(self, "gradient", enum_value(GradientMode, self.gradient, "gradient mode"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ConfigError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        set_(self, "include", None if self.include is None else as_patterns(self.include, "include"))
        set_(self, "exclude", as_patterns(self.exclude, "exclude"))
        set_(self, "kinds", None if self.kinds is None else as_kinds(self.kinds))
        set_(self, "bits_by_kind", kind_pairs(self.bits_by_kind, "bits_by_kind", check_bits))


def bits_for(ref: WeightRef, config: QuantizeConfig) -> int:
    """Bits for one weight: first matching ``bits_by_pattern`` glob, else ``bits_by_kind``, else
    ``bits_conv``/``bits_fc`` by kind when set, else ``bits``."""
    bits = first_match(ref.fqn, config.bits_by_pattern)
    if bits is not None:
        return bits
    kind_bits = by_kind(ref.kind, config.bits_by_kind)
    if kind_bits is None:
        kind_bits = {"conv": config.bits_conv, "fc": config.bits_fc}.get(ref.kind)
    return config.bits if kind_bits is None else kind_bits


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    init: str = "linear",
    seed: int = 0,
    max_iter: int = 100,
    *,
    method: str = "kmeans",
    lam: float = 0.0,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the non-zero entries of ``weight`` to at most ``2**bits`` shared non-zero values.

    Zeros stay at index 0 (pruned). With the rate-aware methods, non-zero weights that the
    rate-distortion assignment sends to the zero level join them: they are pruned from here on.

    Args:
        method: a ``QuantizeMethod`` value ("kmeans", "ecsq", "uniform", "dq").
        lam: rate weight of the rate-aware methods (see ``ecsq_1d``).
        importance: per-weight h_i shaped like ``weight`` (e.g. from ``fisher_diagonal``); None = 1.

    Returns:
        (centroids, indices): float32 centroids of shape (K,), K <= 2**bits (fewer when there are fewer
        distinct non-zero values or levels dropped out; 0 for an all-zero weight), and integer indices
        shaped like ``weight``: 0 = zero (pruned), 1..K elsewhere. Both on ``weight``'s device. A
        centroid that lands exactly on 0 is dropped and its weights get index 0: they are pruned
        (``parametrizations.fold_zero_centroids``).

    Raises:
        ConfigError: bits outside 1..16, NaN/inf entries, unknown init or method, bad lam or importance.
    """
    bits = check_bits(bits)
    method = QuantizeMethod(enum_value(QuantizeMethod, method, "quantization method"))
    flat = weight.detach().reshape(-1).to("cpu", torch.float32)
    keep = flat != 0
    values = flat[keep].numpy()
    h = None
    if importance is not None:
        if tuple(importance.shape) != tuple(weight.shape):
            raise ConfigError(f"importance has shape {tuple(importance.shape)}, the weight {tuple(weight.shape)}")
        h = importance.detach().reshape(-1).to("cpu", torch.float64)[keep].numpy()
    zeros = int(flat.numel() - values.size)
    if values.size == 0:
        levels, labels = np.zeros(0), np.zeros(0, dtype=np.intp)
    elif method is QuantizeMethod.KMEANS:
        levels, labels = kmeans_1d(values, 2**bits, init, seed=seed, max_iter=max_iter)
    elif method is QuantizeMethod.ECSQ:
        levels, labels = ecsq_1d(values, 2**bits, lam, h, init=init, iters=max_iter, seed=seed, zeros=zeros)
    elif method is QuantizeMethod.DQ:
        # the trellis runs over the whole tensor in scan order (pruned zeros included: the state machine
        # moves through them); the codebook is every grid level between the extremes in index order, so
        # that a weight's index gives back its level j and the coder can follow the state machine
        full_h = None if importance is None else importance.detach().reshape(-1).to("cpu", torch.float64).numpy()
        step, j = dependent_1d(flat.numpy(), max(2, 2**bits - 2), lam, full_h, row_length=row_length_of(weight.shape),
                               iters=min(max_iter, 4))
        grid = np.arange(int(j.min()), int(j.max()) + 1)
        levels = grid * step
        labels = (j - grid[0])[keep.numpy()]
    else:
        # 2^bits - 2 non-zero levels (+-L): with the zero level, indices still fit in ``bits`` bits
        step, q = uniform_1d(values, max(2, 2**bits - 2), lam, h, iters=max_iter, zeros=zeros)
        ints, labels = np.unique(q, return_inverse=True)
        levels = ints * step
    # levels exactly 0.0 (the zero level) become index 0; the others 1..K in sorted order
    nonzero_level = levels != 0 if method is not QuantizeMethod.KMEANS else np.ones(levels.size, dtype=bool)
    renumber = np.where(nonzero_level, np.cumsum(nonzero_level), 0)
    centroids = torch.from_numpy(levels[nonzero_level]).float()
    indices = torch.zeros(flat.numel(), dtype=index_dtype(centroids.numel()))
    indices[keep] = torch.from_numpy(renumber[np.asarray(labels, dtype=np.intp)]).to(indices.dtype)
    centroids, indices = fold_zero_centroids(centroids, indices)
    return centroids.to(weight.device), indices.view(weight.shape).to(weight.device)


def _layer_seed(seed: int, fqn: str) -> int:
    # from the name, not the position: adding a layer to the selection does not reseed the others
    return (seed + zlib.crc32(fqn.encode())) % 2**32


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig = QuantizeConfig(),
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict]:
    """Share weights in every selected layer: k-means (or ECSQ, or a uniform grid) on its non-zero
    *effective* entries.

    A layer's ``Masked`` mask is baked in first, so its zeros form the pruned set (index 0);
    ``SharedWeights`` is attached instead and the stored original is frozen (``requires_grad=False``):
    train the centroids with a fresh optimizer. All layers are clustered before any is changed, so an
    error leaves the model as it was.

    With "ecsq"/"uniform", weights sent to the zero level become pruned (index 0), exactly as
    pruned weights: they stay zero through any training.

    Args:
        importance: ``{fqn: h}`` per-weight importances (``fisher_diagonal``); required when
            ``config.hessian``, refused otherwise.

    Returns:
        ``{fqn: {"bits", "num_centroids", "mse", "nonzero", "numel", "zeroed"}}`` in module order; mse
        is the mean squared quantization error over the weights that were non-zero before, zeroed
        the number of them the quantizer sent to zero.

    Raises:
        ConfigError: a selected weight is already quantized, carries a foreign parametrization or holds
        NaN/inf, a bits setting is out of range, a pattern matches nothing, importances are missing
        for ``hessian=True`` (or given without it) or do not fit a weight.
    """
    if config.hessian and importance is None:
        raise ConfigError("hessian=True needs importances: pass importance=fisher_diagonal(model, train_data)")
    if importance is not None and not config.hessian:
        raise ConfigError("importances were given but hessian=False; set hessian=True to use them")
    refs = select_weights(model, config.include, config.exclude, config.kinds,
                          min_dims=config.min_dims, min_numel=config.min_numel)
    fqns = [r.fqn for r in refs]
    check_patterns_match(config.bits_by_pattern, fqns, "bits_by_pattern")
    if not refs:
        logger.warning("quantize_model: the model has no weights of kinds %s", list(config.kinds or ("any",)))
        return {}

    plans = []
    for ref in refs:
        module, name = resolve(model, ref.fqn)
        shared = shared_weights_of(module, name)
        if shared is not None:
            raise ConfigError(f"{ref.fqn} is already quantized ({shared.bits} bits); strip() the model to re-quantize")
        if parametrize.is_parametrized(module, name):
            # only masks get baked in
            foreign = [type(p).__name__ for p in module.parametrizations[name] if not isinstance(p, Masked)]
            if foreign:
                raise ConfigError(f"{ref.fqn} carries parametrizations deepshrink did not attach "
                                  f"({', '.join(foreign)}); remove them first")
        bits = bits_for(ref, config)
        with torch.no_grad():
            weight = getattr(module, name).detach()
        if not weight.is_floating_point():
            raise ConfigError(f"{ref.fqn}: expected a floating-point weight, got {weight.dtype}")
        h = None
        if importance is not None:
            if ref.fqn not in importance:
                raise ConfigError(f"{ref.fqn}: no importance given for this weight")
            h = importance[ref.fqn]
        try:
            seed = _layer_seed(config.seed, ref.fqn)
            centroids, indices = quantize_weight(weight, bits, config.init, seed, config.max_iter,
                                                 method=config.method, lam=config.lam, importance=h)
        except ConfigError as e:
            raise ConfigError(f"{ref.fqn}: {e}") from None
        nonzero = indices != 0
        was_nonzero = weight != 0
        with torch.no_grad():
            codebook = torch.cat([centroids.new_zeros(1), centroids]).double()
            err = codebook[indices.long()][was_nonzero] - weight.double()[was_nonzero]
            mse = float(err.square().mean()) if err.numel() else 0.0
        info = {"bits": bits, "num_centroids": centroids.numel(), "mse": mse,
                "nonzero": int(nonzero.sum()), "numel": weight.numel(),
                "zeroed": int((was_nonzero & ~nonzero).sum())}
        plans.append((ref.fqn, module, name, centroids, indices, info))

    layers = {}
    for fqn, module, name, centroids, indices, info in plans:
        if parametrize.is_parametrized(module, name):
            # leave_parametrized: the Parameter object stays, now holding the masked values
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        shared = SharedWeights(centroids, indices, info["bits"], config.gradient)
        parametrize.register_parametrization(module, name, shared)
        module.parametrizations[name].original.requires_grad_(False)
        layers[fqn] = info
        logger.debug("quantized %s: %d centroids (%d bits), mse %.3g over %d non-zero weights",
                     fqn, info["num_centroids"], info["bits"], info["mse"], info["nonzero"])
    tie_parametrizations(model)
    logger.info("quantized %d weights (%s, %s init%s)", len(layers), config.method, config.init,
                f", lambda {config.lam:g}" if config.method != QuantizeMethod.KMEANS.value else "")
    return layers


def codebooks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``{fqn: (centroids, indices, bits)}`` of every quantized weight (centroids detached, not copied)."""
    out = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in module.parametrizations.keys():
            shared = shared_weights_of(module, name)
            if shared is not None:
                fqn = f"{module_name}.{name}" if module_name else name
                out[fqn] = (shared.centroids.detach(), shared.indices, shared.bits)
    return out
