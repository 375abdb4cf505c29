"""Small helpers shared by the config dataclasses: enum options stored as plain strings."""

from __future__ import annotations

from enum import Enum

from .errors import ConfigError


def enum_value(enum: type[Enum], value, what: str) -> str:
    """``value`` (a member or its string) as the member's plain string value, so configs round-trip
    through JSON/YAML.

    Raises:
        ConfigError: ``value`` is not one of ``enum``'s values (the message lists them).
    """
    try:
        return enum(value.value if isinstance(value, enum) else value).value
    except ValueError:
        valid = ", ".join(m.value for m in enum)
        raise ConfigError(f"unknown {what} {value!r}; valid: {valid}") from None
