"""deepshrink: Deep Compression (pruning, trained quantization, Huffman coding) for any PyTorch model."""

__version__ = "0.1.0"
