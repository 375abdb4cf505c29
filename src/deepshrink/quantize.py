"""Stage 3: trained quantization by per-layer k-means weight sharing.

A quantized weight is ``codebook[indices]`` where index 0 is the pruned value (exactly zero) and
indices 1..K point at the K trainable centroids. Gradients reach each centroid as the sum of its
weights' gradients (the paper's Eq. 3) through the gather's backward; assignments never change.
"""

from __future__ import annotations

import torch
from torch import nn


def index_dtype(num_centroids: int) -> torch.dtype:
    """Smallest integer dtype that holds indices 0..num_centroids (0 = pruned)."""
    return torch.uint8 if num_centroids <= 255 else torch.int32


class SharedWeights(nn.Module):
    """Parametrization that replaces a weight by shared centroids gathered through fixed indices.

    Buffers/parameters (all in the module's state_dict):
        centroids: float Parameter of shape (K,), the shared non-zero values.
        indices: integer buffer shaped like the weight; 0 = pruned (zero), k = centroids[k-1].
    """

    kind = "shared"

    def __init__(self, centroids: torch.Tensor, indices: torch.Tensor, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("indices", indices.to(index_dtype(centroids.numel())))

    def codebook(self) -> torch.Tensor:
        """(K+1,) tensor: 0.0 followed by the centroids."""
        return torch.cat([self.centroids.new_zeros(1), self.centroids])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # index_select's backward is a scatter-add: each centroid's grad is the SUM of its weights' grads
        flat = self.codebook().index_select(0, self.indices.reshape(-1).long())
        return flat.view(self.indices.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, centroids={self.centroids.numel()}"

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], bits: int) -> "SharedWeights":
        """Rebuild with placeholder tensors shaped like a saved state (values come from load_state_dict)."""
        return cls(torch.zeros_like(tensors["centroids"]), torch.zeros_like(tensors["indices"]), bits)
