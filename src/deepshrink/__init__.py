"""deepshrink: Deep Compression (pruning, trained quantization, Huffman coding) for any PyTorch model.

Stages, each a function of a model: ``prune.prune_model``, ``train.train`` (retraining and centroid
fine-tuning too), ``quantize.quantize_model``, ``compress.compress_model``; ``deepshrink.load`` reads a
compressed file back.
"""

from .compress import load
from .errors import DeepShrinkError

__version__ = "0.1.0"
__all__ = ["DeepShrinkError", "load", "__version__"]
