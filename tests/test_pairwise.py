"""Pairwise comparisons at a target: paired Δ and p by hand, Holm on known p-values, letters, best row."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
from cleanfid.fid import frechet_distance
from scipy import stats as scipy_stats

from diffprune_bench.report.pairwise import TargetComparison, compare_rows, holm, letters
from diffprune_bench.report.stats import BOOTSTRAP_DRAWS, Reference, combine

SEEDS = (0, 1, 2, 3, 4)


def _fid(features: np.ndarray, ref: Reference) -> float:
    return float(frechet_distance(features.mean(0), np.cov(features, rowvar=False), ref.mu, ref.sigma))


@pytest.fixture(scope="module")
def table():
    """Three rows on the same noise per seed (row C clearly worse), and their reference."""
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 4))
    ref = Reference(reference.mean(0), np.cov(reference, rowvar=False), reference)
    noise = {s: rng.normal(size=(80, 4)) for s in SEEDS}
    shifts = {"A": 0.10, "B": 0.15, "C": 0.60}
    rows = {name: {s: noise[s] + shift + 0.1 * rng.normal(size=(80, 4)) + 0.05 * rng.normal(size=4)
                   for s in SEEDS} for name, shift in shifts.items()}
    means = {name: float(np.mean([_fid(rows[name][s], ref) for s in SEEDS])) for name in rows}
    return ref, rows, means


def test_pairwise_delta_and_holm_p_match_a_hand_computation(table):
    ref, rows, means = table
    comparison = compare_rows(0.5, rows, means, {}, ref)
    assert comparison.rows == ["A", "B", "C"]  # lowest mean FID first
    by_hand = {}
    for a, b in combinations(["A", "B", "C"], 2):
        per_seed, boots = [], []
        for seed in SEEDS:
            x, y = rows[a][seed], rows[b][seed]
            per_seed.append(_fid(x, ref) - _fid(y, ref))
            idx = np.random.default_rng(seed).integers(0, 80, size=(BOOTSTRAP_DRAWS, 80))  # the same draws
            boots.append(np.var([_fid(x[i], ref) - _fid(y[i], ref) for i in idx], ddof=1))
        se = math.sqrt(max(np.var(per_seed, ddof=1), np.mean(boots)) / len(SEEDS))
        mean = float(np.mean(per_seed))
        by_hand[(a, b)] = (mean, 2 * scipy_stats.t.sf(abs(mean) / se, len(SEEDS) - 1), se)
    for pair, (mean, p, se) in by_hand.items():
        delta = comparison.deltas[pair]
        assert delta.mean == pytest.approx(mean, rel=1e-7)
        assert delta.p_value == pytest.approx(p, rel=1e-5)
        assert delta.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 4) * se, rel=1e-5)
    # Holm over the target's three comparisons, by hand
    pairs = sorted(by_hand, key=lambda k: by_hand[k][1])
    running = 0.0
    for position, pair in enumerate(pairs):
        running = max(running, min(1.0, by_hand[pair][1] * (3 - position)))
        assert comparison.adjusted[pair] == pytest.approx(running, rel=1e-5)
    assert comparison.delta("C", "A")[0] == pytest.approx(-by_hand[("A", "C")][0], rel=1e-7)
    assert comparison.better("A", "C") and comparison.better("B", "C") and not comparison.better("A", "B")
    assert comparison.best is None and comparison.tied() == ["A", "B"]
    assert comparison.letters() == {"A": "a", "B": "a", "C": "b"}


def test_holm_on_known_p_values():
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02 .. 0.06
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # 0.5 x 2 is capped at 1; 0.9 x 1 is raised to the running maximum (never below a smaller p's)
    assert holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])
    assert holm([]).size == 0


def test_letters_for_a_non_transitive_significance_pattern():
    # A = B and B = C but A != C
    assert letters(["A", "B", "C"], {frozenset("AC")}) == {"A": "a", "B": "ab", "C": "b"}


def test_letters_for_known_matrices():
    assert letters(list("ABCD"), set()) == dict.fromkeys("ABCD", "a")
    assert letters(list("ABC"), {frozenset(p) for p in ("AB", "AC", "BC")}) == {"A": "a", "B": "b", "C": "c"}
    # A != C, A != D, B != D: maximal groups {A, B}, {B, C}, {C, D}
    different = {frozenset(p) for p in ("AC", "AD", "BD")}
    shown = letters(list("ABCD"), different)
    assert shown == {"A": "a", "B": "ab", "C": "bc", "D": "c"}
    for a, b in combinations("ABCD", 2):  # sharing a letter <=> not significantly different
        assert bool(set(shown[a]) & set(shown[b])) == (frozenset((a, b)) not in different)


def _comparison(means: dict[str, float], pairs: dict[tuple[str, str], tuple[float, float]]) -> TargetComparison:
    """A comparison with given (Δ, Holm p) per pair."""
    comparison = TargetComparison(0.5, sorted(means, key=means.get), {}, means)
    for pair, (delta, p) in pairs.items():
        comparison.deltas[pair] = combine([delta] * 5, [1e-6] * 5)
        comparison.adjusted[pair] = p
    return comparison


def test_best_must_beat_every_other_row_not_only_the_runner_up():
    means = {"A": 1.0, "B": 1.2, "C": 1.3}
    beats_runner_up_only = _comparison(means, {("A", "B"): (-0.2, 0.01), ("A", "C"): (-0.3, 0.2),
                                               ("B", "C"): (-0.1, 0.5)})
    assert beats_runner_up_only.best is None
    assert beats_runner_up_only.tied() == ["A", "C"]
    beats_all = _comparison(means, {("A", "B"): (-0.2, 0.01), ("A", "C"): (-0.3, 0.04), ("B", "C"): (-0.1, 0.5)})
    assert beats_all.best == "A" and beats_all.letters() == {"A": "a", "B": "b", "C": "b"}
    unpaired = _comparison({**means, "D": 1.5}, {("A", "B"): (-0.2, 0.01), ("A", "C"): (-0.3, 0.04)})
    assert unpaired.best is None  # D has no paired evidence: it cannot be beaten significantly
    assert "D" not in unpaired.letters()
