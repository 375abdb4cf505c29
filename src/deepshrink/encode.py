"""Stage 4: choose how each tensor of a model is stored, and encode it (``encode_model``).

Every registered codec (``deepshrink.codecs``) is asked how it would store a tensor; the smallest
answer is written. A quantized weight gets the paper's relative indices and cluster symbols, entropy
coded by Huffman or ANS (``deep_compression``), or one context-coded stream of signed levels
(``cabac``); ``EncodeConfig.coder`` names one of them, or "auto" for the smallest. Every other tensor is
stored raw, as one repeated value (``constant``), or with ``grid_bits`` on a uniform grid of
context-coded levels (``grid``). ``format.py`` lays the encoded tensors out in a file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn

from .batchnorm import fold_batchnorms
from .codecs import AUTO, CODECS, EncodedTensor, Quantized, TensorToStore, codec_of, tensor_coders
from .codecs.common import StoredFloat, jsonable, stored_float
from .config import check_bits, check_patterns_match, first_match, pattern_values
from .errors import ConfigError
from .layers import as_patterns, tied_weights
from .parametrizations import fold_zero_centroids, plain_state_dict


@dataclass(frozen=True)
class EncodeConfig:
    """How ``compress_model`` writes a file. Every choice is recorded in the file itself."""

    # per layer the smallest of: the paper's layout with "huffman" (the paper's coder) or "ans" (closer to
    # the entropy), and "cabac" (one context-coded stream of levels); never larger than any one of them
    coder: str = AUTO
    index_bits_conv: int = 8  # paper: 8-bit relative indices for conv layers
    index_bits_fc: int = 5  # paper: 5 bits for fc layers (sparser rows, shorter runs)
    index_bits_by_pattern: tuple[tuple[str, int], ...] = ()  # (glob on weight FQN, bits); first match wins
    codebook_dtype: StoredFloat = StoredFloat.FLOAT32  # float32 keeps the decoded model bit-exact
    raw_dtype: StoredFloat = StoredFloat.FLOAT32  # biases/BN stats: few bytes, keep them exact
    include: tuple[str, ...] | None = None  # quantized weights to entropy code (FQN globs); None = all
    exclude: tuple[str, ...] = ()  # quantized weights stored raw instead (their effective values)
    # store each BatchNorm as a scale and a shift (``batchnorm.fold_batchnorms``). Off by default: the
    # decoded model computes the same function in eval mode, but its weight/bias are no longer the trained
    # gamma/beta and its running statistics are reset, so training the loaded model (train mode normalises
    # with batch statistics) starts from a different function
    fold_batchnorm: bool = False
    # round each 1-D float tensor (biases, norm scales) to a uniform grid of 2**grid_bits - 1 levels
    # spanning its largest magnitude and context-code the levels (``codecs.grid``), where that is smaller
    # than storing it raw; lossy like float16 (the error is at most half a step). None keeps them raw
    grid_bits: int | None = None

    def __post_init__(self):
        coder = self.coder.value if isinstance(self.coder, Enum) else self.coder
        if not isinstance(coder, str) or coder not in tensor_coders():
            raise ConfigError(f"unknown coder {self.coder!r}; valid: {', '.join(tensor_coders())}")
        object.__setattr__(self, "coder", coder)
        for label in ("codebook_dtype", "raw_dtype"):
            object.__setattr__(self, label, StoredFloat(stored_float(getattr(self, label), label)))
        for label in ("index_bits_conv", "index_bits_fc"):
            object.__setattr__(self, label, check_bits(getattr(self, label), label))
        object.__setattr__(self, "index_bits_by_pattern",
                           pattern_values(self.index_bits_by_pattern, "index_bits_by_pattern", check_bits))
        object.__setattr__(self, "include", None if self.include is None else as_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", as_patterns(self.exclude, "exclude"))
        if not isinstance(self.fold_batchnorm, bool):
            raise ConfigError(f"fold_batchnorm must be true or false, got {self.fold_batchnorm!r}")
        if self.grid_bits is not None:
            object.__setattr__(self, "grid_bits", check_bits(self.grid_bits, "grid_bits", low=2))

    def index_bits_for(self, fqn: str, kind: str | None) -> int:
        """Index bits for weight ``fqn`` of a layer of ``kind`` ("conv" or anything else = fc)."""
        bits = first_match(fqn, self.index_bits_by_pattern)
        if bits is not None:
            return bits
        return self.index_bits_conv if kind == "conv" else self.index_bits_fc

    def record(self) -> dict:
        """What a file records of how it was written (``meta["encode"]``)."""
        return jsonable(dataclasses.asdict(self))


def stored_bytes(encoded: EncodedTensor) -> int:
    """Bytes an encoded tensor adds to a file: its sections plus its share of the header."""
    return codec_of(encoded).stored_bytes(encoded)


def encode_tensor(tensor: TensorToStore, config: EncodeConfig = EncodeConfig()) -> EncodedTensor:
    """The smallest of every codec's encoding of ``tensor`` (ties go to the codec registered first).

    Raises:
        ConfigError: no codec stores it (a dtype the format cannot hold), or bad values (see the codecs).
    """
    candidates = [c for codec in CODECS.values() if (c := codec.encode(tensor, config)) is not None]
    if not candidates:
        raise ConfigError(f"{tensor.name}: no codec stores a {tensor.values.dtype} tensor with coder {config.coder!r}")
    return min(candidates, key=stored_bytes)  # min keeps the first of equal sizes


def encode_weight(
    indices: np.ndarray, codebook: np.ndarray, bits: int, index_bits: int, coder: str = "huffman",
    codebook_dtype: str = "float32", where: str = "tensor",
) -> EncodedTensor:
    """A quantized weight given as cluster indices (0 = pruned, k = codebook[k-1]) in the layout ``coder``
    names; "auto" keeps the smallest (huffman, ans, cabac on ties)."""
    config = EncodeConfig(coder=coder, index_bits_conv=index_bits, index_bits_fc=index_bits,
                          codebook_dtype=codebook_dtype)
    quantized = Quantized(np.asarray(indices), np.asarray(codebook), bits)
    return encode_tensor(TensorToStore(where, torch.empty(0), None, quantized), config)


def encode_model(model: nn.Module, config: EncodeConfig = EncodeConfig()) -> dict[str, EncodedTensor]:
    """Encode every tensor of the model's plain state dict: SharedWeights ones coded over their codebooks
    (those that ``config.include``/``exclude`` select), the rest as plain tensors. A tied tensor is encoded
    once, under its first name (``layers.tied_weights`` gives the others). ``config.fold_batchnorm`` folds
    BatchNorms first (``batchnorm.fold_batchnorms``); the model itself is never modified."""
    plain, shared = plain_state_dict(model)
    tied = tied_weights(model)
    if config.fold_batchnorm:  # a quantized or tied weight keeps its values: they are not BatchNorm's alone
        plain = fold_batchnorms(model, plain, skip={*shared, *tied, *tied.values()})
    coded = _select_coded(list(shared), config)
    check_patterns_match(config.index_bits_by_pattern, list(shared), "index_bits_by_pattern")
    encoded: dict[str, EncodedTensor] = {}
    for name, tensor in plain.items():
        if name in tied:
            continue
        kind, quantized = None, None
        if name in shared:
            sw, kind = shared[name]
            if name in coded:
                # a centroid trained onto exactly 0 codes its weights as pruned: same values, fewer bits
                centroids, indices = fold_zero_centroids(sw.centroids.detach().cpu().float(), sw.indices.detach().cpu())
                quantized = Quantized(indices.numpy(), centroids.numpy(), sw.bits)
        encoded[name] = encode_tensor(TensorToStore(name, tensor.detach().cpu(), kind, quantized), config)
    return encoded


def _select_coded(names: list[str], config: EncodeConfig) -> set[str]:
    """The quantized weights to entropy code: ``include`` (None = all) minus ``exclude``."""
    check_patterns_match(tuple((p, None) for p in config.include or ()), names, "encode include")
    check_patterns_match(tuple((p, None) for p in config.exclude), names, "encode exclude")
    return {n for n in names if (config.include is None or any(fnmatch.fnmatchcase(n, p) for p in config.include))
            and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)}
