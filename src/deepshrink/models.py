"""Model architectures, specs that rebuild them, and loading of foreign (user/pretrained) weights.

A model is described by a JSON-able spec so checkpoints and compressed files can rebuild it:
``{"arch": "resnet20", "kwargs": {}}`` for a built-in, ``{"factory": "pkg.module:fn", "kwargs": {}}``
for a user's own model.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError, DeepShrinkError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds a model constructor to ``MODELS`` under ``name``."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ConfigError(f"model name {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return add


def _kaiming_init(module: nn.Module) -> None:
    # He et al. initialisation for every conv/linear weight, as the CIFAR ResNet reference does
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


# ---------------------------------------------------------------- MNIST / digits


class MLP(nn.Module):
    """Fully connected ReLU network on flattened images."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        sizes = (in_features, *hidden, num_classes)
        # named fc1..fcN so layer names read like the paper's tables
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out))
        self.num_layers = len(sizes) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = F.relu(x)
        return x


@register_model("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: tuple[int, ...] = (256, 128)) -> MLP:
    """Small MLP for sklearn's 8x8 digits: 64-256-128-10 by default."""
    if not hidden or any(int(h) < 1 for h in hidden):
        raise ConfigError(f"mlp: hidden must be a non-empty list of positive sizes, got {hidden!r}")
    return MLP(in_channels * image_size * image_size, tuple(int(h) for h in hidden), num_classes)


@register_model("lenet300")
def lenet300(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> MLP:
    """LeNet-300-100 (784-300-100-10, ReLU), the paper's MNIST MLP: 266,610 parameters."""
    return MLP(in_channels * image_size * image_size, (300, 100), num_classes)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as used in the paper: two conv+maxpool stages, fc 500, ReLU, fc 10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)  # (B, 20, 12, 12); Caffe's LeNet has no ReLU after convs
        x = F.max_pool2d(self.conv2(x), 2)  # (B, 50, 4, 4)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """LeNet-5 (Caffe variant) for 28x28 inputs: 431,080 parameters."""
    return LeNet5(num_classes, in_channels)


# ---------------------------------------------------------------- CIFAR ResNets
# Module and parameter names follow akamaster/pytorch_resnet_cifar10 exactly so its pretrained
# checkpoints load with strict=True.


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or option-A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_projection = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(planes - in_planes) if needs_projection else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 3 stages of n blocks with 16/32/64 channels."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        for i, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = [BasicBlock(planes, width, stride)] + [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            planes = width
        self.linear = nn.Linear(64, num_classes)
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (B, 64)
        return self.linear(out)


def _register_resnet(depth: int) -> None:
    def build(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
        return CifarResNet((depth - 2) // 6, num_classes, in_channels)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)."
    register_model(f"resnet{depth}")(build)


for _depth in (20, 32, 44, 56):
    _register_resnet(_depth)


# ---------------------------------------------------------------- specs


def model_spec(name_or_factory: str, **kwargs: Any) -> dict[str, Any]:
    """Spec for a built-in (``"resnet20"``) or a factory (``"pkg.module:fn"``) with its kwargs."""
    key = "factory" if ":" in name_or_factory else "arch"
    return {key: name_or_factory, "kwargs": dict(kwargs)}


def _import_factory(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model factory {target!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model factory {target!r}: cannot import module {module_name!r} ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model factory {target!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model factory {target!r} is not callable (got {type(obj).__name__})")
    return obj


#: Most parameter and buffer elements ``build_model`` will allocate (2**31 float32 = 8 GiB). A spec comes
#: from files (checkpoints, recipes), so ``{"hidden": [1e6, 1e6]}`` must fail before it asks for 4 TB.
#: The largest shipped model (ResNet-56) holds under 2**20; raise it only for specs you trust.
MAX_MODEL_ELEMENTS = 1 << 31
#: A spec as JSON: real ones are a name and a few kwargs; a long ``hidden`` list could ask for
#: millions of modules, which cost time even on the meta device. The compressed file has the same cap.
MAX_SPEC_BYTES = 16 << 10

TRUST_HINT = "pass --trust-factory on the command line or trust_factory=True in Python"


def build_model(
    spec: dict[str, Any] | str, *, trust_factory: bool = False, max_elements: int = MAX_MODEL_ELEMENTS
) -> nn.Module:
    """Build a model from a spec (see module docstring) or a bare name/factory string.

    The model is first built on the ``meta`` device (no memory) and its state dict elements counted,
    so a spec asking for a huge model fails before anything is allocated.

    Args:
        trust_factory: a ``{"factory": "pkg.module:fn"}`` spec imports and runs the code it names, so
            it is built only when the caller trusts where the spec came from. Specs read from files
            (checkpoints, compressed files, recipes) are untrusted unless the user says otherwise.
        max_elements: most parameter and buffer elements the model may hold.

    Raises:
        ConfigError: unknown arch (the message lists the valid names), a malformed spec, an untrusted
            factory (refused before anything is imported), a factory that cannot be imported, is not
            callable or does not return an ``nn.Module``, kwargs the constructor rejects, or a model
            larger than ``max_elements``.
    """
    if isinstance(spec, str):
        spec = model_spec(spec)
    if not isinstance(spec, dict) or ("arch" in spec) == ("factory" in spec):
        raise ConfigError(f"model spec {spec!r}: expected a dict with exactly one of 'arch' or 'factory'")
    spec_bytes = len(json.dumps(spec, default=repr))
    if spec_bytes > MAX_SPEC_BYTES:
        raise ConfigError(f"model spec of {spec_bytes} bytes exceeds {MAX_SPEC_BYTES} (real specs are a name and a "
                          "few kwargs)")
    unknown = sorted(set(spec) - {"arch", "factory", "kwargs"})
    if unknown:
        raise ConfigError(f"model spec {spec!r}: unknown key(s) {unknown}; valid: arch or factory, kwargs")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"model spec {spec!r}: 'kwargs' must be a dict with string keys, got {type(kwargs).__name__}")
    if "arch" in spec:
        label = spec["arch"]
        fn = MODELS.get(label) if isinstance(label, str) else None
        if fn is None:
            raise ConfigError(f"unknown model arch {label!r}; valid: {', '.join(sorted(MODELS))}")
    else:
        label = spec["factory"]
        if not isinstance(label, str):
            raise ConfigError(f"model spec {spec!r}: 'factory' must be a 'package.module:function' string")
        if not trust_factory:  # checked before importing anything: importing a module runs its code
            raise ConfigError(f"model factory {label!r} would import and run code named by the spec, which is "
                              f"not trusted; if you trust its source, {TRUST_HINT}")
        fn = _import_factory(label)
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 0:
        raise ConfigError(f"max_elements must be an integer >= 0, got {max_elements!r}")
    try:
        with torch.device("meta"):  # shapes without memory
            elements = sum(t.numel() for t in _construct(fn, label, kwargs).state_dict().values())
    except Exception:
        if "arch" in spec:  # built-ins run on the meta device: this is the constructor's verdict
            raise
        elements = 0  # a trusted factory whose code cannot run on the meta device: the real build decides
    if elements > max_elements:
        raise ConfigError(f"model {label!r} with kwargs {kwargs!r} holds {elements:,} parameter/buffer elements, "
                          f"over the limit of {max_elements:,}")
    return _construct(fn, label, kwargs)


def _construct(fn: Callable[..., Any], label: str, kwargs: dict) -> nn.Module:
    try:
        model = fn(**kwargs)
    except DeepShrinkError:
        raise
    except Exception as e:  # wrong kwargs for this constructor, or values it cannot use (sizes of 1e6, "x", -3)
        raise ConfigError(f"model {label!r}: cannot build with kwargs {kwargs!r} ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {label!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


# ---------------------------------------------------------------- foreign weights


def _extract_state_dict(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors, or a dict holding one under 'state_dict' or 'model'"
        )
    keys = list(payload)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel/DDP
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return payload


def load_foreign_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a plain torch checkpoint (a user's or a pretrained one) into ``model`` strictly.

    Accepts a raw state dict or a dict with a "state_dict"/"model" entry; strips a ``module.``
    prefix. Reads with ``weights_only=True`` only. The akamaster CIFAR ResNet files also hold a
    ``best_prec1`` float, which the safe loader accepts; they were saved from CUDA tensors, so
    ``map_location="cpu"`` is what makes them load on a CPU-only machine (no extra globals needed).

    Raises:
        CheckpointError: unreadable file, no state dict inside, or keys/shapes that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe (pickled-object) files
        raise CheckpointError(f"{path}: cannot be read safely with weights_only=True ({type(e).__name__}: {e})") from None
    state = _extract_state_dict(payload, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if items
        ]
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__}; " + "; ".join(parts))
    # BatchNorm fills in num_batches_tracked for files saved before it existed (no version metadata)
    model.load_state_dict(state, strict=True)
    return model
