"""Run a compressed model without densifying it: sparse, shared-weight inference (the paper's section 6).

``load(path, batch_size)`` opens a ``.dsz`` file through the gate (``format.open_file``), checks that it
fits the model (``compress.model_for``), decodes each quantized weight into its compressed form
(``kernels.CsrCodebook``: never a dense matrix), and replaces each pruned ``nn.Linear`` (and 1x1
``nn.Conv2d``) by a layer that runs on one of three kernels, chosen per layer by timing all of them
once at load time on an input of the requested batch size:

- ``"codebook"``: the numba kernels of ``kernels.py`` over the CSR form, gathering each weight from the
  codebook as they go (3 bytes per kept weight against the dense layer's 4 per weight). Quantized
  weights only.
- ``"torch_csr"``: ``torch.sparse_csr_tensor`` with float32 values and int32 indices (8 bytes per
  non-zero); the only sparse kernel for pruned but unquantized (raw) weights, and the one used on CUDA.
- ``"dense"``: the plain ``nn.Linear`` with the decoded float32 weight: wins on small layers and
  large batches. Only a layer that runs dense ever holds a dense weight (timing it at load builds
  one transiently).

The choice, every candidate's median time and each form's resident bytes are in ``report(model)``
and logged. The replaced layers are for inference: their forward runs without autograd.

CUDA: ``device="cuda"`` measures ``torch_csr`` against dense on the GPU (written against the
documented ``torch.sparse`` API; our development machine has no GPU, so it is untested there).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compress import model_for
from ..errors import ConfigError, TensorInfoMismatch
from ..format import DEFAULT_MAX_EXPANSION, CompressedFile, open_file
from .kernels import CsrCodebook, codebook_matmul, csr_from_positions, dense_csr_parts, torch_csr

log = logging.getLogger(__name__)

KERNELS = ("codebook", "torch_csr", "dense")
CPU_KERNELS = KERNELS
CUDA_KERNELS = ("torch_csr", "dense")  # numba's kernel is CPU code
DEFAULT_REPEATS = 15  # timed calls per candidate at load time (after one warm-up call); the median decides
#: A kernel this close to the fastest counts as fast: the smaller form wins (memory is what the file
#: saves; a 10% timing difference is within the noise of a shared machine).
CLOSE_ENOUGH = 1.10
#: Layers whose dense float32 weight is smaller than this stay dense without timing (when "dense" is a
#: candidate): the sparse layer's own Python work per call (~30 us) outweighs what a cache-resident
#: weight could save, and sub-0.1 ms timings on a shared machine are mostly noise.
MIN_SPARSE_BYTES = 1 << 18
ONE_THREAD = "codebook/1-thread"  # the codebook kernel capped at one thread, timed beside the default


def compressed_forms(file: CompressedFile) -> dict[str, CsrCodebook | torch.Tensor]:
    """Every stored tensor of a checked file: quantized weights as ``CsrCodebook`` (decoded to positions and
    cluster indices, never dense), the others decoded as CPU tensors."""
    forms: dict[str, CsrCodebook | torch.Tensor] = {}
    for name, encoded in file.encoded.items():
        if not file.is_weight(name):  # biases, statistics, grids: dense
            forms[name] = file.decode(name)
            continue
        positions, symbols = file.nonzeros(name)
        forms[name] = csr_from_positions(encoded.shape, positions, symbols, encoded.codebook)
    return forms


def read_compressed(path: str | os.PathLike, *, max_expansion: int = DEFAULT_MAX_EXPANSION,
                    max_memory: int | None = None) -> tuple[dict, dict[str, CsrCodebook | torch.Tensor]]:
    """(header, ``compressed_forms``) of a ``.dsz`` file, read through the gate (``format.open_file``).

    Raises:
        every error of ``format.read_file``.
    """
    file = open_file(path, max_expansion=max_expansion, max_memory=max_memory)
    return file.header, compressed_forms(file)


# ---------------------------------------------------------------- layers


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W held compressed (kernel "codebook" or "torch_csr"); inference only.

    With ``conv_stride`` set it is a 1x1 convolution (groups 1, no padding): every output pixel is
    a column of the product.
    """

    def __init__(self, in_features: int, out_features: int, kernel: str, *, form: CsrCodebook | None = None,
                 csr: torch.Tensor | None = None, bias: torch.Tensor | None = None, conv_stride: int | None = None,
                 max_threads: int | None = None):
        super().__init__()
        if kernel not in ("codebook", "torch_csr"):
            raise ConfigError(f"SparseLinear kernel must be 'codebook' or 'torch_csr', got {kernel!r}")
        if (kernel == "codebook") != (form is not None) or (kernel == "torch_csr") != (csr is not None):
            raise ConfigError(f"SparseLinear({kernel!r}): pass form= for 'codebook', csr= for 'torch_csr'")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.conv_stride = conv_stride
        self.max_threads = max_threads  # codebook kernel: None = torch.get_num_threads()
        self.form = form  # numpy arrays: the numba kernel's operands
        # non-persistent: the file, not a state dict, is this layer's storage
        self.register_buffer("csr", csr, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32), persistent=False)

    def extra_repr(self) -> str:
        nnz = self.form.nnz if self.form is not None else int(self.csr.values().numel())
        conv = f", conv 1x1 stride {self.conv_stride}" if self.conv_stride else ""
        threads = f", max_threads={self.max_threads}" if self.max_threads else ""
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, nnz={nnz}{conv}{threads}"

    def weight_bytes(self) -> int:
        """Bytes of every tensor this layer holds (the compressed weight and the bias)."""
        held = self.form.nbytes if self.form is not None else _tensor_bytes(self.csr)
        return held + (_tensor_bytes(self.bias) if self.bias is not None else 0)

    def product_t(self, xt: torch.Tensor) -> torch.Tensor:
        """(in, B) -> (out, B), bias added."""
        if self.kernel == "codebook":
            if xt.device.type != "cpu":
                raise ConfigError(f"the codebook kernel runs on the CPU, got input on {xt.device}; load with "
                                  "device='cuda' to run torch_csr there")
            return codebook_matmul(self.form, xt, self.bias, self.max_threads)
        y = self.csr @ xt.to(torch.float32)
        return y if self.bias is None else y + self.bias[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.conv_stride:
                return self._conv(x)
            lead = x.shape[:-1]
            xt = x.reshape(-1, self.in_features).t()  # (in, B); a transposed output of ours is contiguous here
            return self.product_t(xt).t().reshape(*lead, self.out_features)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_stride
        x = x[:, :, ::s, ::s]
        n, c, h, w = x.shape
        xt = x.permute(1, 0, 2, 3).reshape(c, n * h * w)
        return self.product_t(xt).reshape(self.out_features, n, h, w).permute(1, 0, 2, 3)


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        return sum(_tensor_bytes(p) for p in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every tensor a model holds: parameters, buffers, compressed forms."""
    total = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total += module.weight_bytes()
            continue
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                total += _tensor_bytes(t)
    return total


# ---------------------------------------------------------------- choosing a kernel per layer


@dataclass
class LayerChoice:
    """What the runtime chose for one layer, and why (median milliseconds per candidate)."""

    name: str
    kind: str  # "linear" or "conv1x1"
    shape: tuple[int, ...]
    density: float  # kept fraction of the weight
    stored: str  # "quantized" or "raw"
    kernel: str
    max_threads: int | None = None  # the codebook kernel capped at one thread when that timed faster
    times_ms: dict[str, float] = field(default_factory=dict)  # per candidate (KERNELS, ONE_THREAD)
    bytes: dict[str, int] = field(default_factory=dict)  # resident weight bytes of each candidate

    @property
    def label(self) -> str:
        """The chosen candidate's key in ``times_ms``/``bytes``."""
        return ONE_THREAD if self.max_threads == 1 and self.kernel == "codebook" else self.kernel

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "density": self.density,
                "stored": self.stored, "kernel": self.kernel, "max_threads": self.max_threads,
                "times_ms": dict(self.times_ms), "bytes": dict(self.bytes)}


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | str = "cpu"
              ) -> dict[str, float]:
    """Median wall time in milliseconds of each ``fns[k]()`` over ``repeats`` calls, after one warm-up call.

    The functions are timed in turn within each repeat, so on a shared, noisy machine every
    candidate sees the same load; the median drops the calls that lost the CPU.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _eligible(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.padding in ((0, 0), "valid") and module.stride[0] == module.stride[1]):
        return "conv1x1"
    return None


def _candidates(module: nn.Module, kind: str, stored: CsrCodebook | torch.Tensor, bias: torch.Tensor | None,
                kernels: Sequence[str], device: torch.device) -> dict[str, Callable[[], nn.Module]]:
    """A builder per candidate layer: the requested kernels that can run this weight, else dense."""
    out_f = module.out_features if kind == "linear" else module.out_channels
    in_f = module.in_features if kind == "linear" else module.in_channels
    stride = module.stride[0] if kind == "conv1x1" else None
    bias_dev = None if bias is None else bias.to(device)
    builders: dict[str, Callable[[], nn.Module]] = {}
    quantized = isinstance(stored, CsrCodebook)

    def dense() -> nn.Module:
        weight = stored.dense() if quantized else stored
        layer = (nn.Linear(in_f, out_f, bias=bias is not None, device="meta") if kind == "linear" else
                 nn.Conv2d(in_f, out_f, 1, stride=stride, bias=bias is not None, device="meta"))
        layer.weight = nn.Parameter(weight.to(torch.float32).to(device).reshape(layer.weight.shape),
                                    requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias_dev.to(torch.float32), requires_grad=False)
        return layer

    def csr() -> nn.Module:
        if quantized:
            parts = (stored.crow, stored.col[: stored.nnz], stored.values())
        else:
            parts = dense_csr_parts(stored.reshape(out_f, -1))
        return SparseLinear(in_f, out_f, "torch_csr", csr=torch_csr((out_f, in_f), *parts, device=device),
                            bias=bias_dev, conv_stride=stride)

    def codebook(max_threads: int | None = None) -> nn.Module:
        return SparseLinear(in_f, out_f, "codebook", form=stored, bias=bias, conv_stride=stride,
                            max_threads=max_threads)

    if not any(k == "torch_csr" or (k == "codebook" and quantized) for k in kernels):
        kernels = ("dense",)  # no requested kernel runs this layer (a raw weight asked to use the codebook)
    for kernel in kernels:
        if kernel == "dense":
            builders[kernel] = dense
        elif kernel == "torch_csr":
            builders[kernel] = csr
        elif kernel == "codebook" and quantized:
            builders[kernel] = codebook
            if torch.get_num_threads() > 1:
                # on a busy machine a second thread can cost more than it gives: time one thread too
                builders[ONE_THREAD] = lambda: codebook(max_threads=1)
    return builders


def _example_input(module: nn.Module, kind: str, batch_size: int, device: torch.device,
                   input_hw: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        return torch.randn(batch_size, module.in_features, generator=gen).to(device)
    return torch.randn(batch_size, module.in_channels, *input_hw, generator=gen).to(device)


def choose_layer(name: str, module: nn.Module, kind: str, stored: CsrCodebook | torch.Tensor,
                 bias: torch.Tensor | None, *, batch_size: int, kernels: Sequence[str], repeats: int,
                 device: torch.device, input_hw: tuple[int, int] = (8, 8),
                 min_sparse_bytes: int = MIN_SPARSE_BYTES) -> tuple[nn.Module, LayerChoice]:
    """Time every candidate kernel for one layer on a random input of ``batch_size``; keep the fastest.

    A layer whose dense weight is under ``min_sparse_bytes`` keeps only the dense candidate, if
    "dense" is among ``kernels``.

    With a single candidate nothing is timed. Of the candidates within ``CLOSE_ENOUGH`` of the
    fastest, the one holding the fewest bytes wins.
    """
    numel = math.prod(stored.shape)
    small = "dense" in kernels and 4 * numel < min_sparse_bytes
    builders = _candidates(module, kind, stored, bias, ("dense",) if small else kernels, device)
    quantized = isinstance(stored, CsrCodebook)
    nnz = stored.nnz if quantized else int(torch.count_nonzero(stored))
    choice = LayerChoice(name, kind, tuple(stored.shape), nnz / numel if numel else 0.0,
                         "quantized" if quantized else "raw", kernel="")
    layers = {label: build() for label, build in builders.items()}  # a dense candidate lives only until we return
    choice.bytes = {label: weight_bytes(layer) for label, layer in layers.items()}
    if len(layers) > 1:
        x = _example_input(module, kind, batch_size, device, input_hw)
        with torch.no_grad():
            choice.times_ms = median_ms({k: (lambda layer=layer: layer(x)) for k, layer in layers.items()},
                                        repeats, device)
        fastest = min(choice.times_ms.values())
        close = [k for k, ms in choice.times_ms.items() if ms <= CLOSE_ENOUGH * fastest]
        label = min(close, key=lambda k: (choice.bytes[k], choice.times_ms[k]))
    else:
        label = next(iter(layers))
    layer = layers[label]
    choice.kernel = layer.kernel if isinstance(layer, SparseLinear) else "dense"
    choice.max_threads = getattr(layer, "max_threads", None)
    return layer, choice


# ---------------------------------------------------------------- the entry point


def _check_kernels(kernels: Sequence[str] | None, device: torch.device) -> tuple[str, ...]:
    allowed = CUDA_KERNELS if device.type == "cuda" else CPU_KERNELS
    if kernels is None:
        return allowed
    if isinstance(kernels, str):
        kernels = (kernels,)
    kernels = tuple(kernels)
    bad = [k for k in kernels if k not in allowed]
    if bad or not kernels:
        raise ConfigError(f"unknown or unavailable kernel(s) {bad or kernels!r} on {device.type}; "
                          f"valid: {', '.join(allowed)}")
    return kernels


def _resolve(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def load(
    path: str | os.PathLike,
    batch_size: int = 1,
    *,
    model: nn.Module | None = None,
    kernels: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    repeats: int = DEFAULT_REPEATS,
    conv_input_hw: tuple[int, int] = (8, 8),
    min_sparse_bytes: int = MIN_SPARSE_BYTES,
    trust_factory: bool = False,
    max_expansion: int = DEFAULT_MAX_EXPANSION,
    max_memory: int | None = None,
) -> nn.Module:
    """Build the file's model with its pruned layers running on compressed weights.

    Args:
        path: a ``.dsz`` file, or one already opened by ``format.open_file``.
        batch_size: the batch size each layer's kernel is chosen for (1 = the latency case).
        model: the architecture to fill (any device, meta included); default: built from the file's spec.
        kernels: candidate kernels (names in ``KERNELS``), timed against each other per layer; default
            every one the device runs. A single name forces it wherever it applies; a layer none of
            them can run (a raw weight when only "codebook" is asked for) runs dense.
        device: "cpu" or a CUDA device.
        repeats: timed calls per candidate when choosing.
        conv_input_hw: spatial size of the random input used to time 1x1 convolutions.
        min_sparse_bytes: layers whose dense float32 weight is smaller stay dense untimed (when
            "dense" is a candidate); 0 times every layer.
        trust_factory, max_expansion, max_memory: as for ``deepshrink.load``.

    Returns:
        the model in eval mode; ``report(model)`` lists each layer's choice.

    Raises:
        ConfigError: bad batch size, repeats, kernel name or device, or no architecture to build;
        TensorInfoMismatch: the file does not fit the model; the errors of ``format.read_file``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(min_sparse_bytes, bool) or not isinstance(min_sparse_bytes, int) or min_sparse_bytes < 0:
        raise ConfigError(f"min_sparse_bytes must be an integer >= 0, got {min_sparse_bytes!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested, but torch sees no CUDA device")
    kernels = _check_kernels(kernels, device)
    file = path if isinstance(path, CompressedFile) else open_file(path, max_expansion=max_expansion,
                                                                   max_memory=max_memory)
    net = model_for(file, model, trust_factory=trust_factory, on_meta=True)  # every shape checked, nothing decoded
    if net is None:
        spec = file.model_spec
        raise ConfigError(f"{file.path}: the file has no model spec; pass the architecture as model=" if spec is None
                          else f"{file.path}: the file names the factory {spec['factory']!r}; pass trust_factory=True "
                          "to build it (this runs its code) or the architecture as model=")
    stored = file.with_aliases(compressed_forms(file))  # a tied tensor, stored once, under each of its names
    path = file.path

    choices: dict[str, LayerChoice] = {}
    for fqn, module in list(net.named_modules()):
        kind = _eligible(module)
        weight_name = f"{fqn}.weight" if fqn else "weight"
        if kind is None or weight_name not in stored:
            continue
        weight = stored[weight_name]
        if not isinstance(weight, CsrCodebook) and not weight.dtype.is_floating_point:
            continue
        bias_name = f"{fqn}.bias" if fqn else "bias"
        bias = stored.get(bias_name) if getattr(module, "bias", None) is not None else None
        layer, choice = choose_layer(fqn, module, kind, weight, bias, batch_size=batch_size, kernels=kernels,
                                     repeats=repeats, device=device, input_hw=conv_input_hw,
                                     min_sparse_bytes=min_sparse_bytes)
        choices[fqn] = choice
        log.info("%s: %s %s, %.1f%% kept -> %s (%s)", fqn, choice.stored, kind, 100 * choice.density, choice.label,
                 ", ".join(f"{k} {v:.3f} ms" for k, v in choice.times_ms.items()) or "not timed")
        if choice.kernel == "dense":
            continue  # the model's own layer stays; its weight is decoded with the other tensors below
        for key in (weight_name, bias_name):
            stored.pop(key, None)
        if fqn:
            parent, child = _resolve(net, fqn)
            setattr(parent, child, layer)
        else:
            net = layer
    # every other tensor: assign the file's (the model may be on the meta device)
    decoded: dict[int, torch.Tensor] = {}  # by object: tied names share one dense tensor

    def materialise(v) -> torch.Tensor:
        if id(v) not in decoded:
            decoded[id(v)] = (v if isinstance(v, torch.Tensor) else v.dense()).to(device)
        return decoded[id(v)]

    rest = {k: materialise(v) for k, v in stored.items()}
    try:
        net.load_state_dict(rest, strict=True, assign=True)
    except RuntimeError as e:
        raise TensorInfoMismatch(f"{path}: tensors do not fit the model: {e}") from None
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.deepshrink_runtime = RuntimeReport(str(path), batch_size, device.type, torch.get_num_threads(), choices)
    return net


@dataclass
class RuntimeReport:
    """What ``load`` chose for each eligible layer, for which batch size, threads and device."""

    path: str
    batch_size: int
    device: str
    threads: int
    layers: dict[str, LayerChoice]

    def to_dict(self) -> dict:
        return {"path": self.path, "batch_size": self.batch_size, "device": self.device, "threads": self.threads,
                "layers": {k: v.to_dict() for k, v in self.layers.items()}}


def report(model: nn.Module) -> RuntimeReport:
    """The per-layer choices of a model built by ``load``.

    Raises:
        ConfigError: the model was not built by ``deepshrink.runtime.load``.
    """
    found = getattr(model, "deepshrink_runtime", None)
    if not isinstance(found, RuntimeReport):
        raise ConfigError("this model was not built by deepshrink.runtime.load (no runtime report)")
    return found
