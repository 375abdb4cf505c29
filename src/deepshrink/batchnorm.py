"""Inference-only BatchNorm folding (MPEG NNC's "BN folding"): four per-channel tensors stored as two.

In eval mode a BatchNorm is a per-channel affine map, so its running statistics can be absorbed into
its weight and bias and reset to 0 and 1: the same eval-mode outputs, and two constant tensors that
cost (almost) nothing to store. Train mode normalises with batch statistics instead, so a folded
model does not train like the original; ``EncodeConfig(fold_batchnorm=True)`` opts in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .errors import ConfigError

BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")  # fold_batchnorm_stats' argument order


def fold_batchnorm_stats(
    weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
    where: str = "BatchNorm",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm's eval-mode function as a scale and a shift: (scale, shift, zeros, ones), on the CPU.

    ``weight * (x - mean) / sqrt(var + eps) + bias`` equals ``scale * (x - 0) / sqrt(1 + eps) + shift``
    with ``scale = weight * sqrt(1 + eps) / sqrt(var + eps)`` and ``shift = bias - weight * mean /
    sqrt(var + eps)``: the statistics become constants (MPEG NNC's BN folding). Computed in float64,
    each result cast back to its input's dtype.

    Raises:
        ConfigError: ``running_var + eps`` is not positive (or NaN) somewhere: there is no such function.
    """
    w, b, mean, var = (t.detach().cpu().double() for t in (weight, bias, running_mean, running_var))
    if not bool(torch.all(var + eps > 0)):
        raise ConfigError(f"{where}: cannot fold BatchNorm: running_var + eps must be positive, "
                          f"got a minimum of {float(torch.min(var + eps))} (eps={eps})")
    inv_std = torch.rsqrt(var + eps)
    scale = w * math.sqrt(1 + eps) * inv_std
    shift = b - w * mean * inv_std
    return (scale.to(weight.dtype), shift.to(bias.dtype), torch.zeros(mean.shape, dtype=running_mean.dtype),
            torch.ones(var.shape, dtype=running_var.dtype))


def fold_batchnorms(model: nn.Module, state: dict[str, torch.Tensor], skip: set[str] = frozenset()
                    ) -> dict[str, torch.Tensor]:
    """``state`` (``model``'s plain state dict) with every foldable BatchNorm's tensors replaced by
    ``fold_batchnorm_stats``; a new dict, the model and ``state``'s tensors untouched.

    Foldable: a ``_BatchNorm`` (1d/2d/3d, SyncBatchNorm) with ``affine`` and ``track_running_stats``
    whose four tensors are all in ``state`` (no running stats: not there) and none in ``skip``.
    ``num_batches_tracked`` is kept as it is.
    """
    return {**state, **folded_batchnorms(model, state, skip)}


def folded_batchnorms(model: nn.Module, state: Mapping[str, torch.Tensor], skip: set[str] = frozenset()
                      ) -> dict[str, torch.Tensor]:
    """Only the tensors ``fold_batchnorms`` replaces, by name; ``state`` is read only at those names (a
    mapping that computes its tensors on demand computes no other)."""
    folded: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.track_running_stats):
            continue
        names = [f"{prefix}.{n}" if prefix else n for n in BATCHNORM_TENSORS]
        if all(n in state and n not in skip for n in names):
            folded.update(zip(names, fold_batchnorm_stats(*(state[n] for n in names), module.eps,
                                                          where=prefix or type(module).__name__)))
    return folded
