"""Every ``diffbench`` command in the README's code blocks still parses: run with ``--help`` appended (click
rejects an option that no longer exists before it prints the help), and local sweeps also as a dry run,
which loads and validates the whole suite. Commands behind launchers (``accelerate launch``, ``torchrun``)
are checked from ``-m diffprune_bench.cli`` on."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffprune_bench.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
LAUNCHED = "-m diffprune_bench.cli"


def readme_commands() -> list[list[str]]:
    """The arguments after ``diffbench`` of every command in a shell code block (continuations joined)."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["diffbench"]:
                commands.append(words[1:])
            elif LAUNCHED in " ".join(words):
                commands.append(words[words.index("diffprune_bench.cli") + 1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_kind():
    subcommands = {words[0] for words in COMMANDS}
    assert {"run", "sweep", "leaderboard", "regress", "methods", "datasets", "macs"} <= subcommands
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w) for w in COMMANDS])
def test_every_readme_command_parses(words):
    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


LOCAL_SWEEPS = [w for w in COMMANDS if w[0] == "sweep" and not {"--executor", "--status"} & set(w)]


@pytest.mark.parametrize("words", LOCAL_SWEEPS, ids=[" ".join(w) for w in LOCAL_SWEEPS])
def test_readme_sweeps_run_dry(words, tmp_path, monkeypatch):
    monkeypatch.chdir(README.parent)  # suite paths are relative to the repository
    args = [w for w in words if w != "--dry-run"]
    result = CliRunner().invoke(app, [*args, "--dry-run", "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert re.search(r"suite \w+: \d+ cells, 0 already done, \d+ to run", result.output), result.output
