"""Every ``torch.a.b`` the package names exists in the installed torch.

Code that only runs on a GPU (device names, CUDA memory queries, autocast on cuda) is never executed by
the CPU test suite, so a misspelt ``torch.cuda`` function would surface only on the first GPU run. This
resolves every attribute chain rooted at the name ``torch`` statically, on any machine.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import torch

ROOTS = [Path(__file__).resolve().parents[1] / folder for folder in ("diffprune_bench", "benchmarks")]


def torch_chains(source: str) -> set[str]:
    """The dotted names ``torch.x.y`` in ``source`` (longest chains only, calls and subscripts cut them)."""
    chains: set[str] = set()
    inner: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        parts, current = [], node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            inner.add(id(current.value))
            current = current.value
        if isinstance(current, ast.Name) and current.id == "torch":
            chains.add(".".join(["torch", *reversed(parts)]))
    return chains


def resolves(chain: str) -> bool:
    """Whether ``chain`` names an attribute or submodule of the installed torch."""
    current: object = torch
    for part in chain.split(".")[1:]:
        if hasattr(current, part):
            current = getattr(current, part)
        elif isinstance(current, ModuleType):
            try:
                current = importlib.import_module(f"{current.__name__}.{part}")
            except ImportError:
                return False
        else:
            return False
    return True


def test_the_chain_finder_sees_a_misspelt_cuda_call():
    found = torch_chains("import torch\nname = torch.cuda.getdevice_name(0)\nx = torch.nn.functional.relu\n")
    assert found == {"torch.cuda.getdevice_name", "torch.nn.functional.relu"}
    assert not resolves("torch.cuda.getdevice_name") and resolves("torch.nn.functional.relu")


def test_every_torch_name_in_the_package_exists():
    chains = {(path.relative_to(root.parent), chain) for root in ROOTS for path in root.rglob("*.py")
              for chain in torch_chains(path.read_text())}
    assert len(chains) > 50  # the package names torch throughout; an empty scan would prove nothing
    missing = sorted(f"{path}: {chain}" for path, chain in chains if not resolves(chain))
    assert not missing, missing
