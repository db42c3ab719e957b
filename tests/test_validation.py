"""Every method parameter and option is checked before any work (issue: one validate path).

``diffbench run`` refuses a bad value with exit code 2 and one line before any model is built (building
one fails the test), and leaves no run folder (so no failed record); a suite refuses a bad cell before
its first cell runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from diffusers import UNet2DModel
from typer.testing import CliRunner

from diffprune_bench import registry
from diffprune_bench.cli import app
from diffprune_bench.errors import BenchError
from diffprune_bench.sweep.suite import parse_suite

BAD_RUNS = {
    "dense with a sparsity": (["--method", "dense", "--sparsity", "0.5"], "'dense' compresses nothing"),
    "dense-ft with a sparsity": (["--method", "dense-ft", "--sparsity", "0.25"], "'dense-ft' compresses nothing"),
    "sparsedm N:M mismatch": (["--method", "sparsedm", "--sparsity", "0.4"], "not 1 - N/4"),
    "sparsedm stages end elsewhere": (["--method", "sparsedm", "--sparsity", "0.5", "-p", "stages=[4:4, 1:4]"],
                                      "stages end at 1:4"),
    "gradflow unknown schedule": (["--method", "gradflow", "--sparsity", "0.5", "-p", "schedule=cubic"],
                                  "schedule 'cubic' is not one of"),
    "structured tolerance": (["--method", "magnitude", "--sparsity", "0.5", "-p", "tolerance=-1"], "tolerance"),
    "resume without a checkpoint": (["--method", "magnitude", "--sparsity", "0.5", "--resume", "--run-id", "none"],
                                    "no checkpoint"),
    "resume without a run id": (["--method", "magnitude", "--sparsity", "0.5", "--resume"], "--resume needs --run-id"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_run_fails_fast_with_one_line_and_no_record(case: str, tmp_path: Path, monkeypatch) -> None:
    args, expected = BAD_RUNS[case]
    results = tmp_path / "runs"

    @functools.wraps(UNet2DModel.__init__)  # its signature stays readable to config code
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built before the bad value was refused")

    monkeypatch.setattr(UNet2DModel, "__init__", no_model)  # every UNet the harness builds or loads
    result = CliRunner().invoke(app, ["run", *args, "--results-dir", str(results),
                                      "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not results.exists() and not (tmp_path / "cache").exists()  # nothing loaded, trained or recorded


def test_reference_methods_accept_sparsity_zero() -> None:
    for name in registry.method_names():
        cls = registry.get_method_class(name)
        if not cls.takes_sparsity:
            assert registry.create_method(name, sparsity=0.0).takes_sparsity is False
    assert not registry.get_method_class("dense").takes_sparsity and registry.get_method_class("dense").is_baseline


def test_suite_validates_every_cell_before_running() -> None:
    data = {"name": "bad", "datasets": ["digits"], "methods": ["magnitude", "sparsedm"], "sparsities": [0.5, 0.44],
            "seeds": [0]}
    with pytest.raises(BenchError, match=r"sparsity 0.44 is not 1 - N/4"):
        parse_suite(data)


def test_param_value_of_the_wrong_type_is_one_line() -> None:
    with pytest.raises(BenchError, match="gradflow") as error:
        registry.create_method("gradflow", {"iterations": "many"}, sparsity=0.5)
    assert "\n" not in str(error.value)


def test_default_method_state_round_trips() -> None:
    method = registry.Method()
    assert method.state_dict() == {}
    method.load_state_dict({})  # the trainer calls both for every method, no probing
