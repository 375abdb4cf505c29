"""Real-size models (issue 26): the same bytes as before, tensor by tensor, in parallel, in bounded memory."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.compress import compress_model
from deepshrink.encode import EncodeConfig
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model


class PinnedModel(nn.Module):
    """Every kind of stored tensor: a tied embedding/head, a conv, a BatchNorm with its counter, and an fc
    layer sparse enough for the paper's layout to win under "auto"."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 24)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(24, 40)
        self.fc.weight = self.embed.weight  # tied, as GPT-2's lm_head
        self.mlp = nn.Linear(256, 128)


def pinned_model() -> PinnedModel:
    """Seeded weights (numpy's generator: independent of torch's), pruned 70% (mlp 95%), 4-bit (conv 5-bit) k-means."""
    torch.manual_seed(0)
    model = PinnedModel()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.from_numpy(rng.standard_normal(tuple(t.shape)).astype(np.float32)))
        model.bn.running_var.abs_()
        model.bn.num_batches_tracked.fill_(7)
    prune_model(model, PruneConfig(method="percentile", q=70, q_by_pattern=(("mlp.*", 95),)))
    quantize_model(model, QuantizeConfig(bits=4, bits_conv=5))
    return model


PINNED_CONFIGS = {
    "auto": EncodeConfig(),
    "huffman": EncodeConfig(coder="huffman"),
    "ans": EncodeConfig(coder="ans"),
    "cabac": EncodeConfig(coder="cabac"),
    "half-grid-fold": EncodeConfig(codebook_dtype="float16", raw_dtype="float16", grid_bits=8, fold_batchnorm=True),
}
#: sha256 of each file, computed on main at b542569 (before tensor-by-tensor encoding): the format and the
#: encoder's choices must not change
PINNED_SHA256 = {
    "auto": "6de3b24373a27d01d657b999eda43cbe15abf16a7856b87f10c24eccaaa792c9",  # 3642 bytes
    "huffman": "70f6300d3e579b1ca15681ce6c152080167ff87a59d0c848a38fadc949a0d8f5",  # 3650 bytes
    "ans": "d0411e3ce89427693d78bc6a82935fa88d5f392b45d3c63147b298f8b0cb42d6",  # 3741 bytes
    "cabac": "701a01d798feb85806ddfa88bcc2961d75c3188f8f60834fbb60e114faf8733f",  # 3665 bytes
    "half-grid-fold": "335b0f873832af64d9a9ea20119b4d9cd095a6af6317081e0d14895ab9351ed1",  # 3017 bytes
}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("label", PINNED_CONFIGS)
def test_a_seeded_models_file_bytes_are_pinned(label, tmp_path):
    path = tmp_path / f"{label}.dsz"
    compress_model(pinned_model(), path, PINNED_CONFIGS[label], meta={"pinned": True})
    assert sha256(path) == PINNED_SHA256[label]
