"""The package's layering, read from the source by scripts/imports.py (docs/design.md shows its output)."""

from __future__ import annotations

import ast
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


def _private_names_from_other_modules(path: Path) -> list[str]:
    """``from deepshrink.x import _name`` and ``x._name`` on an imported deepshrink module, in one file."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()  # local names bound to deepshrink modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            internal = node.level > 0 or (node.module or "").split(".")[0] == "deepshrink"
            if not internal:
                continue
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                elif alias.name[:1].islower():  # perhaps a submodule: from . import format as fmt
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepshrink"):
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    package = _load_script().PACKAGE
    found = [hit for path in sorted(package.rglob("*.py")) for hit in _private_names_from_other_modules(path)]
    assert not found, found


def test_the_private_name_check_sees_both_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from deepshrink import format as fmt\nfrom .coding.level_coder import _SECRET\nfmt._parse()\n")
    assert len(_private_names_from_other_modules(probe)) == 2


def test_the_design_doc_shows_the_graph_as_it_is(graph):
    design = (SCRIPT.parent.parent / "docs" / "design.md").read_text()
    width = max(map(len, graph))
    stale = [module for module, deps in graph.items()
             if f"{module:<{width}}  -> {', '.join(sorted(deps)) or '-'}\n" not in design]
    assert not stale, f"docs/design.md's import graph is stale for {stale}: paste python scripts/imports.py"
