"""``make demo`` trains the digits suite's base: its config and the sweep's dense cell of seed 0 resolve to the
same base cache key, so the demo's cached base is the table's and its FID is the table's dense row."""

from __future__ import annotations

import shlex
from pathlib import Path

from diffprune_bench.base_model import base_cache_key
from diffprune_bench.config import make_config
from diffprune_bench.harness import resolve_config
from diffprune_bench.sweep.cells import Cell
from diffprune_bench.sweep.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]


def demo_options() -> dict[str, str]:
    """The options of the Makefile's ``demo`` recipe (``diffbench run --method dense --dataset digits``)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    recipe = lines[lines.index(next(line for line in lines if line.startswith("demo:"))) + 1]
    words = shlex.split(recipe)
    assert words[0].endswith("diffbench") and words[1] == "run", recipe
    flags = words[2:]
    assert all(flag.startswith("--") for flag in flags[::2]) and len(flags) % 2 == 0, recipe
    return {flag[2:].replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2], strict=True)}


def test_the_demo_and_the_suites_dense_cell_share_one_base():
    demo = resolve_config(make_config(demo_options()))
    suite = load_suite(ROOT / "benchmarks" / "digits.yaml")
    cell = next(c for c in suite.cells() if c.method == "dense" and c.seed == 0)
    assert cell == Cell("digits", "dense", 0.0, 0)
    table = resolve_config(suite.cell_config(cell))
    assert demo.preset == table.preset == "tiny"  # the tiny preset of the digits table
    assert base_cache_key(demo) == base_cache_key(table)
    # and the demo's evaluation is the table's: same sampler, N, extractor and thread count
    for option in ("sample_steps", "timestep_spacing", "num_samples", "fid_extractor", "threads", "seed",
                   "latency_repeats", "latency_batch"):
        assert getattr(demo, option) == getattr(table, option), option


def test_another_budget_would_be_another_base():
    """The key sees the budget: a demo that trained longer (as it once did) would not share the base."""
    demo = resolve_config(make_config(demo_options()))
    assert base_cache_key(demo.replace(base_steps=2500, batch_size=128)) != base_cache_key(demo)
    assert base_cache_key(demo.replace(threads=2)) != base_cache_key(demo)
