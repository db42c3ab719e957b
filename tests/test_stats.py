"""Paired statistics: the bootstrap interval against a hand computation on fixed features."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cleanfid.fid import frechet_distance, kernel_distance
from scipy import stats as scipy_stats

from diffprune_bench.report.stats import (
    BOOTSTRAP_DRAWS,
    KidTerms,
    Reference,
    bootstrap_counts,
    combine,
    mean_interval,
    paired_fid_delta,
    paired_kid_delta,
    pooled_seed_variance,
    with_pooled_variance,
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 6))
    rows = {s: rng.normal(loc=0.3, size=(120, 6)) for s in (0, 1, 2)}
    controls = {s: rows[s] * 0.9 + rng.normal(scale=0.2, size=(120, 6)) for s in (0, 1, 2)}
    return Reference(reference.mean(0), np.cov(reference, rowvar=False), reference), rows, controls


def _fid(features: np.ndarray, ref: Reference) -> float:
    return float(frechet_distance(features.mean(0), np.cov(features, rowvar=False), ref.mu, ref.sigma))


def test_fid_equals_clean_fid_including_on_bootstrap_multiplicities(data):
    ref, rows, _ = data
    assert ref.fid(rows[0]) == pytest.approx(_fid(rows[0], ref), rel=1e-9)
    counts = bootstrap_counts(120, 4, seed=3)
    for c in counts:
        resampled = np.repeat(rows[0], c.astype(int), axis=0)  # the draw as an explicit resampled set
        assert ref.fid(rows[0], c[None])[0] == pytest.approx(_fid(resampled, ref), rel=1e-9)


def test_paired_fid_interval_matches_a_hand_computation(data):
    ref, rows, controls = data
    per_seed, variances = [], []
    for seed in (0, 1, 2):
        a, b = rows[seed], controls[seed]
        per_seed.append(_fid(a, ref) - _fid(b, ref))
        idx = np.random.default_rng(seed).integers(0, 120, size=(BOOTSTRAP_DRAWS, 120))  # same draws, by hand
        boots = [_fid(a[i], ref) - _fid(b[i], ref) for i in idx]
        variances.append(np.var(boots, ddof=1))
    mean = np.mean(per_seed)
    se = math.sqrt(max(np.var(per_seed, ddof=1), np.mean(variances)) / 3)
    half = scipy_stats.t.ppf(0.975, 2) * se

    delta = paired_fid_delta(rows, controls, ref)
    assert delta.per_seed == pytest.approx(per_seed, rel=1e-9)
    assert delta.bootstrap_var == pytest.approx(np.mean(variances), rel=1e-6)
    assert (delta.mean, delta.low, delta.high) == pytest.approx((mean, mean - half, mean + half), rel=1e-6)
    assert delta.seeds == [0, 1, 2]


def test_pairing_shrinks_the_interval_compared_with_unpaired_noise(data):
    ref, rows, _ = data
    rng = np.random.default_rng(7)
    paired = {s: rows[s] + 0.01 * rng.normal(size=rows[s].shape) for s in rows}  # same noise, tiny change
    shuffled = {s: rng.permutation(rows[s]) + 0.01 * rng.normal(size=rows[s].shape) for s in rows}
    tight = paired_fid_delta(paired, rows, ref)
    loose = paired_fid_delta(shuffled, {s: rows[(s + 1) % 3] for s in rows}, ref)
    assert tight.bootstrap_var < loose.bootstrap_var / 10


def test_seed_spread_widens_the_interval_when_it_exceeds_sampling_noise():
    narrow = combine([0.5, 0.5, 0.5], [0.01, 0.01, 0.01])
    wide = combine([0.0, 0.5, 1.0], [0.01, 0.01, 0.01])
    assert narrow.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 2) * math.sqrt(0.01 / 3))
    assert wide.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 2) * math.sqrt(0.25 / 3))
    assert narrow.significant and not wide.significant
    single = combine([0.3], [0.01])
    assert single.half_width == pytest.approx(1.959964 * 0.1, rel=1e-5)


def test_pooled_seed_variance_is_df_weighted_and_sets_the_t_quantile():
    a = combine([0.0, 1.0], [0.01, 0.01])  # seed variance 0.5, 1 df
    b = combine([0.2, 0.4, 0.6], [0.01, 0.01, 0.01])  # seed variance 0.04, 2 df
    pool = pooled_seed_variance([a, b, None, combine([0.3], [0.01])])
    pooled, df = pool.var, pool.df
    assert df == 3 and pooled == pytest.approx((1 * 0.5 + 2 * 0.04) / 3) and not pool.outliers
    assert pool.apply(a).half_width == pytest.approx(with_pooled_variance(a, pooled, df).half_width)
    narrowed = with_pooled_variance(a, pooled, df)
    assert narrowed.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 3) * math.sqrt(pooled / 2))
    assert narrowed.half_width < a.half_width  # t(3) instead of t(1)
    floor = with_pooled_variance(combine([0.1, 0.1], [0.09, 0.09]), 0.0001, 40)
    assert floor.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 40) * math.sqrt(0.09 / 2))  # sampling floor


def test_kid_terms_equal_the_unbiased_mmd_and_track_clean_fid(data):
    ref, rows, _ = data
    x, y = rows[0], ref.features
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    n, m = len(x), len(y)
    by_hand = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2 * kxy.mean())
    terms = KidTerms(x, ref)
    assert terms.kid() == pytest.approx(by_hand, rel=1e-9)
    counts = bootstrap_counts(n, 2, seed=1)
    resampled = np.repeat(np.arange(n), counts[0].astype(int))
    kb = kxx[np.ix_(resampled, resampled)]
    boot = (kb.sum() - np.trace(kb)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy[
        resampled].mean()
    assert terms.kid(counts)[0] == pytest.approx(boot, rel=1e-9)
    np.random.seed(0)
    assert terms.kid() == pytest.approx(kernel_distance(x, y, num_subsets=50, max_subset_size=120), abs=0.05)
    assert paired_kid_delta(rows, rows, ref).mean == 0.0


def test_mean_interval_is_a_t_interval():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(scipy_stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert math.isnan(mean_interval([1.0])[1])


def test_a_row_whose_seed_spread_dwarfs_the_others_stays_out_of_the_pool():
    """FID's spread grows with FID: one unstable row (seed variance 100x) must not widen every interval."""
    rng = np.random.default_rng(0)
    alike = [combine(list(0.3 + rng.normal(0, 0.1, 2)), [0.001, 0.001]) for _ in range(10)]
    unstable = combine([1.0, 4.0], [0.001, 0.001])  # seed variance 4.5
    deltas = [*alike, None, unstable]
    pool = pooled_seed_variance(deltas)
    assert pool.outliers == {11} and pool.df == 10
    assert pool.var == pytest.approx(np.mean([d.seed_var for d in alike]))  # the pool of the alike rows alone
    assert pool.apply(unstable, 11) is unstable  # its own variance and df (t with 1 df)
    assert pool.apply(alike[0], 0).half_width < 0.5
    everything = sum(d.seed_var for d in [*alike, unstable]) / 11
    assert with_pooled_variance(alike[0], everything, 11).half_width > 2 * pool.apply(alike[0], 0).half_width
    # rows that merely differ by chance stay in: ten 2-seed rows of one spread are split off rarely (at
    # about the test's family-wise level, 1 %; a 1-df variance is a scaled chi-square, heavy-tailed)
    false_alarms = sum(
        bool(pooled_seed_variance([combine(list(rng.normal(0, 0.1, 2)), [1e-6, 1e-6]) for _ in range(10)]).outliers)
        for _ in range(400))
    assert false_alarms / 400 < 0.03
