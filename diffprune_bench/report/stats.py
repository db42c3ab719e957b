"""Paired statistics for the leaderboard: ΔFID / ΔKID to a control with a 95 % interval.

Every model in a table is sampled from the same evaluation noise for a given seed (sample i of every
run starts from the same x_T), so differences between two rows can be *paired*: a bootstrap that draws
the same noise indices for both rows cancels most of the sampling noise they share. The interval then
combines the two sources of uncertainty the issue names:

* sampling noise: per seed s, B bootstrap draws of the N noise indices give Δ*_{s,b} =
  FID(a[idx]) - FID(b[idx]) against the fixed reference statistics, with variance v_s;
* seed-to-seed spread: the per-seed full-sample differences Δ_s vary with the training seed (and
  each seed's own evaluation noise).

Δ = mean_s Δ_s. Its standard error is sqrt(max(var_s(Δ_s), mean_s v_s) / S): the spread over seeds
when it is measurable, never less than the sampling noise alone (with two or three seeds the sample
variance is itself noisy and can come out tiny by chance). The interval is Δ ± t_{0.975, S-1} x se
(the normal quantile with one seed). A difference is *significant* when its interval excludes 0.

FID here is computed by eigenvalues, tr sqrt(Σ_a Σ_ref) = Σ sqrt(eig(R Σ_a R)) with R = Σ_ref^{1/2}
precomputed, which equals clean-fid's ``frechet_distance`` (scipy ``sqrtm``) to numerical precision
but costs one symmetric eigen-decomposition per draw. KID is the unbiased MMD² with clean-fid's
polynomial kernel (x·y/d + 1)^3 on the full sets (clean-fid averages 100 subsets; the point values in
records stay clean-fid's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

BOOTSTRAP_DRAWS = 200
OUTER_PRODUCT_MAX_DIM = 256
CONFIDENCE = 0.95
STATISTICS_NOTE = (
    "Δ = row minus its control, paired by seed and evaluation-noise index; 95 % interval = mean over seeds "
    "± t(df) x sqrt(max(seed-to-seed variance of Δ pooled over the table's rows, the row's paired-bootstrap "
    f"variance over samples ({BOOTSTRAP_DRAWS} draws)) / S), df = the pooled degrees of freedom; a row whose "
    "seed spread is significantly larger than the pool of the others (F test, Bonferroni over rows, "
    "1 %) stays out of the pool and keeps its own seed variance and df (marked †)"
)


class Reference:
    """Reference statistics for repeated FID/KID of feature subsets (square root and kernel terms cached)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray) -> None:
        self.mu = np.asarray(mu, dtype=np.float64)
        self.sigma = np.asarray(sigma, dtype=np.float64)
        self.features = np.asarray(features, dtype=np.float64)
        values, vectors = np.linalg.eigh(self.sigma)
        self.root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        self.trace = float(np.trace(self.sigma))
        d = self.features.shape[1]
        kernel = (self.features @ self.features.T / d + 1) ** 3
        m = len(self.features)
        self.kernel_within = float((kernel.sum() - np.trace(kernel)) / (m * (m - 1)))

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        data = np.load(path)
        return cls(data["mu"], data["sigma"], data["features"])

    def fid(self, features: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray | float:
        """FID of ``features``, or of bootstrap samples given as a (draws, n) matrix of multiplicities
        (row b takes sample i ``counts[b, i]`` times), all draws in one batched eigen-decomposition."""
        single = counts is None
        counts = np.ones((1, len(features))) if single else np.atleast_2d(counts)
        n = counts.sum(1)
        mu = counts @ features / n[:, None]
        d = features.shape[1]
        if d <= OUTER_PRODUCT_MAX_DIM:  # one GEMM: sum_i c_i f_i f_i^T = counts @ (outer products)
            second = (counts @ np.einsum("id,ie->ide", features, features).reshape(len(features), d * d)).reshape(
                -1, d, d)
        else:  # Inception-sized features: one weighted product per draw
            second = np.stack([(features.T * c) @ features for c in counts])
        sigma = (second - n[:, None, None] * mu[:, :, None] * mu[:, None, :]) / (n - 1)[:, None, None]
        product = self.root @ sigma @ self.root
        roots = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.transpose(0, 2, 1)) / 2), 0, None))
        diff = mu - self.mu
        values = (diff * diff).sum(1) + np.trace(sigma, axis1=1, axis2=2) + self.trace - 2 * roots.sum(1)
        return float(values[0]) if single else values


class KidTerms:
    """The kernel sums of one generated set, so a bootstrap draw costs one gather, not a kernel."""

    def __init__(self, features: np.ndarray, reference: Reference) -> None:
        d = features.shape[1]
        self.within = (features @ features.T / d + 1) ** 3
        self.cross = ((features @ reference.features.T / d + 1) ** 3).mean(1)
        self.reference_within = reference.kernel_within

    def kid(self, counts: np.ndarray | None = None) -> np.ndarray | float:
        """Unbiased KID of the set, or of bootstrap samples given as a (draws, n) matrix of multiplicities:
        the sum over ordered pairs of distinct draws is c^T K c - c·diag(K)."""
        if counts is None:
            n = len(self.cross)
            within = (self.within.sum() - np.trace(self.within)) / (n * (n - 1))
            return float(within + self.reference_within - 2 * self.cross.mean())
        n = counts.sum(1)
        pairs = np.einsum("bi,ij,bj->b", counts, self.within, counts) - counts @ np.diag(self.within)
        return pairs / (n * (n - 1)) + self.reference_within - 2 * (counts @ self.cross) / n


@dataclass
class PairedDelta:
    """Δ (row minus control) over seeds with its interval; ``per_seed`` are the full-sample differences."""

    mean: float
    low: float
    high: float
    per_seed: list[float]
    seed_var: float
    bootstrap_var: float
    seeds: list[int] = field(default_factory=list)

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def combine(per_seed: list[float], bootstrap_vars: list[float], seeds: list[int] | None = None) -> PairedDelta:
    """The interval of the mean difference from per-seed differences and their bootstrap variances."""
    count = len(per_seed)
    mean = float(np.mean(per_seed))
    seed_var = float(np.var(per_seed, ddof=1)) if count > 1 else 0.0
    boot_var = float(np.mean(bootstrap_vars)) if bootstrap_vars else 0.0
    se = math.sqrt(max(seed_var, boot_var) / count)
    quantile = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, count - 1) if count > 1 else scipy_stats.norm.ppf(
        0.5 + CONFIDENCE / 2)
    return PairedDelta(mean, mean - quantile * se, mean + quantile * se, [float(v) for v in per_seed], seed_var,
                       boot_var, list(seeds or []))


#: family-wise level of the test that keeps a row's seed spread out of the pool (Bonferroni over rows)
HOMOGENEITY_ALPHA = 0.01


@dataclass(frozen=True)
class SeedPool:
    """Seed-to-seed variance of Δ pooled over the rows of a table whose spreads agree.

    With two or three seeds a row's own seed variance has one or two degrees of freedom: its t quantile
    (12.7 or 4.3) would tie every row. Pooling the rows of one table (as a one-way ANOVA pools its groups)
    gives many degrees of freedom, but assumes the training-seed spread of a difference is alike across
    rows. FID's spread grows with FID: a collapsed or unstable row (an inference-only N:M pattern, a
    sampler at its limit) can have a seed variance 10-100x the others' and would widen every interval of
    the table. So the pool leaves out, one at a time, the row whose variance is most significantly above
    the pool of the rest (F test, Bonferroni over the remaining rows at ``HOMOGENEITY_ALPHA``): those
    ``outliers`` keep their own seed variance and df, the others share the pool's.
    """

    var: float = 0.0
    df: int = 0
    outliers: frozenset[int] = frozenset()

    def apply(self, delta: PairedDelta, position: int | None = None) -> PairedDelta:
        """``delta``'s interval from the pool (t with the pooled df), unless it is one of the outliers."""
        if self.df < 1 or (position is not None and position in self.outliers):
            return delta
        return with_pooled_variance(delta, self.var, self.df)


def pooled_seed_variance(deltas: list[PairedDelta | None]) -> SeedPool:
    """The df-weighted pool of the rows' seed variances of Δ, outlying spreads left out (see SeedPool);
    ``outliers`` are positions in ``deltas``."""
    spreads = {i: (len(d.per_seed) - 1, d.seed_var) for i, d in enumerate(deltas)
               if d is not None and len(d.per_seed) > 1}
    outliers: set[int] = set()
    while len(spreads) - len(outliers) >= 3:
        active = {i: w for i, w in spreads.items() if i not in outliers}
        total_df = sum(df for df, _ in active.values())
        total_ss = sum(df * var for df, var in active.values())
        worst, worst_p = None, 1.0
        for i, (df_i, var_i) in active.items():
            rest_df = total_df - df_i
            rest_var = (total_ss - df_i * var_i) / rest_df
            if rest_var <= 0:
                continue
            p = float(scipy_stats.f.sf(var_i / rest_var, df_i, rest_df))
            if p < worst_p:
                worst, worst_p = i, p
        if worst is None or worst_p >= HOMOGENEITY_ALPHA / len(active):
            break
        outliers.add(worst)
    kept = [w for i, w in spreads.items() if i not in outliers]
    df = sum(w for w, _ in kept)
    return SeedPool(sum(w * v for w, v in kept) / df if df else 0.0, df, frozenset(outliers))


def with_pooled_variance(delta: PairedDelta, pooled_var: float, df: int) -> PairedDelta:
    """``delta`` with its interval from the pooled seed variance (t with the pooled df)."""
    if df < 1:
        return delta
    count = len(delta.per_seed)
    se = math.sqrt(max(pooled_var, delta.bootstrap_var) / count)
    quantile = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df)
    return PairedDelta(delta.mean, delta.mean - quantile * se, delta.mean + quantile * se, delta.per_seed,
                       delta.seed_var, delta.bootstrap_var, delta.seeds)


def bootstrap_counts(n: int, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, n) multiplicities of a bootstrap over n samples: row b takes sample i counts[b, i] times."""
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


def paired_fid_delta(rows: dict[int, np.ndarray], controls: dict[int, np.ndarray], reference: Reference,
                     draws: int = BOOTSTRAP_DRAWS) -> PairedDelta | None:
    """ΔFID of ``rows`` minus ``controls`` (features by seed, same noise order); None without a shared seed."""
    seeds = sorted(set(rows) & set(controls))
    if not seeds:
        return None
    per_seed, variances = [], []
    for seed in seeds:
        a, b = np.asarray(rows[seed], np.float64), np.asarray(controls[seed], np.float64)
        n = min(len(a), len(b))  # the first n evaluation noises are shared by construction
        a, b = a[:n], b[:n]
        per_seed.append(reference.fid(a) - reference.fid(b))
        counts = bootstrap_counts(n, draws, seed)
        variances.append(float(np.var(reference.fid(a, counts) - reference.fid(b, counts), ddof=1)))
    return combine(per_seed, variances, seeds)


def paired_kid_delta(rows: dict[int, np.ndarray], controls: dict[int, np.ndarray], reference: Reference,
                     draws: int = BOOTSTRAP_DRAWS) -> PairedDelta | None:
    """ΔKID of ``rows`` minus ``controls``, paired like :func:`paired_fid_delta`."""
    seeds = sorted(set(rows) & set(controls))
    if not seeds:
        return None
    per_seed, variances = [], []
    for seed in seeds:
        n = min(len(rows[seed]), len(controls[seed]))
        a = KidTerms(np.asarray(rows[seed][:n], np.float64), reference)
        b = KidTerms(np.asarray(controls[seed][:n], np.float64), reference)
        per_seed.append(a.kid() - b.kid())
        counts = bootstrap_counts(n, draws, seed)
        variances.append(float(np.var(a.kid(counts) - b.kid(counts), ddof=1)))
    return combine(per_seed, variances, seeds)


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval over seeds (the interval of a row's own FID, unpaired)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    quantile = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)
    return mean, mean - quantile * se, mean + quantile * se
