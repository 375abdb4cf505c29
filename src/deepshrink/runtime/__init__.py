"""The sparse runtime: a compressed model running on its compressed weights (the paper's section 6).

``load`` (``model.py``) builds the model with its pruned layers on CSR codebook kernels
(``kernels.py``); ``report`` says what it chose per layer; ``benchmark`` (``benchmark.py``) times it
against the dense model in one process.
"""

from .benchmark import BENCH_COLUMNS, benchmark
from .kernels import CsrCodebook, codebook_matmul, csr_from_positions
from .model import KERNELS, LayerChoice, RuntimeReport, SparseLinear, compressed_forms, load, read_compressed, report, weight_bytes

__all__ = ["BENCH_COLUMNS", "KERNELS", "CsrCodebook", "LayerChoice", "RuntimeReport", "SparseLinear", "benchmark",
           "codebook_matmul", "compressed_forms", "csr_from_positions", "load", "read_compressed", "report",
           "weight_bytes"]
