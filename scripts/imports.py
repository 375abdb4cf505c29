"""Print which deepshrink modules each module imports (top-level and inside functions), from the source.

Usage: python scripts/imports.py [--dot]

Reads src/deepshrink with ``ast`` (nothing is imported), so it runs without the dependencies installed.
tests/test_imports.py asserts the layering it shows.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "deepshrink"


def module_name(path: Path) -> str:
    """'prune' for prune.py, 'coding' for coding/__init__.py, '__init__' for the package's own."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports_of(path: Path) -> set[str]:
    """The deepshrink modules ``path`` imports anywhere in its body (lazy imports included)."""
    package = list(path.parent.relative_to(PACKAGE).parts)  # the (sub)package that holds this file
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = package[: len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "deepshrink":
                base, node_module = [], node.module.split(".", 1)[1] if "." in node.module else ""
                found.update(_targets(base, node_module, node.names))
                continue
            else:
                continue
            found.update(_targets(base, node.module or "", node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepshrink."):
                    found.add(alias.name.split(".", 1)[1])
    found.discard(module_name(path))
    return found


def _targets(base: list[str], module: str, names: list[ast.alias]) -> set[str]:
    prefix = ".".join(base + ([module] if module else []))
    if module:
        candidates = {prefix}
    else:  # from . import report: the names are modules
        candidates = {".".join(base + [a.name]) for a in names}
    # a name imported from a package may itself be a submodule (from deepshrink.coding import ans)
    for alias in names:
        sub = f"{prefix}.{alias.name}" if prefix else alias.name
        if (PACKAGE / (sub.replace(".", "/") + ".py")).exists():
            candidates.add(sub)
    return {c for c in candidates if c}


def import_graph() -> dict[str, set[str]]:
    """``{module: {deepshrink modules it imports}}`` for every module of the package."""
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def main() -> None:
    graph = import_graph()
    if "--dot" in sys.argv:
        print("digraph deepshrink {")
        for module, deps in graph.items():
            for dep in sorted(deps):
                print(f'  "{module}" -> "{dep}";')
        print("}")
        return
    width = max(map(len, graph))
    for module, deps in graph.items():
        print(f"{module:<{width}}  -> {', '.join(sorted(deps)) or '-'}")


if __name__ == "__main__":
    main()
