"""The package's layers, checked from the import graph (static imports, including function-local ones).

run core (top-level modules, ``metrics/``)  <-  toolkit/  <-  methods/
                                            <-  sweep/, report/, cli
The run core measures every method the same way, so it must not depend on any method or on the helpers
methods share; methods are found by name through the registry at run time, never imported by the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffprune_bench"
LAYERS = ("toolkit", "methods", "sweep", "report")
#: what each layer may not import (the core is everything not in LAYERS, except the CLI on top)
FORBIDDEN = {
    "core": {"toolkit", "methods", "sweep", "report", "cli"},
    "toolkit": {"methods", "sweep", "report", "cli"},
    "methods": {"sweep", "report", "cli"},
    "sweep": {"methods", "toolkit", "cli"},
    "report": {"methods", "toolkit", "sweep", "cli"},
}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    if relative[0] in LAYERS:
        return relative[0]
    return "cli" if relative == ("cli.py",) else "core"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # only files shipped beside exported weights, which cannot name the package
                if path.name not in PORTABLE_FILES:
                    raise AssertionError(f"{path}: relative import; the package uses absolute imports")
                package = ("diffprune_bench", *path.relative_to(PACKAGE).parts[:-1])
                module = ".".join(package[: len(package) - node.level + 1] + ((module,) if module else ()))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("diffprune_bench")}


def target_layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in (*LAYERS, "cli") else None


#: files exports copy beside a model's weights: they import their siblings relatively
PORTABLE_FILES = {"step_aware_unet.py"}

MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_respect_the_layers(path: Path) -> None:
    layer = layer_of(path)
    if layer == "cli":
        return
    bad = sorted(m for m in imported_modules(path) if target_layer(m) in FORBIDDEN[layer])
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) imports {bad}"


def test_the_rule_catches_a_core_module_importing_a_method(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from diffprune_bench.methods.rigl import RigL\nimport diffprune_bench.toolkit.masks\n")
    assert {target_layer(m) for m in imported_modules(module)} >= {"methods", "toolkit"}


def test_every_layer_exists_and_methods_hold_only_methods() -> None:
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file()
    from diffprune_bench import registry

    registry.discover_methods()
    registered_modules = {cls.__module__ for cls in registry.METHODS.values()}
    files = {f"diffprune_bench.methods.{p.stem}" for p in (PACKAGE / "methods").glob("*.py") if p.stem != "__init__"}
    assert files <= registered_modules, f"modules in methods/ that register no method: {files - registered_modules}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (function-local and TYPE_CHECKING imports included: a
    circle hidden in a function body is still a circle). ``from pkg import name`` counts as an import of
    ``pkg.name`` when that is a module, else of ``pkg``; package ``__init__`` files are left out (importing
    a submodule runs them, so they would close a trivial circle with every module they re-export)."""
    names = {module_name(p) for p in paths if p.name != "__init__.py"}
    graph: dict[str, set[str]] = {}
    for path in paths:
        if path.name == "__init__.py":
            continue
        targets = set()
        for imported in imported_modules(path):
            while imported and imported not in names:
                imported = imported.rpartition(".")[0]
            if imported and imported != module_name(path):
                targets.add(imported)
        graph[module_name(path)] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circle() -> None:
    cycle = find_cycle(import_graph(MODULES))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_circle_finder_sees_a_lazy_circle(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
