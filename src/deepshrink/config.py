"""Small helpers shared by the config dataclasses: enum options, bit widths, per-layer glob overrides."""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from .errors import ConfigError


def enum_value(enum: type[Enum], value, what: str) -> str:
    """``value`` (a member or its string) as the member's plain string value, so configs round-trip
    through JSON/YAML.

    Raises:
        ConfigError: ``value`` is not one of ``enum``'s values (the message lists them).
    """
    try:
        return enum(value).value
    except ValueError:
        valid = ", ".join(m.value for m in enum)
        raise ConfigError(f"unknown {what} {value!r}; valid: {valid}") from None


MAX_BITS = 16  # cluster bits and index bits: alphabets up to 65,536 symbols; beyond that sharing saves nothing


def check_bits(bits, what: str = "bits", low: int = 1) -> int:
    """``bits`` as an int after checking it is an integer in low..MAX_BITS (ConfigError otherwise)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not low <= bits <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer in {low}..{MAX_BITS}, got {bits!r}")
    return int(bits)


def check_lam(lam, what: str = "lam") -> float:
    """A rate weight lambda as a float after checking it is a finite number >= 0 (ConfigError otherwise)."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"{what} (the rate weight lambda) must be a finite number >= 0, got {lam!r}")
    return float(lam)


def pattern_values(value, what: str, check: Callable[[Any, str], Any]) -> tuple[tuple[str, Any], ...]:
    """Normalise per-layer overrides, ``[(glob on the weight FQN, value), ...]`` (YAML gives lists).

    ``check(value, label)`` validates and converts each value (raising ConfigError). The first glob
    that matches a weight wins (``first_match``).

    Raises:
        ConfigError: not a sequence of (str, value) pairs, or a value ``check`` rejects.
    """
    try:
        pairs = tuple(tuple(pair) for pair in value)
    except TypeError:
        pairs = ((),)
    if not all(len(pair) == 2 and isinstance(pair[0], str) for pair in pairs):
        raise ConfigError(f"{what} must be a sequence of (glob, value) pairs, got {value!r}")
    return tuple((pattern, check(v, f"{what} entry {pattern!r}")) for pattern, v in pairs)


def first_match(fqn: str, pairs: tuple[tuple[str, Any], ...]) -> Any | None:
    """The value of the first glob in ``pairs`` that matches ``fqn``, or None."""
    return next((v for pattern, v in pairs if fnmatch.fnmatchcase(fqn, pattern)), None)


def check_patterns_match(pairs: tuple[tuple[str, Any], ...], fqns: Sequence[str], what: str) -> None:
    """Raise ConfigError for a glob in ``pairs`` that matches none of ``fqns`` (a typo, not a no-op)."""
    for pattern, _ in pairs:
        if not any(fnmatch.fnmatchcase(f, pattern) for f in fqns):
            raise ConfigError(f"{what} pattern {pattern!r} matches no selected weight; selected: {', '.join(fqns)}")
