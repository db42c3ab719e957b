"""fvcore traces once per architecture: MAC counts cached by a signature of what the trace depends on.

Counting MACs traces a forward with TorchScript (about a second of CPU for the digits UNet, more for
bigger ones), and a run counted the same architecture again and again: the dense base in every cell, and
every unstructured, N:M and training-free model has the dense base's architecture. fvcore's count is a
function of the architecture alone: operator shapes, never weight values. So the trace
(:class:`~diffprune_bench.metrics.macs.MacTrace`) is stored under a key of

* the module's graph signature (:func:`~diffprune_bench.metrics.graph_latency.module_signature`: every
  submodule's type, configuration, tensor shapes and dtypes, hooks), plus what that signature leaves out
  but a forward may branch on: every other public attribute described by type (a swapped attention
  processor, a list of widths, an overridden ``forward``) and a diffusers model's ``config``;
* the input shape, the device type, and the versions of the counter, torch, fvcore and diffusers;

and each report is rebuilt from the cached trace with the model's own weight densities, so effective MACs
of masked models stay exact. Entries live in memory (for the run) and as JSON under the cache folder (for
every run sharing it); an unreadable entry is traced again.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffprune_bench.metrics.graph_latency import module_signature
from diffprune_bench.metrics.macs import COUNTER, MacReport, MacTrace, report_from_trace, trace_macs
from diffprune_bench.results import atomic_write_text

FOLDER = "macs"
FORMAT = 1  # bump when MacTrace or the key changes


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of an attribute that keeps what could change a forward's operators."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype)]
    if depth < 3 and isinstance(value, (list, tuple)):
        return [_describe(v, depth + 1) for v in value]
    if depth < 3 and isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if callable(value) and hasattr(value, "__qualname__"):
        return ["callable", getattr(value, "__module__", ""), value.__qualname__]
    return ["object", type(value).__module__, type(value).__qualname__]


def _behaviour(model: nn.Module) -> list[Any]:
    """What :func:`module_signature` leaves out but a forward may depend on, per submodule."""
    parts = []
    for name, sub in model.named_modules(remove_duplicate=False):
        extra = {k: _describe(v) for k, v in sorted(vars(sub).items())
                 if not k.startswith("_") and k != "training"
                 and not isinstance(v, (bool, int, float, str, tuple, type(None)))}
        config = getattr(sub, "config", None)
        if isinstance(config, dict):
            extra["config"] = _describe(dict(config))
        parts.append([name, extra])
    return parts


def architecture_key(model: nn.Module, sample_shape: tuple[int, ...]) -> str:
    """The cache key of ``model``'s MAC trace at ``sample_shape``: equal only for the same architecture."""
    device = next(model.parameters()).device.type
    payload = [FORMAT, COUNTER, list(sample_shape), device, torch.__version__, _version("fvcore"),
               _version("diffusers"), module_signature(model), _behaviour(model)]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:24]


class MacCache:
    """MAC counts by architecture, in memory and (with a ``cache_dir``) on disk; ``count`` is ``count_macs``."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.folder = Path(cache_dir) / FOLDER if cache_dir is not None else None
        self._memory: dict[str, MacTrace] = {}
        self.traced = 0  # traces this cache ran (the rest were hits)

    def count(self, model: nn.Module, sample_shape: tuple[int, int, int]) -> MacReport:
        """Same report as :func:`~diffprune_bench.metrics.macs.count_macs`, tracing each architecture once."""
        key = architecture_key(model, sample_shape)
        trace = self._memory.get(key) or self._load(key)
        if trace is None:
            trace = trace_macs(model, sample_shape)
            self.traced += 1
            self._store(key, trace)
        self._memory[key] = trace
        return report_from_trace(model, trace)

    def _load(self, key: str) -> MacTrace | None:
        if self.folder is None:
            return None
        try:
            data = json.loads((self.folder / f"{key}.json").read_text())
            return MacTrace(by_operator={str(k): v for k, v in data["by_operator"].items()},
                            layer_macs={str(k): int(v) for k, v in data["layer_macs"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or unreadable: trace
            return None

    def _store(self, key: str, trace: MacTrace) -> None:
        if self.folder is None:
            return
        text = json.dumps({"by_operator": trace.by_operator, "layer_macs": trace.layer_macs})
        try:
            atomic_write_text(self.folder / f"{key}.json", text)
        except OSError:  # a read-only cache folder costs a trace next time, nothing else
            pass
