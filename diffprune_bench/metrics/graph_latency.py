"""Latency is a property of the executed graph: measure each distinct graph once, reuse it for the others.

A serial A/B measurement holds the whole machine (see :mod:`diffprune_bench.metrics.latency`), so in a
suite it is the part of a cell that no other cell can overlap. Most records run a graph another record
already timed: every unstructured and N:M model runs the dense graph (zeros in weights cost what
non-zeros cost in a dense kernel), the structured methods at one target share their channel counts, and
the seeds of a method share their architecture. Timing each of them again only measured noise (identical
architectures used to get speed-ups from 1.03x to 1.32x). So a measurement is stored under a signature of
what determines its time and nothing else: the modules each sampling step runs (their types, parameter and
buffer shapes and dtypes, configuration attributes, hooks), which step runs which, the dense trajectory it
is paired with, and the protocol (batch, repeats, threads, precision, device, host, the package source's
digest). Weights are left out on purpose. A record whose graph was timed before gets that measurement,
marked ``reused`` with the run it was ``measured_in``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprune_bench.results import atomic_write_text

FOLDER = "latency"


def _attributes(module: nn.Module) -> dict[str, Any]:
    """A module's own configuration: its public plain-valued attributes (a width, a branch depth, a stride)."""
    plain = (bool, int, float, str, tuple, type(None))
    return {k: repr(v) for k, v in sorted(vars(module).items())
            if not k.startswith("_") and k != "training" and isinstance(v, plain)}


def module_signature(module: nn.Module) -> str:
    """Hash of what a module computes, weights aside: every submodule's type, configuration, tensors'
    shapes and dtypes, and the hooks that could add work."""
    parts = []
    for name, sub in module.named_modules(remove_duplicate=False):
        # sorted: the order tensors were registered in changes nothing (removing a parametrization
        # registers a weight again after its bias); a non-contiguous weight does (a copy every call)
        tensors = sorted((n, tuple(t.shape), str(t.dtype), t.is_contiguous()) for n, t in
                         [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)] if t is not None)
        hooks = (len(sub._forward_hooks), len(sub._forward_pre_hooks))
        parts.append([name, type(sub).__qualname__, sub.extra_repr(), _attributes(sub), tensors, hooks])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def trajectory_signature(module_for_step: Callable[[int], nn.Module], steps: int) -> str:
    """Hash of a sampling trajectory's graph: the signature of each distinct module and which steps run it."""
    seen: dict[int, int] = {}
    signatures: list[str] = []
    order: list[int] = []
    for step in range(steps):
        module = module_for_step(step)
        if id(module) not in seen:
            seen[id(module)] = len(signatures)
            signatures.append(module_signature(module))
        order.append(seen[id(module)])
    return hashlib.sha256(json.dumps([signatures, order]).encode()).hexdigest()


class LatencyStore:
    """Measurements by graph key, one JSON file each under the cache folder (written atomically)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.folder = Path(cache_dir) / FOLDER

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.folder / f"{key}.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measure
            return None
        return {**result, "reused": True} if isinstance(result, dict) and "median_s" in result else None

    def put(self, key: str, result: dict[str, Any]) -> None:
        atomic_write_text(self.folder / f"{key}.json", json.dumps(result))


def measurement_key(trajectory: str, dense: str | None, protocol: dict[str, Any]) -> str:
    """The key of one A/B measurement: the timed trajectory, the dense one it is paired with (None for the
    baseline's own), and everything else that sets the time."""
    payload = {"trajectory": trajectory, "dense": dense, "torch": torch.__version__, **protocol}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
