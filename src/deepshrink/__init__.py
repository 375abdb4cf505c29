"""deepshrink: Deep Compression (pruning, trained quantization, Huffman coding) for any PyTorch model.

Stages, each a function of a model: ``prune.prune_model``, ``train.train`` (retraining and centroid
fine-tuning too), ``quantize.quantize_model``, ``compress.compress_model``; ``deepshrink.load`` reads a
compressed file back, densely or (``runtime="sparse"``) running on the compressed weights.
"""

from __future__ import annotations

import os

from .compress import load as _load_dense
from .errors import ConfigError, DeepShrinkError

__version__ = "0.1.0"
__all__ = ["DeepShrinkError", "load", "RUNTIMES", "__version__"]

RUNTIMES = ("dense", "sparse")


def load(path: str | os.PathLike, map_location=None, *, runtime: str = "dense", **kwargs):
    """Load a compressed file.

    ``runtime="dense"`` (default): ``compress.load``, every weight decoded to float32 (a model for
    built-in specs or the given ``model=``, else the state dict). ``runtime="sparse"``: ``deepshrink.runtime.load``, pruned
    Linear/1x1-conv layers run on their compressed form; extra keyword arguments (``batch_size``,
    ``kernels``, ``model``...) go to it.

    Raises:
        ConfigError: an unknown runtime name; otherwise the errors of the chosen loader.
    """
    if runtime == "dense":
        return _load_dense(path, map_location, **kwargs)
    if runtime == "sparse":
        from .runtime import load as load_sparse

        return load_sparse(path, device=map_location or "cpu", **kwargs)
    raise ConfigError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
