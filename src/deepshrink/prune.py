"""Stage 1: magnitude pruning. Masks are computed from plain tensors and attached as parametrizations.

A pruned weight is ``where(mask, original, 0)`` on every forward pass, so pruned entries stay exactly
zero whatever the optimizer does to the stored original (momentum, weight decay, Adam moments).
"""

from __future__ import annotations

import torch
from torch import nn


class Masked(nn.Module):
    """Parametrization that zeroes the entries where ``mask`` is False."""

    kind = "masked"

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where, not multiply: exact zeros even when the original holds inf/nan
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "Masked":
        """Rebuild with placeholder tensors shaped like a saved state (values come from load_state_dict)."""
        return cls(torch.ones_like(tensors["mask"], dtype=torch.bool))
