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
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn

from .batchnorm import folded_batchnorms
from .codecs import AUTO, CODECS, EncodedTensor, Quantized, TensorToStore, codec_of, tensor_coders
from .codecs.common import StoredFloat, jsonable, stored_float
from .config import check_bits, check_patterns_match, first_match, pattern_values
from .errors import ConfigError
from .layers import as_patterns, tied_weights
from .parametrizations import PlainTensor, fold_zero_centroids, plain_tensors


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
    # than storing it raw; lossy like float16 (the error is at most half a step). One large value coarsens
    # every other: a folded BatchNorm's scale for a channel whose weights are all pruned can be hundreds
    # of times the rest (docs/log.md, ResNet-56). None keeps them raw
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


#: Tensors with fewer elements are encoded by every codec that takes them (the choice is exact); larger
#: ones skip a codec whose ``estimate_bytes`` shows it cannot be the smallest (``encode_tensor``)
ESTIMATE_FROM = 1 << 20


def encode_tensor(tensor: TensorToStore, config: EncodeConfig = EncodeConfig(), *,
                  exhaustive: bool = False) -> EncodedTensor:
    """The smallest of every codec's encoding of ``tensor`` (ties go to the codec registered first).

    From ``ESTIMATE_FROM`` elements on (unless ``exhaustive``), the codecs without an estimate are
    encoded first, and a codec with one (``TensorCodec.estimate_bytes``) only where its low bound does
    not exceed the smallest size or high bound found: the others cannot be chosen, so the choice is the
    same, without paying for every coder on every large tensor.

    Raises:
        ConfigError: no codec stores it (a dtype the format cannot hold), or bad values (see the codecs).
    """
    codecs = list(CODECS.values())
    bounds = {}
    if not exhaustive and _numel(tensor) >= ESTIMATE_FROM:
        bounds = {c.name: b for c in codecs if (b := c.estimate_bytes(tensor, config)) is not None}
    encoded = {c.name: c.encode(tensor, config) for c in codecs if c.name not in bounds}
    best = min([*(stored_bytes(e) for e in encoded.values() if e is not None), *(high for _, high in bounds.values())],
               default=math.inf)
    encoded.update({c.name: c.encode(tensor, config) for c in codecs if c.name in bounds and bounds[c.name][0] <= best})
    candidates = [encoded[c.name] for c in codecs if encoded.get(c.name) is not None]  # registration order
    if not candidates:
        raise ConfigError(f"{tensor.name}: no codec stores a {tensor.values.dtype} tensor with coder {config.coder!r}")
    return min(candidates, key=stored_bytes)  # min keeps the first of equal sizes


def _numel(tensor: TensorToStore) -> int:
    return tensor.quantized.indices.size if tensor.quantized is not None else tensor.values.numel()


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
    BatchNorms first (``batchnorm.fold_batchnorms``); the model itself is never modified. Every encoded
    tensor is held: ``compress.compress_model`` writes them one at a time instead (``model_tensors``)."""
    return {name: encode_tensor(make(), config) for name, make in model_tensors(model, config).items()}


def model_tensors(model: nn.Module, config: EncodeConfig = EncodeConfig()) -> dict[str, Callable[[], TensorToStore]]:
    """What ``encode_model`` encodes, by name in the plain state dict's order: for each tensor a function
    that makes its ``TensorToStore`` when called (a parametrized weight is computed then, so a walk
    holds one at a time). Every check of ``config`` against the model runs here, before any encoding.

    Raises:
        ConfigError: a pattern of ``config`` matches no quantized weight, or a BatchNorm cannot be folded.
    """
    tensors = plain_tensors(model)
    tied = tied_weights(model)
    shared = [name for name, t in tensors.items() if t.shared is not None]
    folded = {}
    if config.fold_batchnorm:  # a quantized or tied weight keeps its values: they are not BatchNorm's alone
        folded = folded_batchnorms(model, _Values(tensors), skip={*shared, *tied, *tied.values()})
    coded = _select_coded(shared, config)
    check_patterns_match(config.index_bits_by_pattern, shared, "index_bits_by_pattern")
    return {name: functools.partial(_to_store, t, folded.get(name), name in coded)
            for name, t in tensors.items() if name not in tied}


def _to_store(tensor: PlainTensor, folded: torch.Tensor | None, coded: bool) -> TensorToStore:
    quantized = None
    if coded:  # a centroid trained onto exactly 0 codes its weights as pruned: same values, fewer bits
        sw = tensor.shared
        centroids, indices = fold_zero_centroids(sw.centroids.detach().cpu().float(), sw.indices.detach().cpu())
        quantized = Quantized(indices.numpy(), centroids.numpy(), sw.bits)
    if folded is not None:
        values = folded.cpu()
    else:  # computed if a codec reads them: those of a weight coded over its codebook do not
        values = functools.partial(lambda t: t.value().cpu(), tensor)
    return TensorToStore(tensor.name, values, tensor.kind if tensor.shared is not None else None, quantized)


class _Values(Mapping):
    """The plain state dict as a mapping that computes a parametrized weight only when it is read."""

    def __init__(self, tensors: dict[str, PlainTensor]):
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name].value()

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _select_coded(names: list[str], config: EncodeConfig) -> set[str]:
    """The quantized weights to entropy code: ``include`` (None = all) minus ``exclude``."""
    check_patterns_match(tuple((p, None) for p in config.include or ()), names, "encode include")
    check_patterns_match(tuple((p, None) for p in config.exclude), names, "encode exclude")
    return {n for n in names if (config.include is None or any(fnmatch.fnmatchcase(n, p) for p in config.include))
            and not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)}
