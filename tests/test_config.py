"""Config validation and the CLI's one-line errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffprune_bench.cli import app
from diffprune_bench.config import make_config, parse_param_overrides
from diffprune_bench.errors import BenchError


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"sparsity": 1.0}, "sparsity 1.0 is outside [0, 1)"),
        ({"sparsity": -0.1}, "sparsity -0.1"),
        ({"base_steps": -5}, "base-steps -5"),
        ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"timestep_spacing": "cubic"}, "unknown timestep spacing 'cubic'"),
        ({"colour": "red"}, "unknown option(s) colour"),
    ],
)
def test_invalid_values_name_the_value(values, fragment):
    with pytest.raises(BenchError) as error:
        make_config(values)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_param_overrides_parse_yaml_values():
    assert parse_param_overrides(["drop_fraction=0.05", "stages=[4:4, 2:4]", "name=x"]) == {
        "drop_fraction": 0.05,
        "stages": ["4:4", "2:4"],
        "name": "x",
    }


def test_cli_bad_value_is_one_line_exit_2():
    result = CliRunner().invoke(app, ["run", "--sparsity", "1.5"])
    assert result.exit_code == 2
    assert "sparsity 1.5 is outside [0, 1)" in result.output
    assert "Traceback" not in result.output


def test_cli_yaml_config_is_overridden_by_flags(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("method: magnitude\nsparsity: 0.9\nseed: 7\n")
    captured = {}

    def fake_run(cfg):
        captured["cfg"] = cfg
        return []

    monkeypatch.setattr("diffprune_bench.harness.run", fake_run)
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--sparsity", "0.25"])
    assert result.exit_code == 0, result.output
    assert captured["cfg"].sparsity == 0.25  # the flag wins
    assert captured["cfg"].seed == 7  # the file is used where no flag is given


def test_cli_missing_config_file(tmp_path):
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_yaml_keeps_nm_patterns_and_reads_exponent_floats():
    from diffprune_bench.config import yaml_load

    assert yaml_load("p: [2:4, 1:16]\nlr: 2e-4\nn: 10") == {"p": ["2:4", "1:16"], "lr": 2e-4, "n": 10}
