"""Bad input and damaged files, one table: each case gets its exit code and one line naming the file or
value (an ``error:`` refusal, or a ``warning:`` for what is skipped or recomputed), never a traceback,
and where nothing may change the files under the results folder are the same before and after.

Command cases run the real CLI; callable cases run a library entry point behind the CLI's own
BenchError handling (``friendly_errors``), so both see the exit code a user would. Everything is built
by hand (records, checkpoints, caches): no case trains more than one optimizer step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from fake_records import make_record, save, save_with_features
from typer.testing import CliRunner

from diffprune_bench.cli import app, friendly_errors
from diffprune_bench.config import make_config
from diffprune_bench.harness import resolve_config
from diffprune_bench.results import write_config, write_record

FAST = ["--device", "cpu", "--base-steps", "1", "--sample-steps", "2", "--num-samples", "8"]
SUITE = """name: errors
datasets: [digits]
methods: [static]
sparsities: [0.5]
seeds: [0]
options: {base_steps: 1, finetune_steps: 1, batch_size: 8, sample_steps: 2, num_samples: 8}
"""
Command = list[str] | Callable[[], Any]


@dataclass
class Case:
    name: str
    command: Callable[[Path], Command]  # CLI arguments, or a callable, given the case's folder
    exit_code: int
    says: str  # a line of the output holds this (the bad value or file, and what to do)
    setup: Callable[[Path], None] = lambda root: None
    unchanged: bool = True  # the files under root/runs are the same before and after
    check: Callable[[Path], None] = lambda root: None  # what must hold afterwards (a recomputed cache, ...)


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _run(*extra: str, method: str = "dense") -> Callable[[Path], list[str]]:
    return lambda root: ["run", "--method", method, *FAST, "--results-dir", str(root / "runs"),
                         "--cache-dir", str(root / "cache"), *extra]


def _with_config(text: str | bytes) -> tuple[Callable[[Path], list[str]], Callable[[Path], None]]:
    return (lambda root: _run("--config", str(root / "run.yaml"))(root),
            lambda root: _write(root / "run.yaml", text))


def _sweep(*extra: str, suite: str = "suite.yaml") -> Callable[[Path], list[str]]:
    return lambda root: ["sweep", str(root / suite), "--results-dir", str(root / "runs"), *extra]


def _leaderboard(root: Path) -> list[str]:
    return ["leaderboard", "--results-dir", str(root / "runs"), "--out", str(root / "out"), "--no-plots",
            "--no-site"]


# ---------------------------------------------------------------- setups
def _suite(text: str = SUITE) -> Callable[[Path], None]:
    return lambda root: _write(root / "suite.yaml", text)


def _resumable(checkpoint: Callable[[Path], None]) -> Callable[[Path], None]:
    """A run folder ``kept`` with the config the command resumes with and ``checkpoint`` written into it."""

    def setup(root: Path) -> None:
        cfg = resolve_config(make_config({"method": "dense", "device": "cpu", "base_steps": 1, "sample_steps": 2,
                                          "num_samples": 8, "results_dir": str(root / "runs"),
                                          "cache_dir": str(root / "cache"), "run_id": "kept"}))
        write_config(root / "runs" / "kept", cfg.to_dict())
        checkpoint(root / "runs" / "kept" / "checkpoint" / "checkpoint.pt")

    return setup


def _truncated_checkpoint(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "model": {"w": torch.zeros(1000)}, "optimizer": {}, "ema": None, "generator": None,
                "cpu_rng": torch.get_rng_state()}, path)
    path.write_bytes(path.read_bytes()[:300])


def _foreign_checkpoint(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(2, 2)}, path)  # a state dict, not a training checkpoint


def _weightless_base(root: Path) -> None:
    _write(root / "base" / "config.json", json.dumps({"_class_name": "UNet2DModel"}))


def _records(*broken: Callable[[Path], None]) -> Callable[[Path], None]:
    """A dense and a static record the leaderboard can use, and the ``broken`` ones beside them."""

    def setup(root: Path) -> None:
        save(root / "runs", make_record("dense", 0.0, 0, 1.0))
        save(root / "runs", make_record("static", 0.5, 0, 2.0))
        for make in broken:
            make(root / "runs")

    return setup


def _record_with(run_id: str, **changes: Any) -> Callable[[Path], None]:
    def make(runs: Path) -> None:
        record = {**make_record("rigl", 0.5, 0, 3.0, run_id=run_id), **changes}
        save(runs, {k: v for k, v in record.items() if v is not ...}, samples=False)

    return make


def _metrics(fid: float) -> dict[str, Any]:
    return {**make_record("rigl", 0.5, 0, 3.0)["metrics"], "fid": fid}


def _truncated_features(runs: Path) -> None:
    path = save_with_features(runs, make_record("rigl", 0.5, 0, 3.0, run_id="short"), shift=0.3)
    features = path.parent / "features.npy"
    features.write_bytes(features.read_bytes()[:200])


def _board_lacks_rigl(root: Path) -> None:
    board = (root / "out" / "leaderboard.md").read_text()
    assert "static" in board and "rigl" not in board


# ---------------------------------------------------------------- callables behind the CLI
def _corrupt_cached_base(root: Path) -> Callable[[], Any]:
    """A cached base whose weights file is cut short: the run trains it again instead of failing."""
    from diffprune_bench.base_model import base_cache_key, get_base_model
    from diffprune_bench.data import load_dataset

    cfg = resolve_config(make_config({"device": "cpu", "base_steps": 1, "batch_size": 8,
                                      "results_dir": str(root / "runs"), "cache_dir": str(root / "cache")}))
    data = load_dataset("digits")
    folder = root / "cache" / "bases" / base_cache_key(cfg, data)

    def call() -> Any:
        base = get_base_model(cfg, data, torch.device("cpu"))
        assert base.info["cached"] is False  # trained again
        return base

    def corrupt() -> None:
        get_base_model(cfg, data, torch.device("cpu"))  # writes the cache entry
        weights = folder / "model" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    corrupt()
    return call


def _reloads_cached_base(root: Path) -> None:
    (folder,) = (p for p in (root / "cache" / "bases").iterdir() if not p.name.startswith("."))  # .lock files
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(folder / "model")  # the entry was replaced by a whole one


class _Extractor:
    """A feature extractor that counts its calls: reference statistics recomputed means one more call."""

    name = "toy"
    calls = 0

    def fingerprint(self) -> str:
        return "toy"

    def features(self, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
        _Extractor.calls += 1
        return images.flatten(1).double().numpy()


def _corrupt_reference_stats(root: Path) -> Callable[[], Any]:
    from diffprune_bench.metrics.fid import reference_stats

    images = torch.randn(16, 1, 2, 2)
    reference_stats(_Extractor(), lambda: images, root / "cache", {"dataset": "toy", "split": "reference"})
    (cached,) = (root / "cache" / "fid-stats").iterdir()
    cached.write_bytes(cached.read_bytes()[:50])
    calls = _Extractor.calls

    def call() -> Any:
        stats = reference_stats(_Extractor(), lambda: images, root / "cache", {"dataset": "toy", "split": "reference"})
        assert _Extractor.calls == calls + 1 and np.allclose(stats.mu, images.flatten(1).double().numpy().mean(0))
        return stats

    return call


def _reloads_reference_stats(root: Path) -> None:
    (cached,) = (root / "cache" / "fid-stats").iterdir()
    assert np.load(cached)["features"].shape == (16, 4)


def _other_models_checkpoint(root: Path) -> Callable[[], Any]:
    """A whole training checkpoint of another model under the run's name: refused, not half-loaded."""
    from diffprune_bench.context import MethodContext
    from diffprune_bench.diffusion import make_noise_scheduler
    from diffprune_bench.registry import Method
    from diffprune_bench.trainer import Trainer

    def trainer(width: int) -> Trainer:
        ctx = MethodContext(device=torch.device("cpu"), sparsity=0.0, total_steps=4, batch_size=2, seed=0,
                            noise_scheduler=make_noise_scheduler(), sample_shape=(1, 2, 2), sample_steps=2,
                            timestep_spacing="leading", batches=iter(()), generator=torch.Generator(),
                            count_macs=lambda model: 0.0)
        return Trainer(torch.nn.Linear(width, 1), Method(), ctx, lr=1e-3, checkpoint_dir=root / "runs" / "ck",
                       resume=True)

    trainer(3).save_checkpoint(2)
    return lambda: trainer(5).load_checkpoint()


CONFIG_DUPLICATE = _with_config("lr: 0.001\nseed: 1\nlr: 0.002\n")
CONFIG_LATIN1 = _with_config("lr: 0.001\n# learning rate of the caf\u00e9 run\n".encode("latin-1"))
CASES = [
    # ---- configs and suites
    Case("config key given twice", CONFIG_DUPLICATE[0], 2, "duplicate key 'lr' on line 3 (first on line 1)",
         CONFIG_DUPLICATE[1]),
    Case("config not UTF-8", CONFIG_LATIN1[0], 2, "is not UTF-8 text", CONFIG_LATIN1[1]),
    Case("config is a folder", lambda root: _run("--config", str(root / "configs"))(root), 2,
         "is a folder; give the YAML file", lambda root: (root / "configs").mkdir()),
    Case("suite key given twice", _sweep("--dry-run"), 2, "duplicate key 'seeds' on line 7 (first on line 5)",
         _suite(SUITE + "seeds: [1]\n")),
    Case("suite is a folder", _sweep("--dry-run", suite="suites"), 2, "is a folder",
         lambda root: (root / "suites").mkdir()),
    Case("sweep --jobs 0", _sweep("--jobs", "0"), 2, "jobs 0 must be a positive integer", _suite()),
    Case("sweep --jobs -1", _sweep("--jobs", "-1"), 2, "jobs -1 must be a positive integer", _suite()),
    # ---- method parameters of the wrong type
    Case("tolerance not a number", _run("--sparsity", "0.3", "-p", "tolerance=abc", method="ddsm"), 2,
         "parameter tolerance 'abc' must be a number"),
    Case("ddsm population not an integer", _run("--sparsity", "0.3", "-p", "population=2.5", method="ddsm"), 2,
         "parameter population 2.5 must be an integer"),
    Case("magnitude p a word", _run("--sparsity", "0.3", "-p", "p=two", method="magnitude"), 2,
         "parameter p 'two' must be an integer"),
    # ---- a folder or file that cannot be what it should
    Case("base folder without weights", lambda root: _run("--base", str(root / "base"))(root), 2,
         "a config.json but no weights", _weightless_base),
    Case("base is a file", lambda root: _run("--base", str(root / "run.yaml"))(root), 2, "is not a folder",
         lambda root: _write(root / "run.yaml", "lr: 0.1\n")),
    Case("inception weights a folder", lambda root: _run("--fid-extractor", "inception-v3", "--inception-weights",
                                                         str(root))(root), 2, "is a folder", unchanged=False),
    Case("resume a truncated checkpoint", _run("--run-id", "kept", "--resume"), 2, "is unreadable (truncated",
         _resumable(_truncated_checkpoint)),
    Case("resume a foreign file", _run("--run-id", "kept", "--resume"), 2, "is not a training checkpoint (no step",
         _resumable(_foreign_checkpoint)),
    Case("resume another model's checkpoint", _other_models_checkpoint, 2, "belongs to another model or method",
         unchanged=False),
    # ---- damaged caches: recomputed with a warning
    Case("cached base cut short", _corrupt_cached_base, 0, "warning: cached base", check=_reloads_cached_base),
    Case("cached reference statistics cut short", _corrupt_reference_stats, 0,
         "warning: cached reference statistics", check=_reloads_reference_stats),
    # ---- records the leaderboard skips with a warning naming the file
    Case("record FID NaN", _leaderboard, 0, "runs/nan/record.json: metrics.fid is nan",
         _records(_record_with("nan", metrics=_metrics(math.nan))), check=_board_lacks_rigl),
    Case("record FID infinite", _leaderboard, 0, "runs/inf/record.json: metrics.fid is inf",
         _records(_record_with("inf", metrics=_metrics(math.inf))), check=_board_lacks_rigl),
    Case("record KID null string", _leaderboard, 0, "metrics.kid is 'n/a'",
         _records(_record_with("kid", metrics={**_metrics(3.0), "kid": "n/a"})), check=_board_lacks_rigl),
    Case("record of another schema", _leaderboard, 0, "runs/future/record.json: schema_version 2",
         _records(lambda runs: write_record(runs / "future", {**make_record("rigl", 0.5, 0, 3.0, run_id="future"),
                                                              "schema_version": 2})), check=_board_lacks_rigl),
    Case("record without metrics", _leaderboard, 0, "runs/bare/record.json: an ok record without metrics",
         _records(_record_with("bare", metrics=...)), check=_board_lacks_rigl),
    Case("record without protocol or config", _leaderboard, 0, "an ok record without config or protocol",
         _records(_record_with("bare", protocol=..., config=...)), check=_board_lacks_rigl),
    Case("truncated features.npy", _leaderboard, 0, "features file", _records(_truncated_features),
         check=_board_lacks_rigl),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _invoke(command: Command, capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, everything printed) of a CLI command line, or of a callable behind the CLI's handling."""
    if isinstance(command, list):
        result = CliRunner().invoke(app, command)
        return result.exit_code, result.output + capfd.readouterr().err
    try:
        friendly_errors(command)()
        code = 0
    except typer.Exit as done:
        code = done.exit_code
    captured = capfd.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_table(case: Case, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    case.setup(tmp_path)
    command = case.command(tmp_path)
    capfd.readouterr()  # what the setup printed is not the case's
    before = _snapshot(tmp_path / "runs")
    code, output = _invoke(command, capfd)
    assert code == case.exit_code, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if case.says in line]
    assert len(lines) == 1, output  # said once, on one line
    assert lines[0].startswith("error: " if case.exit_code == 2 else "warning: "), lines[0]
    if case.unchanged:
        assert _snapshot(tmp_path / "runs") == before  # nothing written, nothing lost
    case.check(tmp_path)


def test_seed_column_lists_only_the_seeds_behind_the_numbers(tmp_path: Path) -> None:
    from diffprune_bench.report.leaderboard import build
    from diffprune_bench.results import load_records

    runs = tmp_path / "runs"
    save(runs, make_record("dense", 0.0, 0, 1.0))
    for seed, fid in ((0, 2.0), (1, 4.0), (2, math.nan)):
        save(runs, make_record("static", 0.5, seed, fid))
    (group,) = build(load_records(runs)).groups
    row = group.table[group.table["method"] == "static"].iloc[0]
    assert row["seeds"] == "0,1" and row["n_seeds"] == 2
    assert row["fid_mean"] == pytest.approx(3.0)


def test_method_parameter_types_accept_what_yaml_gives() -> None:
    """The type check refuses only wrong types: ints for floats, lists for tuples and null for optionals pass."""
    from diffprune_bench.registry import create_method

    assert create_method("ddsm", {"mutation_prob": None, "population": 4}, sparsity=0.3).params.population == 4
    assert create_method("ddsm", {"fid_weight": 1, "search_seed": None}, sparsity=0.3).params.fid_weight == 1
    assert list(create_method("static", {"dense_layers": ["conv_in"]}, sparsity=0.5).params.dense_layers) == ["conv_in"]
    assert create_method("deepcache", {"interval": 2}).params.interval == 2


def test_yaml_merge_keys_are_not_duplicates() -> None:
    from diffprune_bench.config import yaml_load

    assert yaml_load("base: &b {lr: 1, seed: 2}\nrun:\n  <<: *b\n  lr: 3\n")["run"] == {"lr": 3, "seed": 2}


# ---------------------------------------------------------------- file modes
@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request: pytest.FixtureRequest):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*")}


def test_exported_pipeline_honours_the_umask(tmp_path: Path, umask: int) -> None:
    from diffprune_bench.export import export_pipeline
    from diffprune_bench.models import build_model

    export_pipeline(build_model("tiny", seed=0), tmp_path / "model", sample_steps=2, spacing="leading")
    modes = _modes(tmp_path / "model")
    assert "unet/diffusion_pytorch_model.safetensors" in modes
    for name, mode in modes.items():
        wanted = (0o777 if (tmp_path / "model" / name).is_dir() else 0o666) & ~umask
        assert mode == wanted, (name, oct(mode), oct(wanted))


def test_atomic_writers_honour_the_umask(tmp_path: Path, umask: int) -> None:
    from diffprune_bench.filemodes import atomic_write, atomic_write_text
    from diffprune_bench.trained_cache import store_trained

    atomic_write_text(tmp_path / "a.json", "{}\n")
    atomic_write(tmp_path / "b.pt", lambda tmp: torch.save({"x": 1}, tmp))
    store_trained(tmp_path / "trained" / "deployables.pt", [], {}, "run")
    from safetensors.torch import save_file  # writes 0600 by itself: the reason the helper exists

    atomic_write(tmp_path / "c.safetensors", lambda tmp: save_file({"x": torch.zeros(1)}, str(tmp)))
    for name in ("a.json", "b.pt", "trained/deployables.pt", "c.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary left behind


def test_cached_base_and_reference_stats_honour_the_umask(tmp_path: Path, umask: int) -> None:
    from diffprune_bench.base_model import get_base_model
    from diffprune_bench.data import load_dataset
    from diffprune_bench.metrics.fid import reference_stats

    cfg = resolve_config(make_config({"device": "cpu", "base_steps": 1, "batch_size": 8,
                                      "results_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")}))
    get_base_model(cfg, load_dataset("digits"), torch.device("cpu"))
    reference_stats(_Extractor(), lambda: torch.randn(8, 1, 2, 2), tmp_path / "cache", {"dataset": "toy"})
    modes = _modes(tmp_path / "cache")
    assert any(name.endswith(".safetensors") for name in modes)
    for name, mode in modes.items():
        wanted = (0o777 if (tmp_path / "cache" / name).is_dir() else 0o666) & ~umask
        assert mode == wanted, (name, oct(mode), oct(wanted))
