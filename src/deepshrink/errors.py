"""The library's exceptions: callers catch `DeepShrinkError` and get a message that names the problem."""

from __future__ import annotations


class DeepShrinkError(Exception):
    """Base class of every error deepshrink raises on purpose."""


class ConfigError(DeepShrinkError, ValueError):
    """A setting, option name or argument is invalid (the message names it and the valid choices)."""


class DataError(DeepShrinkError):
    """A dataset file is missing, truncated or not in the expected format."""


class CheckpointError(DeepShrinkError):
    """A checkpoint cannot be read or does not fit the model it is loaded into."""


class WriteError(DeepShrinkError, OSError):
    """A file could not be written (disk full, I/O error, rename refused); nothing partial is left."""


class ExportError(DeepShrinkError):
    """A model cannot be exported to ONNX (the message names the op, the layer or the reason)."""


class CodecError(DeepShrinkError, ValueError):
    """An entropy-coded stream is malformed or inconsistent with its model."""


class FormatError(DeepShrinkError, ValueError):
    """A compressed file fails one of the loader's checks; subclasses name the check."""


class BadMagic(FormatError):
    pass


class UnsupportedVersion(FormatError):
    pass


class HeaderTooSmall(FormatError):
    pass


class HeaderTooLarge(FormatError):
    pass


class InvalidHeader(FormatError):
    """The JSON header is not valid UTF-8/JSON or does not follow the schema."""


class InvalidOffset(FormatError):
    pass


class TensorInfoMismatch(FormatError):
    pass


class TrailingBytes(FormatError):
    pass


class ChecksumMismatch(FormatError):
    pass
