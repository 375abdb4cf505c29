"""The package's layering, read from the source by scripts/imports.py (docs/design.md shows its output)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "imports.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("deepshrink_imports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_reachable = _load_script().reachable


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = _load_script().import_graph()
    assert {"prune", "quantize", "parametrizations", "data", "format", "coding.ans"} <= set(found)
    assert "parametrizations" in found["checkpoint"] and "coding.huffman" in found["coding"]  # the reader sees imports
    return found


def test_pruning_and_quantization_are_siblings(graph):
    assert "quantize" not in graph["prune"] and "prune" not in graph["quantize"]
    assert "parametrizations" in graph["prune"] and "parametrizations" in graph["quantize"]


def test_parametrizations_depend_on_no_stage(graph):
    stages = {"prune", "quantize", "encode", "format", "checkpoint", "train", "pipeline"}
    assert not _reachable(graph, "parametrizations") & stages


def test_loading_a_dataset_imports_no_compression_stage(graph):
    assert not _reachable(graph, "data") & {"prune", "quantize", "checkpoint", "parametrizations", "encode", "format"}


def test_no_import_cycles_outside_the_coder_registry(graph):
    # coding/__init__ imports its coders last so that they register themselves; nothing else loops
    for module in graph:
        if not module.startswith(("coding", "codecs")):
            assert module not in _reachable(graph, module), module
