"""Stage 4: tensor codecs, the ways one tensor can lie in a ``.dsz`` file (a header entry's ``"codec"``).

A codec is a class in its own module, registered with ``@register_codec``. It pairs a frozen dataclass
(the encoded tensor) with everything asked of a tensor on its way into and out of a file
(`TensorCodec`): whether and how it stores a given tensor (``encode``, which ``encode.py`` asks of every
codec, keeping the smallest answer), its header entry and payload sections, the loader's checks of
that entry before anything is decoded, a view of the file's bytes, the decoded array, and its bytes
for choosing (optionally estimated first, ``estimate_bytes``) and accounting. ``format.py`` lays entries out and knows no codec by name; a new codec is
one module here, and a test registers one from outside the package (``tests/test_registries.py``).

Built in: ``raw`` and ``constant`` (``raw.py``), ``deep_compression`` (the paper's relative indices and
cluster symbols, ``deep_parametrizations.py``), ``cabac`` (one context-coded stream of signed levels over a
codebook, ``cabac.py``) and ``grid`` (levels times a step, ``grid.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch

from deepshrink.errors import ConfigError

AUTO = "auto"  # ``EncodeConfig.coder``: every weight codec competes, the smallest is written


@dataclass(frozen=True)
class Quantized:
    """A weight-shared tensor: ``codebook[indices - 1]`` where ``indices > 0``, zero (pruned) elsewhere."""

    indices: np.ndarray  # integer, shaped like the weight, values 0..K
    codebook: np.ndarray  # (K,) float32
    bits: int  # the layer's cluster bits (K <= 2**bits)


class TensorToStore:
    """One tensor of a model on its way into a file: what every codec's ``encode`` is given.

    ``values``: the tensor as the model holds it (a quantized weight's effective values), CPU; it may be
    given as a function that computes it, called the first time a codec reads ``values`` (a weight
    coded over its codebook then never has its dense values made). ``kind``: a compressible weight's
    kind (``layers.KINDS``: conv, fc, ...), else None. ``quantized``: a weight-shared tensor the file
    codes over its codebook.
    """

    __slots__ = ("name", "kind", "quantized", "_values")

    def __init__(self, name: str, values: torch.Tensor | Callable[[], torch.Tensor], kind: str | None = None,
                 quantized: Quantized | None = None):
        self.name, self.kind, self.quantized, self._values = name, kind, quantized, values

    @property
    def values(self) -> torch.Tensor:
        if not isinstance(self._values, torch.Tensor):
            self._values = self._values()
        return self._values

    def __repr__(self) -> str:
        return f"TensorToStore({self.name!r}, kind={self.kind!r}, quantized={self.quantized is not None})"


class EncodedTensor(Protocol):
    """What every encoded tensor has: the decoded tensor's shape and dtype."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...


#: ``add(data, stream=False) -> dict``: appends a payload section and returns what the header entry
#: says of it (its length for a stream in a packed file; offsets and CRC32 in versions 1-2)
AddSection = Callable[..., dict]


class Sections(Protocol):
    """The loader's record of the payload sections entries claim (``format._Sections``)."""

    packed: bool  # version 3 on: sections back to back, only streams state a length

    def keys(self, keys: set[str], stream: bool = False) -> set[str]:
        """The key set of a header part holding a section."""

    def add(self, part: dict, where: str, label: str, length: int | None = None) -> int:
        """Record ``part``'s section (``length``: what the header implies; None for a stream); its length."""


class TensorCodec:
    """One codec. Subclasses set the class attributes and implement every method; one instance is registered.

    ``first_version``: the first format version that holds the codec (a file of version v admits the
    codecs whose first_version <= v). ``weight``: it stores a quantized weight over a codebook (counted
    as coded in reports, read sparse by the runtime through ``nonzeros``); otherwise it stores a tensor
    as it is or nearly (biases, statistics).
    """

    name: ClassVar[str]
    tensor_type: ClassVar[type]
    first_version: ClassVar[int]
    weight: ClassVar[bool] = False
    #: ``EncodeConfig`` fields this codec reads, with the help text the command line shows for each
    options: ClassVar[dict[str, str]] = {}

    def coders(self) -> tuple[str, ...]:
        """``EncodeConfig.coder`` values that ask for this codec alone (a weight codec's; "auto" asks every one)."""
        return ()

    def encode(self, tensor: TensorToStore, config: Any) -> Any | None:
        """This codec's encoding of ``tensor`` under ``config`` (an ``encode.EncodeConfig``), or None where it
        cannot store the tensor or ``config`` does not ask for it. The smallest answer is written."""
        raise NotImplementedError

    def estimate_bytes(self, tensor: TensorToStore, config: Any) -> tuple[float, float] | None:
        """Optional: bounds (low, high) on the ``stored_bytes`` of what ``encode`` would return, found for
        much less than encoding; None (the default) where there are none, and the tensor is encoded.
        For a large tensor ``encode.encode_tensor`` skips a codec whose low bound exceeds another's size."""
        return None

    def entry(self, name: str, tensor: Any, add: AddSection) -> dict:
        """Tensor ``name``'s header entry, its bytes appended with ``add``."""
        raise NotImplementedError

    def check(self, entry: dict, name: str, at: str, sections: Sections) -> tuple[int, int]:
        """Every check of an untrusted header entry that needs no decoding; its sections recorded.

        Returns:
            (elements decoding creates, counted against ``max_expansion``; bytes it copies from the payload).
        Raises:
            FormatError subclasses (InvalidHeader for the schema, TensorInfoMismatch for values that
            disagree), CodecError for coder params the coder rejects.
        """
        raise NotImplementedError

    def view(self, name: str, entry: dict, span: Callable[[str], memoryview], at: str) -> Any:
        """The encoded tensor of a checked entry; ``span(label)`` gives a section's payload bytes (TensorInfoMismatch,
        naming ``at``, for bytes no tensor of the entry can hold)."""
        raise NotImplementedError

    def decode(self, tensor: Any, where: str) -> np.ndarray:
        """The dense array, in the stored dtype, in memory of its own (CodecError / TensorInfoMismatch
        for a malformed stream)."""
        raise NotImplementedError

    def stored_bytes(self, tensor: Any) -> int:
        """Bytes the tensor adds to a file (its sections and its share of the header): what choices compare."""
        raise NotImplementedError

    def account(self, tensor: Any, where: str) -> dict:
        """Its row of ``accounting.account``: ``nonzero``, ``stored_bytes`` and, for a weight, the stream columns."""
        raise NotImplementedError

    def nonzeros(self, tensor: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        """A weight codec's non-zeros, checked: (flat positions, indices into ``tensor.codebook``), the
        runtime's sparse form."""
        raise NotImplementedError(f"codec {self.name!r} does not store a weight over a codebook")


CODECS: dict[str, TensorCodec] = {}  # by name, in registration order (the order error messages list them)


def register_codec(cls: type[TensorCodec]) -> type[TensorCodec]:
    """Class decorator: add one instance of ``cls`` to `CODECS` under ``cls.name``.

    Raises:
        ConfigError: the name or the tensor type is taken, or a class attribute is missing.
    """
    missing = [a for a in ("name", "tensor_type", "first_version") if not hasattr(cls, a)]
    if missing:
        raise ConfigError(f"{cls.__name__} does not set {', '.join(missing)}")
    if not isinstance(cls.name, str) or not cls.name or cls.name in CODECS:
        raise ConfigError(f"codec name {cls.name!r} is empty or already registered")
    if any(c.tensor_type is cls.tensor_type for c in CODECS.values()):
        raise ConfigError(f"{cls.tensor_type.__name__} already has a codec")
    CODECS[cls.name] = cls()
    return cls


def codec_of(tensor: Any, where: str = "tensor") -> TensorCodec:
    """The codec of an encoded tensor (by its exact type).

    Raises:
        ConfigError: ``tensor`` is no registered codec's tensor type.
    """
    found = next((c for c in CODECS.values() if type(tensor) is c.tensor_type), None)
    if found is None:
        types = ", ".join(c.tensor_type.__name__ for c in CODECS.values())
        raise ConfigError(f"{where}: expected one of {types}, got {type(tensor).__name__}")
    return found


def codecs_in(version: int) -> tuple[str, ...]:
    """The codecs a file of format ``version`` may hold, in registration order."""
    return tuple(name for name, codec in CODECS.items() if codec.first_version <= version)


def codec_options() -> dict[str, str]:
    """Every registered codec's ``EncodeConfig`` options and their help (the first codec's text for a shared one)."""
    options: dict[str, str] = {}
    for codec in CODECS.values():
        for name, text in codec.options.items():
            options.setdefault(name, text)
    return options


def tensor_coders() -> list[str]:
    """Valid ``EncodeConfig.coder`` values: every weight codec's coders, then "auto"."""
    return [*(coder for codec in CODECS.values() for coder in codec.coders()), AUTO]


# the built-in codecs register themselves on import (after the registry exists)
from deepshrink.codecs import raw, deep_compression, cabac, grid  # noqa: E402,F401
