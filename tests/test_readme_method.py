"""The README's "Adding a method" example, taken from README.md as written, runs end to end.

If the example or the contract it relies on drifts apart, this fails: the block is registered under a
temporary registry entry and run through the harness on the tiny budget, and its record must show the
requested sparsity as zeros in the exported weights.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from diffusers import UNet2DModel

from diffprune_bench import harness, registry
from diffprune_bench.models import build_model
from diffprune_bench.toolkit.masks import select_layers

README = Path(__file__).resolve().parents[1] / "README.md"
NAME = "global-magnitude"


def readme_method_source() -> str:
    """The first Python block of the README's "Adding a method" section."""
    text = README.read_text()
    section = text[text.index("### Adding a method"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's 'Adding a method' section has no python block"
    return match.group(1)


@pytest.fixture
def readme_method(monkeypatch):
    module = types.ModuleType("readme_example")  # a real module: dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(readme_method_source(), str(README), "exec"), module.__dict__)  # noqa: S102 - our README
    cls = registry.METHODS.pop(NAME)  # registered by its decorator; keep it only for this test
    with registry.METHODS.temporary(NAME, cls):
        yield cls
    assert NAME not in registry.METHODS


def test_readme_example_is_about_thirty_lines():
    lines = [line for line in readme_method_source().splitlines() if line.strip()]
    assert 25 <= len(lines) <= 50


def test_readme_method_runs_end_to_end_with_the_requested_zeros(readme_method, tiny_config):
    sparsity = 0.5
    (record,) = harness.run(tiny_config(method=NAME, sparsity=sparsity))
    assert record["status"] == "ok" and record["method"] == NAME and record["family"] == "unstructured"
    maskable, _ = select_layers(build_model(record["preset"]))
    maskable_weights = sum(layer.weight.numel() for layer in maskable.values())
    metrics = record["metrics"]
    zeros = metrics["params_total"] - metrics["params_nonzero"]
    assert zeros == pytest.approx(sparsity * maskable_weights, rel=0.01)
    assert metrics["macs_effective"] < 0.75 * metrics["macs_dense"]  # the zeros count in effective MACs
    exported = UNet2DModel.from_pretrained(record["paths"]["model"])  # a plain diffusers folder, no buffers
    layers, kept = select_layers(exported)
    exported_zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    assert exported_zeros == pytest.approx(sparsity * maskable_weights, rel=0.01)
    assert all(int((dict(exported.named_modules())[name].weight == 0).sum()) == 0 for name in kept)
