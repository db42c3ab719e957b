"""Paired statistics: the bootstrap interval against a hand computation on fixed features."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cleanfid.fid import frechet_distance, kernel_distance
from scipy import stats as scipy_stats

from diffprune_bench.report.stats import (
    BOOTSTRAP_DRAWS,
    POOL_TEST_ALPHA,
    KidTerms,
    Reference,
    RunDraws,
    bootstrap_counts,
    combine,
    homogeneity,
    mean_interval,
    paired_fid_delta,
    paired_kid_delta,
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


def test_p_value_is_the_t_test_the_interval_inverts():
    delta = combine([0.30, 0.10, 0.25, 0.05, 0.20], [0.001] * 5)
    se = math.sqrt(np.var(delta.per_seed, ddof=1) / 5)
    assert delta.df == 4
    assert delta.p_value == pytest.approx(2 * scipy_stats.t.sf(delta.mean / se, 4), rel=1e-9)
    # the interval excludes 0 exactly when p < 0.05
    assert delta.significant == (delta.p_value < 0.05)
    floored = combine([0.30, 0.10, 0.25, 0.05, 0.20], [0.2] * 5)  # sampling noise above the seed spread
    assert floored.p_value == pytest.approx(2 * scipy_stats.t.sf(floored.mean / math.sqrt(0.2 / 5), 4), rel=1e-9)


def test_rows_with_alike_spreads_share_a_pool_and_unlike_ones_keep_their_own():
    rng = np.random.default_rng(3)
    alike = [combine(list(0.3 + rng.normal(0, 0.1, 5)), [1e-4] * 5) for _ in range(6)]
    weak = homogeneity([*alike, None])  # five seeds: too few to pool on, whatever the test says
    assert not weak.pooled and weak.apply(alike[0]) is alike[0] and "too weak" in weak.describe()
    test = homogeneity([*alike, None], pool_min_seeds=5)
    expected_p = scipy_stats.levene(*(d.per_seed for d in alike), center="median").pvalue
    assert test.p_fid == pytest.approx(expected_p) and test.p_fid >= POOL_TEST_ALPHA
    assert test.pooled and test.df == 6 * 4 and test.var == pytest.approx(np.mean([d.seed_var for d in alike]))
    shown = test.apply(alike[0])
    assert shown.df == 24 and shown.half_width == pytest.approx(
        scipy_stats.t.ppf(0.975, 24) * math.sqrt(test.var / 5))
    assert "not rejected" in test.describe() and "Brown-Forsythe" in test.describe()

    unlike = [combine(list(0.3 + rng.normal(0, sd, 5)), [1e-4] * 5) for sd in (0.01, 0.01, 0.01, 1.0, 1.0, 1.0)]
    split = homogeneity(unlike, pool_min_seeds=5)
    assert split.p_fid < POOL_TEST_ALPHA and not split.pooled
    assert split.apply(unlike[0]) is unlike[0] and unlike[0].df == 4  # its own variance, t with S - 1
    assert "rejected at 0.25" in split.describe()
    assert not homogeneity(unlike[:2]).pooled  # two rows: too few to test, never pooled


def test_log_scale_test_reads_the_per_seed_log_ratio(data):
    ref, rows, controls = data
    delta = paired_fid_delta(rows, controls, ref)
    expected = [math.log(_fid(rows[s], ref)) - math.log(_fid(controls[s], ref)) for s in (0, 1, 2)]
    assert delta.log_ratio == pytest.approx(expected, rel=1e-9)


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


def test_precomputed_run_draws_give_the_same_paired_deltas_as_the_features(data):
    """Committed data of large images keep each run's draws instead of its features: every paired FID and KID
    statistic computed from them equals the one from the features, value for value."""
    ref, rows, controls = data
    as_draws = [{s: RunDraws.compute(f[s], ref, s, len(f[s])) for s in f} for f in (rows, controls)]
    statistics_only = Reference(ref.mu, ref.sigma)  # what the draws form commits of the reference
    assert statistics_only.features is None and statistics_only.digest == ref.digest
    for paired in (paired_fid_delta, paired_kid_delta):
        from_features = paired(rows, controls, ref)
        from_draws = paired(*as_draws, statistics_only)
        assert from_draws.per_seed == from_features.per_seed
        assert (from_draws.mean, from_draws.low, from_draws.high, from_draws.bootstrap_var) == (
            from_features.mean, from_features.low, from_features.high, from_features.bootstrap_var)
    mixed = paired_fid_delta(rows, as_draws[1], ref)  # a row with features against a control with draws
    assert mixed.per_seed == paired_fid_delta(rows, controls, ref).per_seed


def test_run_draws_refuse_another_reference_seed_or_sample_count(data):
    from diffprune_bench.errors import BenchError

    ref, rows, controls = data
    draws = RunDraws.compute(rows[0], ref, 0, 120)
    other = Reference(ref.mu + 1, ref.sigma)
    with pytest.raises(BenchError, match="cannot serve"):
        paired_fid_delta({0: draws}, {0: controls[0]}, other)
    with pytest.raises(BenchError, match="cannot serve"):
        paired_fid_delta({1: draws}, {1: controls[1]}, ref)  # computed on seed 0's index sets
    with pytest.raises(BenchError, match="cannot serve"):
        paired_kid_delta({0: draws}, {0: controls[0][:100]}, ref)  # the pair shares only 100 samples


def test_draws_against_the_same_reference_computed_on_another_cpu_serve_the_table(data, tmp_path):
    """A reference recomputed on another machine differs in float32 rounding (digest differs, FID agrees to
    ~1e-7): the table takes one reference and aliases the rounded copies, so draws committed against a copy
    still serve; a reference that really differs is not aliased and is still refused."""
    import pandas as pd

    from diffprune_bench.errors import BenchError
    from diffprune_bench.report.compare import FeatureStore, _reference

    ref, rows, controls = data
    rng = np.random.default_rng(1)
    rounded = Reference(ref.mu + rng.normal(scale=2e-8, size=ref.mu.shape), ref.sigma + 2e-8, ref.features)
    far = Reference(ref.mu + 1e-3, ref.sigma, ref.features)
    assert rounded.digest != ref.digest and ref.same_statistics(rounded) and not ref.same_statistics(far)
    files = {}
    for name, reference in {"here": ref, "there": rounded, "far": far}.items():
        files[name] = str(tmp_path / f"{name}.npz")
        np.savez(files[name], mu=reference.mu, sigma=reference.sigma)
    draws_there = RunDraws.compute(rows[0], rounded, 0, 120)  # committed by the other machine

    table_reference = _reference(pd.DataFrame({"ref": [files["here"], files["there"]]}), "ref", FeatureStore())
    assert table_reference.digest == ref.digest and rounded.digest in table_reference.aliases
    served = paired_fid_delta({0: draws_there}, {0: controls[0]}, table_reference)
    exact = paired_fid_delta({0: rows[0]}, {0: controls[0]}, ref)
    assert served.per_seed[0] == pytest.approx(exact.per_seed[0], abs=1e-6)

    apart = _reference(pd.DataFrame({"ref": [files["here"], files["far"]]}), "ref", FeatureStore())
    assert far.digest not in apart.aliases
    with pytest.raises(BenchError, match="cannot serve"):
        paired_fid_delta({0: RunDraws.compute(rows[0], far, 0, 120)}, {0: controls[0]}, apart)
