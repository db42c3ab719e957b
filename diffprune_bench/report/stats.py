"""Paired statistics for the leaderboard: ΔFID / ΔKID to a control with a 95 % interval.

Every model in a table is sampled from the same evaluation noise for a given seed (sample i of every
run starts from the same x_T), so differences between two rows can be *paired*: a bootstrap that draws
the same noise indices for both rows cancels most of the sampling noise they share. The interval then
combines the two sources of uncertainty the issue names:

* sampling noise: per seed s, B bootstrap draws of the N noise indices give Δ*_{s,b} =
  FID(a[idx]) - FID(b[idx]) against the fixed reference statistics, with variance v_s;
* seed-to-seed spread: the per-seed full-sample differences Δ_s vary with the training seed (and
  each seed's own evaluation noise).

Δ = mean_s Δ_s. Its standard error is sqrt(max(var_s(Δ_s), mean_s v_s) / S): the row's own spread over
seeds (which already contains each seed's sampling noise and, for a Δ to a control, the control's own
seed noise), never less than the sampling noise alone. The interval is Δ ± t_{0.975, S-1} x se (the
normal quantile with one seed). A difference is *significant* when its interval excludes 0. The seed
variance is pooled over a table's rows only where the data support it: a Brown-Forsythe test of equal
variance across the rows does not reject at Bancroft's 25 % (:class:`Homogeneity`); FID's seed spread grows
with FID, so on real tables it usually rejects and every row keeps its own.

FID here is computed by eigenvalues, tr sqrt(Σ_a Σ_ref) = Σ sqrt(eig(R Σ_a R)) with R = Σ_ref^{1/2}
precomputed, which equals clean-fid's ``frechet_distance`` (scipy ``sqrtm``) to numerical precision
but costs one symmetric eigen-decomposition per draw. KID is the unbiased MMD² with clean-fid's
polynomial kernel (x·y/d + 1)^3 on the full sets (clean-fid averages 100 subsets; the point values in
records stay clean-fid's).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

BOOTSTRAP_DRAWS = 200
OUTER_PRODUCT_MAX_DIM = 256
CONFIDENCE = 0.95
STATISTICS_NOTE = (
    "Δ = row minus its control, paired by seed and evaluation-noise index; 95 % interval = mean over seeds "
    "± t(S - 1) x sqrt(max(the row's own seed-to-seed variance of Δ, its paired-bootstrap variance over "
    f"samples ({BOOTSTRAP_DRAWS} draws)) / S); the seed variance is pooled over a table's rows only when a "
    "Brown-Forsythe test of equal variance does not reject at 25 % (result under each table)"
)
PAIRWISE_NOTE = (
    "every pair of on-target rows at a target compared by paired ΔFID (per-seed Δ on the same seed's noise, "
    "t test with the pair's own seed variance and S - 1 df, floored by its paired bootstrap), p-values "
    "Holm-corrected over all pairs of that target at 5 %"
)


#: references whose entries all agree to this fraction of their largest entry are one split's statistics
#: (float32 rounding of another CPU is ~1e-7 of it; a different split or extractor differs by far more)
SAME_REFERENCE_TOLERANCE = 1e-6


class Reference:
    """Reference statistics for repeated FID/KID of feature subsets (square root and kernel terms cached)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray | None = None) -> None:
        self.mu = np.asarray(mu, dtype=np.float64)
        self.sigma = np.asarray(sigma, dtype=np.float64)
        values, vectors = np.linalg.eigh(self.sigma)
        self.root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        self.trace = float(np.trace(self.sigma))
        # without per-image features (statistics only, as committed beside precomputed draws) KID has no terms
        self.features = None if features is None else np.asarray(features, dtype=np.float64)
        self.kernel_within = float("nan")
        if self.features is not None:
            d = self.features.shape[1]
            kernel = (self.features @ self.features.T / d + 1) ** 3
            m = len(self.features)
            self.kernel_within = float((kernel.sum() - np.trace(kernel)) / (m * (m - 1)))
        self.digest = hashlib.sha256(self.mu.tobytes() + self.sigma.tobytes()).hexdigest()[:16]
        #: digests of references found to be these statistics up to rounding (:meth:`same_statistics`)
        self.aliases: set[str] = set()

    def same_statistics(self, other: Reference) -> bool:
        """Whether ``other`` is this split's statistics computed again on another CPU: the extractor's float32
        convolutions round differently from one CPU model to another (entries ~1 moved by ~2e-8), so
        the digests differ while every FID computed against either agrees to ~1e-7."""
        tolerance = SAME_REFERENCE_TOLERANCE * max(float(np.abs(self.sigma).max()), float(np.abs(self.mu).max()), 1e-12)
        return all(mine.shape == theirs.shape and bool(np.allclose(mine, theirs, rtol=0, atol=tolerance))
                   for mine, theirs in ((self.mu, other.mu), (self.sigma, other.sigma)))

    def accepts(self, digest: str) -> bool:
        """Whether values computed against the reference of ``digest`` hold against this one."""
        return digest == self.digest or digest in self.aliases

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        data = np.load(path)
        return cls(data["mu"], data["sigma"], data["features"] if "features" in data.files else None)

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
        roots = np.sqrt(np.clip(batched_eigvalsh((product + product.transpose(0, 2, 1)) / 2), 0, None))
        diff = mu - self.mu
        values = (diff * diff).sum(1) + np.trace(sigma, axis1=1, axis2=2) + self.trace - 2 * roots.sum(1)
        return float(values[0]) if single else values


def batched_eigvalsh(matrices: np.ndarray) -> np.ndarray:
    """Eigenvalues of a stack of symmetric matrices (float64), through torch's LAPACK: numpy's loops one
    small matrix at a time and took 18x longer for 200 draws of 64x64 (half of a table's render time)."""
    import torch

    return torch.linalg.eigvalsh(torch.from_numpy(np.ascontiguousarray(matrices, dtype=np.float64))).numpy()


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
        # c^T K c per draw as one GEMM: a three-operand einsum runs without BLAS, ~30x slower here
        pairs = ((counts @ self.within) * counts).sum(1) - counts @ np.diag(self.within)
        return pairs / (n * (n - 1)) + self.reference_within - 2 * (counts @ self.cross) / n


@dataclass(frozen=True)
class RunDraws:
    """A run's FID and KID and their values on its seed's bootstrap index sets, in one feature space:
    all that the paired statistics use of its per-sample features (:mod:`diffprune_bench.report.raw_draws`).

    Stands in for the features wherever :func:`paired_fid_delta`, :func:`paired_kid_delta` and the
    pairwise comparisons take them; valid only for the reference, seed, N and draw count it was computed
    with, which every use checks."""

    seed: int
    n: int
    draws: int
    reference: str  #: the :attr:`Reference.digest` the values were computed against
    fid: float
    fid_draws: np.ndarray
    kid: float
    kid_draws: np.ndarray

    def __len__(self) -> int:
        return self.n

    @classmethod
    def compute(cls, features: np.ndarray, reference: Reference, seed: int, n: int,
                draws: int = BOOTSTRAP_DRAWS) -> RunDraws:
        """The draws of ``features``' first ``n`` rows, exactly as the paired statistics compute them."""
        a = np.asarray(features[:n], np.float64)
        counts = bootstrap_counts(n, draws, seed)
        kid = KidTerms(a, reference)
        return cls(seed, n, draws, reference.digest, reference.fid(a), reference.fid(a, counts), kid.kid(),
                   kid.kid(counts))

    def check(self, reference: Reference, seed: int, n: int, draws: int) -> None:
        """Raise BenchError when these draws cannot stand in for features in this comparison."""
        from diffprune_bench.errors import BenchError

        have = (self.reference, self.seed, self.n, self.draws)
        if not reference.accepts(self.reference) or have[1:] != (seed, n, draws):
            raise BenchError(f"precomputed draws for (reference, seed, N, draws) = {have} cannot serve a comparison "
                             f"with {(reference.digest, seed, n, draws)}: write the data again from the run folders")


@dataclass
class PairedDelta:
    """Δ (row minus control, or row minus row) over seeds with its interval; ``per_seed`` are the
    full-sample differences, ``log_ratio`` the per-seed differences of log FID (empty for KID)."""

    mean: float
    low: float
    high: float
    per_seed: list[float]
    seed_var: float
    bootstrap_var: float
    seeds: list[int] = field(default_factory=list)
    #: degrees of freedom of the t quantile (S - 1 on the row's own variance; 0: one seed, normal quantile)
    df: int = 0
    log_ratio: list[float] = field(default_factory=list)

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def p_value(self) -> float:
        """Two-sided p of Δ = 0 with the interval's standard error and df (the test the interval inverts)."""
        quantile = _quantile(self.df)
        se = self.half_width / quantile if quantile else 0.0
        if se <= 0:
            return 1.0 if self.mean == 0 else 0.0
        statistic = abs(self.mean) / se
        tail = scipy_stats.t.sf(statistic, self.df) if self.df >= 1 else scipy_stats.norm.sf(statistic)
        return float(min(1.0, 2 * tail))


@functools.lru_cache(maxsize=256)
def _quantile(df: int) -> float:
    """The two-sided 95 % quantile: t with ``df`` degrees of freedom, the normal one without any."""
    upper = 0.5 + CONFIDENCE / 2
    return float(scipy_stats.t.ppf(upper, df) if df >= 1 else scipy_stats.norm.ppf(upper))


def _interval(delta: PairedDelta, variance: float, df: int) -> PairedDelta:
    """``delta`` with the interval mean ± q(df) x sqrt(max(variance, bootstrap variance) / S)."""
    se = math.sqrt(max(variance, delta.bootstrap_var) / len(delta.per_seed))
    half = _quantile(df) * se
    return PairedDelta(delta.mean, delta.mean - half, delta.mean + half, delta.per_seed, delta.seed_var,
                       delta.bootstrap_var, delta.seeds, df, delta.log_ratio)


def combine(per_seed: list[float], bootstrap_vars: list[float], seeds: list[int] | None = None,
            log_ratio: list[float] | None = None) -> PairedDelta:
    """The interval of the mean difference from per-seed differences and their bootstrap variances: the
    row's own seed variance with t(S - 1), never narrower than the sampling noise alone."""
    count = len(per_seed)
    mean = float(np.mean(per_seed))
    seed_var = float(np.var(per_seed, ddof=1)) if count > 1 else 0.0
    boot_var = float(np.mean(bootstrap_vars)) if bootstrap_vars else 0.0
    raw = PairedDelta(mean, mean, mean, [float(v) for v in per_seed], seed_var, boot_var, list(seeds or []),
                      count - 1, [float(v) for v in (log_ratio or [])])
    return _interval(raw, seed_var, count - 1)


#: Bancroft's level for a preliminary test before pooling: pool only when equal variances are not
#: rejected at 25 % (a 5 % screen keeps too many unequal rows in, as the screen this replaces did)
POOL_TEST_ALPHA = 0.25
#: rows needed to test at all, and seeds per row before a non-rejecting test may pool: with 5 seeds the
#: test misses a 1x-10x spread in about 7 tables of 10, and pooling them leaves the noisiest row's
#: interval covering 0.86 instead of 0.95 (benchmarks/bench_coverage.py), so 5 seeds keep per-row variances
POOL_MIN_ROWS = 3
POOL_MIN_SEEDS = 10


@dataclass(frozen=True)
class Homogeneity:
    """Brown-Forsythe test (Levene's with the median) of equal seed variance of Δ across a table's rows,
    on ΔFID and on Δ log FID. ``pooled``: the ΔFID test did not reject at ``POOL_TEST_ALPHA``, so the rows'
    intervals use the df-weighted pool of their seed variances (t with the pooled df); otherwise every row
    keeps its own (t with S - 1)."""

    rows: int
    p_fid: float
    p_log: float
    var: float = 0.0
    df: int = 0
    min_seeds: int = POOL_MIN_SEEDS

    @property
    def pooled(self) -> bool:
        return self.df > 0

    def apply(self, delta: PairedDelta | None) -> PairedDelta | None:
        """``delta`` with the pooled variance and df when the test supports a pool, as it is otherwise."""
        if delta is None or not self.pooled or len(delta.per_seed) < 2:
            return delta
        return _interval(delta, self.var, self.df)

    def describe(self) -> str:
        def p(value: float) -> str:
            return "-" if math.isnan(value) else f"{value:.3g}"

        if self.rows < POOL_MIN_ROWS:
            return (f"too few rows with ≥ 3 seeds to test equal seed variance of Δ ({self.rows}): every row "
                    "keeps its own (t, S - 1 df)")
        if self.pooled:
            verdict = f"not rejected at {POOL_TEST_ALPHA:g}: the rows share the pooled variance (t, {self.df} df)"
        elif not math.isnan(self.p_fid) and self.p_fid >= POOL_TEST_ALPHA:
            verdict = (f"not rejected at {POOL_TEST_ALPHA:g}, but with fewer than {self.min_seeds} seeds per row "
                       "the test is too weak to pool on: every row keeps its own variance (t, S - 1 df)")
        else:
            verdict = f"rejected at {POOL_TEST_ALPHA:g}: every row keeps its own variance (t, S - 1 df)"
        return (f"equal seed variance of Δ across the {self.rows} on-target rows (Brown-Forsythe): p = "
                f"{p(self.p_fid)} on ΔFID, p = {p(self.p_log)} on Δ log FID; {verdict}")


def homogeneity(deltas: list[PairedDelta | None], pool_min_seeds: int = POOL_MIN_SEEDS) -> Homogeneity:
    """Test equal seed variance of Δ across ``deltas`` (rows with ≥ 3 seeds) and pool only when the test
    does not reject and every tested row has ``pool_min_seeds`` seeds (see :class:`Homogeneity`)."""
    usable = [d for d in deltas if d is not None and len(d.per_seed) >= 3]
    if len(usable) < POOL_MIN_ROWS:
        return Homogeneity(len(usable), float("nan"), float("nan"))
    p_fid = _brown_forsythe([d.per_seed for d in usable])
    logs = [d.log_ratio for d in usable if len(d.log_ratio) == len(d.per_seed)
            and all(math.isfinite(v) for v in d.log_ratio)]
    p_log = _brown_forsythe(logs) if len(logs) >= POOL_MIN_ROWS else float("nan")
    if math.isnan(p_fid) or p_fid < POOL_TEST_ALPHA or min(len(d.per_seed) for d in usable) < pool_min_seeds:
        return Homogeneity(len(usable), p_fid, p_log, min_seeds=pool_min_seeds)
    df = sum(len(d.per_seed) - 1 for d in usable)
    var = sum((len(d.per_seed) - 1) * d.seed_var for d in usable) / df
    return Homogeneity(len(usable), p_fid, p_log, var, df, pool_min_seeds)


def _brown_forsythe(groups: list[list[float]]) -> float:
    """p of Levene's test centred on the median (Brown-Forsythe); NaN when every group is constant."""
    if all(np.ptp(g) == 0 for g in groups):
        return float("nan")
    return float(scipy_stats.levene(*groups, center="median").pvalue)


def bootstrap_counts(n: int, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, n) multiplicities of a bootstrap over n samples: row b takes sample i counts[b, i] times."""
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)


class DrawCache:
    """Full-sample FID and its bootstrap draws per (features, reference, seed, n), computed once.

    A seed's bootstrap index sets are the same for every row, so the draws of one row serve every pair
    it is in: the k(k - 1)/2 pairwise comparisons of a target cost k FID bootstraps, not k(k - 1).
    Entries hold their arrays, so the identities in the keys stay valid while the cache lives."""

    def __init__(self) -> None:
        self._fids: dict[tuple, tuple[np.ndarray, Reference, float, np.ndarray]] = {}
        self._counts: dict[tuple[int, int, int], np.ndarray] = {}

    def counts(self, n: int, draws: int, seed: int) -> np.ndarray:
        key = (n, draws, seed)
        if key not in self._counts:
            self._counts[key] = bootstrap_counts(n, draws, seed)
        return self._counts[key]

    def fid(self, features: np.ndarray | RunDraws, reference: Reference, seed: int, n: int,
            draws: int) -> tuple[float, np.ndarray]:
        if isinstance(features, RunDraws):  # computed once already, when the data were written
            features.check(reference, seed, n, draws)
            return features.fid, features.fid_draws
        key = (id(features), id(reference), seed, n, draws)
        if key not in self._fids:
            a = np.asarray(features[:n], np.float64)
            self._fids[key] = (features, reference, reference.fid(a), reference.fid(a, self.counts(n, draws, seed)))
        _, _, full, boots = self._fids[key]
        return full, boots


def paired_fid_delta(rows: dict[int, np.ndarray], controls: dict[int, np.ndarray], reference: Reference,
                     draws: int = BOOTSTRAP_DRAWS, cache: DrawCache | None = None) -> PairedDelta | None:
    """ΔFID of ``rows`` minus ``controls`` (features by seed, same noise order); None without a shared seed."""
    seeds = sorted(set(rows) & set(controls))
    if not seeds:
        return None
    cache = cache or DrawCache()
    per_seed, variances, logs = [], [], []
    for seed in seeds:
        n = min(len(rows[seed]), len(controls[seed]))  # the first n evaluation noises are shared by construction
        fa, boot_a = cache.fid(rows[seed], reference, seed, n, draws)
        fb, boot_b = cache.fid(controls[seed], reference, seed, n, draws)
        per_seed.append(fa - fb)
        logs.append(math.log(fa) - math.log(fb) if fa > 0 and fb > 0 else float("nan"))
        variances.append(float(np.var(boot_a - boot_b, ddof=1)))
    return combine(per_seed, variances, seeds, logs)


def paired_kid_delta(rows: dict[int, np.ndarray], controls: dict[int, np.ndarray], reference: Reference,
                     draws: int = BOOTSTRAP_DRAWS) -> PairedDelta | None:
    """ΔKID of ``rows`` minus ``controls``, paired like :func:`paired_fid_delta`."""
    seeds = sorted(set(rows) & set(controls))
    if not seeds:
        return None
    per_seed, variances = [], []
    for seed in seeds:
        n = min(len(rows[seed]), len(controls[seed]))
        counts = functools.cache(functools.partial(bootstrap_counts, n, draws, seed))  # drawn once, only for features
        (kid_a, boot_a), (kid_b, boot_b) = (_kid_draws(side[seed], reference, seed, n, draws, counts)
                                            for side in (rows, controls))
        per_seed.append(kid_a - kid_b)
        variances.append(float(np.var(boot_a - boot_b, ddof=1)))
    return combine(per_seed, variances, seeds)


def _kid_draws(features: np.ndarray | RunDraws, reference: Reference, seed: int, n: int, draws: int,
               counts: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """Full-set KID and its bootstrap draws, from features or from a run's precomputed draws."""
    if isinstance(features, RunDraws):
        features.check(reference, seed, n, draws)
        return features.kid, features.kid_draws
    terms = KidTerms(np.asarray(features[:n], np.float64), reference)
    return terms.kid(), terms.kid(counts())


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval over seeds (the interval of a row's own FID, unpaired)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    quantile = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)
    return mean, mean - quantile * se, mean + quantile * se
