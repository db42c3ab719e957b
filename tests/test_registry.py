"""Method registry: bundled discovery, entry-point plug-ins, clear errors."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest

from diffprune_bench import registry
from diffprune_bench.errors import BenchError


def test_bundled_methods_are_discovered():
    assert "dense" in registry.method_names()
    dense = registry.get_method_class("dense")
    assert dense.family == "dense" and dense.is_baseline


def test_unknown_method_lists_available_names():
    with pytest.raises(BenchError) as error:
        registry.get_method_class("no-such-method")
    assert "no-such-method" in str(error.value) and "dense" in str(error.value)


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_method.py").write_text(textwrap.dedent('''
        from diffprune_bench.registry import Method, register_method

        @register_method("thirdparty-identity")
        class ThirdPartyIdentity(Method):
            family = "structured"
            init = "pretrained"
            description = "a plug-in from another package"
    '''))
    dist = tmp_path / "thirdparty_method-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-method\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[diffprune_bench.methods]\nidentity = thirdparty_method\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry.discover_methods(force=True)
        assert "thirdparty-identity" in registry.method_names()
        assert registry.get_method_class("thirdparty-identity").family == "structured"
    finally:
        registry.METHODS.pop("thirdparty-identity", None)
        sys.modules.pop("thirdparty_method", None)


def test_register_rejects_bad_family():
    with pytest.raises(ValueError, match="family"):

        @registry.register_method("bad-family")
        class Bad(registry.Method):
            family = "quantized"


def test_params_overrides_are_checked():
    @dataclass
    class P:
        alpha: float = 0.3

    @registry.register_method("test-params")
    class WithParams(registry.Method):
        family = "unstructured"
        init = "scratch"
        Params = P

    try:
        method = registry.create_method("test-params", {"alpha": 0.05})
        assert method.params.alpha == 0.05
        with pytest.raises(BenchError, match="beta"):
            registry.create_method("test-params", {"beta": 1})
    finally:
        registry.METHODS.pop("test-params", None)


def test_registry_temporary_restores_what_was_there():
    from diffprune_bench.data import DATASETS, dataset_names
    from diffprune_bench.models import PRESETS

    original = PRESETS["tiny"]
    with PRESETS.temporary("tiny", {"sample_size": 4}):
        assert PRESETS.lookup("tiny") == {"sample_size": 4}
    assert PRESETS["tiny"] is original
    with DATASETS.temporary("toy-data", DATASETS["digits"]):
        assert "toy-data" in dataset_names()
    assert "toy-data" not in dataset_names()
    with pytest.raises(BenchError, match=r"unknown preset 'nope'; available: .*tiny"):
        PRESETS.lookup("nope")


def test_methods_registry_discovers_before_lookup():
    assert registry.METHODS.lookup("rigl").name == "rigl"
    with pytest.raises(BenchError, match="unknown method 'nope'"):
        registry.METHODS.lookup("nope")


def test_a_display_name_labels_the_method_in_the_listing_and_the_leaderboard():
    import pandas as pd
    from typer.testing import CliRunner

    from diffprune_bench.cli import app
    from diffprune_bench.report.leaderboard import row_label

    assert registry.Method.display_name == ""
    assert registry.get_method_class("gradflow").display_name == "gradflow (our reading)"
    listing = CliRunner().invoke(app, ["methods"])
    assert listing.exit_code == 0
    lines = {line.split("  ")[0].strip(): line for line in listing.output.splitlines()}
    assert "gradflow (our reading)" in lines and "magnitude" in lines  # others keep their name
    row = pd.Series({"label": "gradflow (our reading)", "method": "gradflow", "variant": "", "then": "",
                     "sparsity": 0.5, "trained_sparsity": 0.5})
    assert row_label(row) == "gradflow (our reading)"
