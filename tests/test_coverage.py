"""The intervals' coverage by simulation with the table's control structure (a small, seeded run)."""

from __future__ import annotations

from diffprune_bench.report.coverage import Scenario, simulate


def test_intervals_cover_the_true_difference_with_a_shared_control_and_unequal_seed_variances():
    scenario = Scenario(rows=5, seeds=5, samples=100, draws=50)  # seed variances 1x to 10x, one control
    result = simulate(scenario, replications=30, seed=0)
    assert result.seed_variance_ratio > 4  # the rows really are heteroscedastic
    assert result.pooled == 0  # five seeds: every row keeps its own variance
    assert result.row >= 0.90 and result.pair >= 0.90


def test_holm_keeps_the_family_wise_error_under_the_null():
    result = simulate(Scenario(rows=5, seeds=5, samples=100, draws=50, null=True), replications=30, seed=1)
    assert result.family_error <= 0.15  # nominal 0.05; 30 tables leave room for chance, not for no correction
    assert result.row >= 0.90
