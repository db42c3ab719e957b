"""The package's layers, checked from the import graph (static imports, including function-local ones).

run core (top-level modules, ``metrics/``)  <-  toolkit/  <-  methods/
                                            <-  sweep/, report/, cli
The run core measures every method the same way, so it must not depend on any method or on the helpers
methods share; methods are found by name through the registry at run time, never imported by the core.
"""

from __future__ import annotations

import ast
import graphlib
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


# ---------------------------------------------------------------- no import cycle inside report/
def import_cycle(files: dict[str, Path]) -> list[str] | None:
    """A cycle of imports among the modules ``files`` (dotted name -> file), counting imports inside
    functions and under ``TYPE_CHECKING`` too; None when every import goes one way.

    ``from package.module import name`` counts as importing ``package.module`` (and the package's
    ``__init__`` when it is one of ``files``)."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for imported in imported_modules(path):
            owners = [m for m in files if imported == m or imported.startswith(m + ".")]
            if owners and max(owners, key=len) != name:
                graph[name].add(max(owners, key=len))  # the module itself, not a name inside it
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return list(error.args[1])
    return None


def package_modules(folder: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package ``folder`` (its ``__init__`` as the package)."""
    prefix = ".".join(("diffprune_bench", *folder.relative_to(PACKAGE).parts))
    return {prefix if p.stem == "__init__" else f"{prefix}.{p.stem}": p for p in folder.glob("*.py")}


def test_report_modules_import_each_other_one_way() -> None:
    cycle = import_cycle(package_modules(PACKAGE / "report"))
    assert cycle is None, f"import cycle in report/: {' -> '.join(cycle or [])}"


def test_the_cycle_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from diffprune_bench.report.b import g\n    return g\n")
    (tmp_path / "b.py").write_text("from diffprune_bench.report.a import f\n\ng = 1\n")
    files = {"diffprune_bench.report.a": tmp_path / "a.py", "diffprune_bench.report.b": tmp_path / "b.py"}
    assert sorted(set(import_cycle(files) or [])) == ["diffprune_bench.report.a", "diffprune_bench.report.b"]
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    assert import_cycle(files) is None
