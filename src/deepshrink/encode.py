"""Stage 4: choose how each tensor of a model is stored, and encode it (``encode_model``).

A quantized weight is stored in the layout its codec gives (``deepshrink.codecs``): the paper's
relative indices and cluster symbols, entropy coded by Huffman or ANS (``deep_compression``), or one
context-coded stream of signed levels (``cabac``); ``EncodeConfig(coder="auto")`` writes each layer in
whichever is smaller. Every other tensor is stored raw (``constant`` when all its elements are one
value), or with ``EncodeConfig(grid_bits=b)`` a 1-D float tensor on a uniform grid of context-coded
levels (``grid``) where that is smaller. ``format.py`` lays the encoded tensors out in a file and
reads them back from untrusted bytes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn

from .batchnorm import fold_batchnorms
from .codecs import EncodedTensor, codec_of
from .codecs.cabac import encode_levels
from .codecs.common import StoredFloat, stored_float
from .codecs.deep_compression import encode_quantized
from .codecs.grid import encode_grid
from .codecs.raw import RawTensor, encode_raw
from .coding import CODERS
from .parametrizations import fold_zero_centroids, plain_state_dict
from .config import check_bits, check_patterns_match, first_match, pattern_values
from .errors import ConfigError
from .layers import as_patterns, tied_weights

Encoded = EncodedTensor  # any registered codec's tensor (RawTensor, CodedTensor, CabacTensor, GridTensor...)

CABAC = "cabac"  # the one-stream layout's coder name (not a symbol coder of deepshrink.coding.CODERS)
AUTO = "auto"  # per tensor, the smallest of every layout and coder


@dataclass(frozen=True)
class EncodeConfig:
    """How ``compress_model`` writes a file. Every choice is recorded in the file itself."""

    # per layer the smallest of: the paper's layout with "huffman" (the paper's coder) or "ans" (closer to
    # the entropy), and "cabac" (one context-coded stream of levels); never larger than any one of them
    coder: str = "auto"
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
    # spanning its largest magnitude and context-code the levels (``encode_grid``), where that is smaller
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

    def index_bits_for(self, fqn: str, kind: str) -> int:
        """Index bits for weight ``fqn`` of a layer of ``kind`` ("conv" or anything else = fc)."""
        bits = first_match(fqn, self.index_bits_by_pattern)
        if bits is not None:
            return bits
        return self.index_bits_conv if kind == "conv" else self.index_bits_fc


def tensor_coders() -> list[str]:
    """Valid ``EncodeConfig.coder`` values: the symbol coders, "cabac" and "auto"."""
    return [*sorted(CODERS), CABAC, AUTO]


def stored_bytes(encoded: Encoded) -> int:
    """Bytes an encoded tensor adds to a file: its sections plus its share of the header."""
    return codec_of(encoded).stored_bytes(encoded)


def encode_weight(
    indices: np.ndarray, codebook: np.ndarray, bits: int, index_bits: int, coder: str = "huffman",
    codebook_dtype: str = "float32", where: str = "tensor",
) -> Encoded:
    """A quantized weight in the layout ``coder`` names; "auto" tries huffman, ans and cabac and keeps the
    smallest by ``stored_bytes`` (ties go to that order)."""
    if coder == CABAC:
        return encode_levels(indices, codebook, bits, codebook_dtype, where)
    if coder != AUTO:
        return encode_quantized(indices, codebook, bits, index_bits, coder, codebook_dtype, where)
    candidates = [encode_quantized(indices, codebook, bits, index_bits, name, codebook_dtype, where)
                  for name in sorted(CODERS, key=lambda n: (n != "huffman", n))]
    candidates.append(encode_levels(indices, codebook, bits, codebook_dtype, where))
    return min(candidates, key=stored_bytes)  # min keeps the first of equal sizes


def encode_model(model: nn.Module, config: EncodeConfig = EncodeConfig()) -> dict[str, Encoded]:
    """Encode every tensor of the model's plain state dict: SharedWeights ones coded (those that
    ``config.include``/``exclude`` select), the rest raw. A tied tensor is encoded once, under its first
    name (``layers.tied_weights`` gives the others). ``config.fold_batchnorm`` folds BatchNorms first
    (``batchnorm.fold_batchnorms``); the model itself is never modified."""
    plain, shared = plain_state_dict(model)
    tied = tied_weights(model)
    if config.fold_batchnorm:  # a quantized or tied weight keeps its values: they are not BatchNorm's alone
        plain = fold_batchnorms(model, plain, skip={*shared, *tied, *tied.values()})
    coded = _select_coded(list(shared), config)
    check_patterns_match(config.index_bits_by_pattern, list(shared), "index_bits_by_pattern")
    encoded: dict[str, Encoded] = {}
    for name, tensor in plain.items():
        if name in tied:
            continue
        if name in coded:
            sw, kind = shared[name]
            # a centroid trained onto exactly 0 codes its weights as pruned: same values, fewer bits
            centroids, indices = fold_zero_centroids(sw.centroids.detach().cpu().float(), sw.indices.detach().cpu())
            encoded[name] = encode_weight(
                indices.numpy(), centroids.numpy(), sw.bits,
                config.index_bits_for(name, kind), config.coder, config.codebook_dtype, where=name,
            )
        else:
            encoded[name] = _encode_plain(tensor, config, name)
    return encoded


def _encode_plain(tensor: torch.Tensor, config: EncodeConfig, where: str) -> Encoded:
    """A tensor that is not a coded weight: raw (or constant); with ``grid_bits``, a 1-D float tensor
    on its grid where that is smaller."""
    raw = encode_raw(tensor, config.raw_dtype, where)
    if config.grid_bits is None or not isinstance(raw, RawTensor) or tensor.dim() != 1 \
            or not tensor.dtype.is_floating_point:
        return raw
    grid = encode_grid(tensor.detach().cpu().float().numpy(), config.grid_bits, where)
    return grid if grid is not None and stored_bytes(grid) < stored_bytes(raw) else raw


def _select_coded(names: list[str], config: EncodeConfig) -> set[str]:
    """The quantized weights to entropy code: ``include`` (None = all) minus ``exclude``."""
    check_patterns_match(tuple((p, None) for p in config.include or ()), names, "encode include")
    check_patterns_match(tuple((p, None) for p in config.exclude), names, "encode exclude")
    return {n for n in names if (config.include is None or any(fnmatch.fnmatchcase(n, p) for p in config.include))
            and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)}


