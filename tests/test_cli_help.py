"""``--help`` shows a default for every option of run, sweep and leaderboard; options a dataset sets say
so and show what digits uses (the values a plain ``diffbench run`` really gets)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from diffprune_bench.cli import app

WIDE = {"COLUMNS": "250", "TERM": "dumb"}


def option_blocks(command: str) -> dict[str, str]:
    """``--base-steps`` -> its whole row(s) of ``diffbench COMMAND --help``."""
    result = CliRunner().invoke(app, [command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    blocks: dict[str, str] = {}
    current = None
    for line in result.output.splitlines():
        match = re.match(r"[│|]\s+(--[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = ""
        if current:
            blocks[current] += " " + line
    blocks.pop("--help", None)
    return blocks


@pytest.mark.parametrize("command", ["run", "sweep", "leaderboard"])
def test_every_option_shows_its_default(command):
    blocks = option_blocks(command)
    assert len(blocks) >= {"run": 30, "sweep": 15, "leaderboard": 5}[command]
    missing = [name for name, text in blocks.items() if "[default:" not in text]
    assert missing == []


def test_dataset_defaults_are_named_with_the_values_digits_runs_get():
    from diffprune_bench.data import get_dataset_spec

    blocks = option_blocks("run")
    digits = get_dataset_spec("digits").defaults
    for option in ("base_steps", "finetune_steps", "scratch_steps", "batch_size", "lr", "ema_decay",
                   "sample_steps", "num_samples", "fid_extractor", "threads", "preset"):
        text = " ".join(blocks["--" + option.replace("_", "-")].split())
        assert f"dataset default; digits: {digits[option]}" in text, (option, text)
    assert "[default: (results/runs)]" in blocks["--results-dir"]  # RunConfig's own defaults
    assert "(10)" in blocks["--latency-repeats"]
