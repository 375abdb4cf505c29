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

import numba
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .coding import row_length_of
from .config import check_bits, check_lam, check_patterns_match, enum_value, first_match, pattern_values
from .errors import ConfigError
from .layers import (MIN_DIMS, WeightRef, as_kinds, as_patterns, by_kind, kind_pairs, resolve, select_weights,
                     tie_parametrizations)
from .parametrizations import (GradientMode, Masked, SharedWeights, fold_zero_centroids, index_dtype,
                               parametrizations_of, shared_weights_of)
from .parallel import map_in_order
from .kmeans import CentroidInit, check_values, kmeans_labels, kmeans_sorted, sorted_float64
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
    centroids, indices = _quantize_flat(flat, flat != 0, tuple(weight.shape), bits, init, seed, max_iter, method, lam,
                                        importance)
    return centroids.to(weight.device), indices.view(weight.shape).to(weight.device)


#: Elements handled at a time where a whole layer's temporaries would be several bytes per weight
#: (labels, the error of the quantized weights); a layer this small is done in one piece, as ever
CHUNK = 1 << 22


def _quantize_flat(flat: torch.Tensor, keep: torch.Tensor, shape: tuple[int, ...], bits: int, init: str, seed: int,
                   max_iter: int, method: QuantizeMethod, lam: float, importance: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_weight`` of a flat CPU float32 weight whose non-zero entries are where ``keep`` is true
    (elsewhere ``flat`` may hold anything: a masked weight's pruned originals). Indices are flat, CPU."""
    keep_np, flat_np = keep.numpy(), flat.numpy()
    h = None
    if importance is not None:
        if tuple(importance.shape) != shape:
            raise ConfigError(f"importance has shape {tuple(importance.shape)}, the weight {shape}")
        h = importance.detach().reshape(-1).to("cpu", torch.float64).numpy()[keep_np]
    kept = int(np.count_nonzero(keep_np))
    zeros = flat_np.size - kept
    labels = None  # k-means labels the values chunk by chunk, as it writes the indices
    if kept == 0:
        levels, labels = np.zeros(0), np.zeros(0, dtype=np.intp)
    elif method is QuantizeMethod.KMEANS:
        values = check_values(flat_np[keep_np])
        x = sorted_float64(values)
        del values  # only the sorted copy while k-means runs; the values are read again to label them
        levels, thresholds = kmeans_sorted(x, 2**bits, init, seed=seed, max_iter=max_iter)
        del x
    elif method is QuantizeMethod.ECSQ:
        levels, labels = ecsq_1d(flat_np[keep_np], 2**bits, lam, h, init=init, iters=max_iter, seed=seed, zeros=zeros)
    elif method is QuantizeMethod.DQ:
        # the trellis runs over the whole tensor in scan order (pruned zeros included: the state machine
        # moves through them); the codebook is every grid level between the extremes in index order, so
        # that a weight's index gives back its level j and the coder can follow the state machine
        full_h = None if importance is None else importance.detach().reshape(-1).to("cpu", torch.float64).numpy()
        step, j = dependent_1d(np.where(keep_np, flat_np, np.float32(0)), max(2, 2**bits - 2), lam, full_h,
                               row_length=row_length_of(shape), iters=min(max_iter, 4))
        grid = np.arange(int(j.min()), int(j.max()) + 1)
        levels = grid * step
        labels = (j - grid[0])[keep_np]
    else:
        # 2^bits - 2 non-zero levels (+-L): with the zero level, indices still fit in ``bits`` bits
        step, q = uniform_1d(flat_np[keep_np], max(2, 2**bits - 2), lam, h, iters=max_iter, zeros=zeros)
        ints, labels = np.unique(q, return_inverse=True)
        levels = ints * step
    # levels exactly 0.0 (the zero level) become index 0; the others 1..K in sorted order
    nonzero_level = levels != 0 if method is not QuantizeMethod.KMEANS else np.ones(levels.size, dtype=bool)
    centroids = torch.from_numpy(levels[nonzero_level]).float()
    indices = torch.zeros(flat_np.size, dtype=index_dtype(centroids.numel()))
    renumber = np.where(nonzero_level, np.cumsum(nonzero_level), 0).astype(indices.numpy().dtype)
    out, done = indices.numpy(), 0
    for start in range(0, flat_np.size, CHUNK):  # k-means never holds a label array of the whole layer
        part = slice(start, start + CHUNK)
        chunk_keep = keep_np[part]
        if labels is None:
            chunk_labels = kmeans_labels(flat_np[part][chunk_keep], thresholds)
        else:
            chunk_labels = labels[done:done + int(np.count_nonzero(chunk_keep))]
        out[part][chunk_keep] = renumber[chunk_labels]
        done += chunk_labels.size
    return fold_zero_centroids(centroids, indices)


def _layer_info(flat: torch.Tensor, keep: torch.Tensor, indices: torch.Tensor, centroids: torch.Tensor,
                bits: int) -> dict:
    """What ``quantize_model`` reports of a layer: mse over the weights that were non-zero, counts."""
    codebook = torch.cat([centroids.new_zeros(1), centroids]).double()
    nonzero = int(torch.count_nonzero(indices))
    if flat.numel() <= CHUNK:
        err = codebook[indices.long()][keep] - flat.double()[keep]
        mse = float(err.square().mean()) if err.numel() else 0.0
        zeroed = int(torch.count_nonzero(keep & (indices == 0)))
    else:  # in one pass: a float64 copy of a large layer would be 8 bytes a weight (the sum's order differs)
        total, count, zeroed = _squared_error(flat.numpy(), keep.numpy(), indices.numpy(), codebook.numpy())
        mse = total / count if count else 0.0
    return {"bits": bits, "num_centroids": centroids.numel(), "mse": mse, "nonzero": nonzero,
            "numel": flat.numel(), "zeroed": zeroed}


@numba.njit(cache=True, nogil=True)
def _squared_error(values, keep, indices, codebook):
    """(sum of squared errors over the kept values, their count, how many of them got index 0)."""
    total, count, zeroed = 0.0, 0, 0
    for i in range(values.shape[0]):
        if keep[i]:
            err = codebook[indices[i]] - np.float64(values[i])
            total += err * err
            count += 1
            zeroed += indices[i] == 0
    return total, count, zeroed


def _layer_seed(seed: int, fqn: str) -> int:
    # from the name, not the position: adding a layer to the selection does not reseed the others
    return (seed + zlib.crc32(fqn.encode())) % 2**32


def quantize_model(
    model: nn.Module,
    config: QuantizeConfig = QuantizeConfig(),
    importance: dict[str, torch.Tensor] | None = None,
    *,
    workers: int | None = None,
) -> dict[str, dict]:
    """Share weights in every selected layer: k-means (or ECSQ, or a uniform grid) on its non-zero
    *effective* entries.

    A layer's ``Masked`` mask is baked in, so its zeros form the pruned set (index 0); ``SharedWeights``
    is attached instead and the stored original is frozen (``requires_grad=False``): train the
    centroids with a fresh optimizer. Layers are quantized one at a time, each replacing its mask by
    its indices (a whole-model copy of either is never made); an error puts back the layers already
    changed, so the model is left as it was.

    With "ecsq"/"uniform", weights sent to the zero level become pruned (index 0), exactly as
    pruned weights: they stay zero through any training.

    Args:
        importance: ``{fqn: h}`` per-weight importances (``fisher_diagonal``); required when
            ``config.hessian``, refused otherwise.
        workers: layers clustered at once (threads; None = one per CPU); the results do not depend on it.

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
    targets = [_target(model, ref, config, importance) for ref in refs]  # every check that needs no clustering

    def plan(target) -> tuple:
        fqn, module, name, bits, h = target
        flat, keep = _layer_values(module, name)
        try:
            centroids, indices = _quantize_flat(flat.reshape(-1), keep.reshape(-1), tuple(keep.shape), bits,
                                                config.init, _layer_seed(config.seed, fqn), config.max_iter,
                                                QuantizeMethod(config.method), config.lam, h)
        except ConfigError as e:
            raise ConfigError(f"{fqn}: {e}") from None
        info = _layer_info(flat.reshape(-1), keep.reshape(-1), indices, centroids, bits)
        return centroids, indices.view(keep.shape), info

    layers: dict[str, dict] = {}
    changed: list[_SharedInPlace] = []
    plans = map_in_order(plan, targets, workers, release_memory=True)
    try:  # layers clustered ``workers`` at once (sorts and kernels release the GIL), attached in order
        for (fqn, module, name, bits, _), (centroids, indices, info) in zip(targets, plans):
            device = _stored(module, name).device
            changed.append(_SharedInPlace(module, name, SharedWeights(
                centroids.to(device), indices.to(device), bits, config.gradient)))
            layers[fqn] = info
            logger.debug("quantized %s: %d centroids (%d bits), mse %.3g over %d non-zero weights",
                         fqn, info["num_centroids"], info["bits"], info["mse"], info["nonzero"])
    except BaseException:
        for layer in reversed(changed):
            layer.revert()
        raise
    for layer in changed:
        layer.commit()
    tie_parametrizations(model)
    logger.info("quantized %d weights (%s, %s init%s)", len(layers), config.method, config.init,
                f", lambda {config.lam:g}" if config.method != QuantizeMethod.KMEANS.value else "")
    return layers


def _target(model: nn.Module, ref: WeightRef, config: QuantizeConfig, importance: dict | None) -> tuple:
    """(fqn, module, name, bits, importance) of a weight ``quantize_model`` may quantize (ConfigError if not)."""
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
    if not _stored(module, name).is_floating_point():
        raise ConfigError(f"{ref.fqn}: expected a floating-point weight, got {_stored(module, name).dtype}")
    h = None
    if importance is not None:
        if ref.fqn not in importance:
            raise ConfigError(f"{ref.fqn}: no importance given for this weight")
        h = importance[ref.fqn]
    return ref.fqn, module, name, bits_for(ref, config), h


def _stored(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor a weight keeps: its parametrizations' original, or itself."""
    return module.parametrizations[name].original if parametrize.is_parametrized(module, name) else getattr(module, name)


def _layer_values(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 CPU values, bool keep) shaped like the weight: ``keep`` marks its non-zero effective entries,
    where ``values`` holds them. A masked weight is read through its original and masks, not computed
    (elsewhere ``values`` holds what the masks hide)."""
    with torch.no_grad():
        masks = [p.mask for p in parametrizations_of(module, name)]
        values = (_stored(module, name) if masks else getattr(module, name)).detach().to("cpu", torch.float32)
        keep = values != 0
        for mask in masks:
            keep &= mask.cpu()
    return values, keep


class _SharedInPlace:
    """A weight's ``SharedWeights`` attached in place of its masks, until ``commit`` (or ``revert``).

    Its stored original keeps every value (the masks' pruned ones too) until ``commit`` zeroes the pruned
    entries, as baking the masks in would have; meanwhile each mask is kept as what it adds to the
    non-zero indices (usually nothing), so its memory goes to the indices and ``revert`` can rebuild it.
    """

    def __init__(self, module: nn.Module, name: str, shared: SharedWeights):
        self.module, self.name = module, name
        self.masked = parametrizations_of(module, name)  # Masked only (``_target`` checked)
        self.requires_grad = _stored(module, name).requires_grad
        self.kept = [_MaskBeyond(p.mask, shared.indices) for p in self.masked]
        if self.masked:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)  # the original again
        try:  # unsafe: no trial forward (a gather of the whole weight) to learn what the shapes already say
            parametrize.register_parametrization(module, name, shared, unsafe=True)
        except BaseException:
            for p in self.masked:
                parametrize.register_parametrization(module, name, p, unsafe=True)
            raise
        module.parametrizations[name].original.requires_grad_(False)
        for p in self.masked:  # a tied alias still lists these objects: ``tie_parametrizations`` replaces them
            p.mask = torch.zeros(0, dtype=torch.bool, device=p.mask.device)

    def commit(self) -> None:
        """Zero the stored original where the masks had pruned it."""
        if self.masked:
            indices = self.module.parametrizations[self.name][0].indices
            pruned = torch.zeros(indices.shape, dtype=torch.bool, device=indices.device)
            for kept in self.kept:
                pruned |= ~kept.restore(indices)
            with torch.no_grad():
                self.module.parametrizations[self.name].original.masked_fill_(pruned, 0)

    def revert(self) -> None:
        """Back to the masks and the trainable original the weight had."""
        indices = self.module.parametrizations[self.name][0].indices
        parametrize.remove_parametrizations(self.module, self.name, leave_parametrized=False)
        getattr(self.module, self.name).requires_grad_(self.requires_grad)
        for p, kept in zip(self.masked, self.kept):
            p.mask = kept.restore(indices)
            parametrize.register_parametrization(self.module, self.name, p, unsafe=True)


class _MaskBeyond:
    """A bool mask that is true wherever ``indices`` are not 0, kept as the positions it adds (usually none;
    packed bits when those would take more)."""

    def __init__(self, mask: torch.Tensor, indices: torch.Tensor):
        self.shape, self.device = mask.shape, mask.device
        count = int(torch.count_nonzero(mask)) - int(torch.count_nonzero(indices))  # the mask holds every index
        self.positions, self.bits = torch.zeros(0, dtype=torch.long, device=mask.device), None
        if count and 64 * count <= mask.numel():
            self.positions = (mask & (indices.to(mask.device) == 0)).reshape(-1).nonzero().reshape(-1)
        elif count:
            self.positions, self.bits = None, np.packbits(mask.reshape(-1).cpu().numpy())

    def restore(self, indices: torch.Tensor) -> torch.Tensor:
        if self.positions is None:
            flat = torch.from_numpy(np.unpackbits(self.bits, count=indices.numel()).astype(bool))
            return flat.view(self.shape).to(self.device)
        mask = (indices != 0).to(self.device).reshape(-1)
        mask[self.positions] = True
        return mask.view(self.shape)


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
