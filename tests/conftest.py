"""Fixtures shared by several test modules."""

import pytest

from deepshrink.coding import CODERS


@pytest.fixture
def stream_decodes(monkeypatch) -> list[str]:
    """Every call of a registered coder's ``decode`` from now on, as the coder's name (one per stream)."""
    calls: list[str] = []
    for name, coder in CODERS.items():
        cls = type(coder)
        real = cls.decode

        def counting(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "decode", counting)
    return calls
