"""The plateau rule of ``benchmarks/bench_base_plateau.py``: it picks the base budget a suite trains to."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_base_plateau.py"


def load_plateau_script():
    spec = importlib.util.spec_from_file_location("bench_base_plateau", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plateau_module = load_plateau_script()  # the script is loaded once, not once per test
plateau_rule = plateau_module.plateau


def curve(fids_by_seed: dict[int, list[float]], steps: list[int]) -> pd.DataFrame:
    return pd.DataFrame([{"seed": seed, "steps": t, "fid": fid}
                         for seed, fids in fids_by_seed.items() for t, fid in zip(steps, fids, strict=True)])


STEPS = [1000, 1500, 2250, 3375, 5000, 7500]


def test_a_wide_early_seed_spread_does_not_call_a_plateau_while_the_fid_keeps_falling():
    # fashion-mnist's measured curve: seeds 23.9 and 13.9 at 1,000 steps, still falling 0.75 at 7,500
    table = curve({0: [23.87, 14.71, 10.28, 6.04, 3.78, 2.75], 1: [13.93, 8.67, 5.17, 3.42, 2.92, 2.45]}, STEPS)
    assert plateau_rule(table) is None


def test_the_plateau_is_where_every_later_step_stays_within_the_seed_spread():
    # digits' measured curve (3 seeds): 2,025 -> 3,038 gains 0.08 against a seed std of ~0.13-0.16
    steps = [400, 600, 900, 1350, 2025, 3038]
    table = curve({0: [2.20, 1.66, 1.00, 0.65, 0.40, 0.35],
                   1: [2.30, 1.70, 1.15, 0.80, 0.55, 0.45],
                   2: [2.50, 1.68, 1.28, 0.93, 0.72, 0.61]}, steps)
    assert plateau_rule(table) == 2025


def test_one_flat_step_followed_by_a_real_drop_is_not_a_plateau():
    table = curve({0: [10.0, 9.9, 5.0, 4.95, 4.9, 4.9], 1: [10.4, 10.2, 5.3, 5.2, 5.2, 5.1]}, STEPS)
    assert plateau_rule(table) == 2250


def _scored(seed: int, steps: list[int], fids: list[float], weights: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"seed": seed, "steps": steps, "fid": fids, "weights": weights})


def test_a_longer_run_repeating_a_budget_counts_it_once_when_its_weights_agree():
    short = _scored(0, [5000, 7500], [3.78, 2.75], ["w5000", "w7500"])
    longer = _scored(0, [7500, 11250], [2.75, 2.30], ["w7500", "w11250"])
    table = plateau_module.combine([short, longer])
    assert table["steps"].tolist() == [5000, 7500, 11250] and table["fid"].tolist() == [3.78, 2.75, 2.30]


def test_runs_that_reached_other_weights_at_one_budget_are_refused():
    short = _scored(0, [7500], [2.75], ["w7500"])
    other = _scored(0, [7500, 11250], [2.61, 2.30], ["different", "w11250"])
    with pytest.raises(SystemExit, match="seed 0 at 7500 steps: the runs reached different weights"):
        plateau_module.combine([short, other])
