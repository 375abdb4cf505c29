"""Fixtures shared by several test modules: hostile checkpoints, counted stream decodes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import nn

from deepshrink.checkpoint import save_checkpoint
from deepshrink.coding import CODERS


@dataclass
class FactoryCheckpoints:
    marker: Path  # created only if code named by a checkpoint ran
    system: Path  # names os:system with a command that creates the marker
    module: Path  # names a factory whose module creates the marker when imported
    spec: dict  # the module checkpoint's model spec


def tiny_factory_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # digits-sized, like the factory below


@pytest.fixture
def factory_checkpoints(tmp_path, monkeypatch) -> FactoryCheckpoints:
    marker = tmp_path / "code-ran"
    name = f"factory_marker_{uuid.uuid4().hex}"  # a fresh module name: never cached in sys.modules
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / f"{name}.py").write_text(
        "from pathlib import Path\nfrom torch import nn\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "def tiny():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    meta = {"dataset": {"name": "digits"}}
    system_spec = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}
    spec = {"factory": f"{name}:tiny", "kwargs": {}}
    return FactoryCheckpoints(
        marker=marker,
        system=save_checkpoint(tmp_path / "system.pt", tiny_factory_model(), system_spec, meta),
        module=save_checkpoint(tmp_path / "module.pt", tiny_factory_model(), spec, meta),
        spec=spec,
    )


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
