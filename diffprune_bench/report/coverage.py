"""How often the leaderboard's intervals cover the truth, by simulation with the table's structure.

An interval's nominal 95 % holds only under its assumptions; the ones that matter here are those a real
table breaks: many rows share one control (the control's own seed noise enters every row's Δ), the seed
variance differs between rows (FID's spread grows with FID), there are few seeds (S = 5), and all rows
of a seed sample the same evaluation noise (paired). This module simulates exactly that, at the level of
per-sample features, and runs the leaderboard's own code on it (paired bootstrap, the variance test and
its pool decision, the pairwise comparisons and Holm), so the coverage it reports is the procedure's.

Per seed s, every row starts from the same noise: features = z_s + c w_{i,s} + m_{i,s}, with z_s (n x d,
standard normal) shared by every row, w_{i,s} the row's own sampling noise and m_{i,s} = μ_i + τ_i g_{i,s}
the training-seed effect (g standard normal). A shift leaves the sample covariance alone, so against the
reference N(0, (1 + c²) I) every row's covariance terms have the same expectation and the true
E[FID_i] - E[FID_j] is exactly |μ_i|² + d τ_i² - |μ_j|² - d τ_j²: the truth is known in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprune_bench.report.pairwise import ALPHA, compare_rows
from diffprune_bench.report.stats import POOL_MIN_SEEDS, DrawCache, Reference, homogeneity, paired_fid_delta


@dataclass(frozen=True)
class Scenario:
    """A table: ``rows`` rows and their shared control, ``seeds`` seeds of ``samples`` samples each; row i's
    seed-effect variance is ``ratios[i]`` x the control's (1x to ``max_ratio`` x, evenly spread)."""

    rows: int = 12
    seeds: int = 5
    samples: int = 200
    dim: int = 4
    draws: int = 100
    seed_sd: float = 0.05  # τ of the control (ratio 1)
    own_noise: float = 0.3  # c: the part of the sampling noise a row does not share with the others
    max_ratio: float = 10.0
    null: bool = False  # every row with the same true FID (for the family-wise error of Holm)

    def ratios(self) -> np.ndarray:
        return np.linspace(1.0, self.max_ratio, self.rows)

    def true_levels(self) -> tuple[float, np.ndarray]:
        """E[FID] (up to the shared constant) of the control and of each row: |μ|² + d τ²."""
        rows = np.full(self.rows, 0.30) if self.null else np.linspace(0.15, 0.45, self.rows)
        return 0.10, rows

    def shifts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """|μ| of control and rows, and the rows' τ, so that |μ|² + d τ² hits the true levels."""
        control_level, levels = self.true_levels()
        taus = self.seed_sd * np.sqrt(self.ratios())
        mus = np.sqrt(levels - self.dim * taus**2)
        return np.sqrt(control_level - self.dim * self.seed_sd**2), mus, taus


@dataclass(frozen=True)
class Coverage:
    """Measured over ``replications`` simulated tables."""

    replications: int
    row: float  # share of row-vs-control intervals covering the true Δ
    worst_row: float  # the row (usually the noisiest) with the lowest coverage
    pair: float  # share of pairwise intervals covering the true Δ_ij
    family_error: float  # share of tables with at least one Holm-rejected pair (meaningful under the null)
    pooled: float  # share of tables where the variance test allowed a pool
    seed_variance_ratio: float  # largest / smallest per-seed Δ variance across rows, as simulated


def _features(rng: np.random.Generator, shared: np.ndarray, own: float, mu: float, tau: float) -> np.ndarray:
    """One run's features: the seed's shared noise, its own sampling noise, shift μ e_1 plus its seed effect."""
    shift = np.zeros(shared.shape[1])
    shift[0] = mu
    return shared + own * rng.normal(size=shared.shape) + shift + tau * rng.normal(size=shared.shape[1])


def simulate(scenario: Scenario, replications: int, seed: int = 0,
             pool_min_seeds: int = POOL_MIN_SEEDS) -> Coverage:
    """Run the leaderboard's statistics on ``replications`` simulated tables of ``scenario``
    (``pool_min_seeds``: the seeds a row needs before a non-rejecting variance test may pool)."""
    rng = np.random.default_rng(seed)
    d, n, c = scenario.dim, scenario.samples, scenario.own_noise
    control_mu, mus, taus = scenario.shifts()
    control_level, levels = scenario.true_levels()
    reference = Reference(np.zeros(d), (1 + c**2) * np.eye(d), rng.normal(size=(50, d)))
    row_hits = np.zeros(scenario.rows)
    pair_hits = pair_count = families = pooled = 0
    spread = np.zeros(scenario.rows)
    for _ in range(replications):
        shared = rng.normal(size=(scenario.seeds, n, d))
        control = {s: _features(rng, shared[s], c, control_mu, scenario.seed_sd) for s in range(scenario.seeds)}
        rows = {i: {s: _features(rng, shared[s], c, mus[i], taus[i]) for s in range(scenario.seeds)}
                for i in range(scenario.rows)}
        cache = DrawCache()
        deltas = [paired_fid_delta(rows[i], control, reference, scenario.draws, cache) for i in range(scenario.rows)]
        spread += [delta.seed_var for delta in deltas]
        test = homogeneity(deltas, pool_min_seeds)
        pooled += test.pooled
        for i, delta in enumerate(deltas):
            shown = test.apply(delta)
            row_hits[i] += shown.low <= levels[i] - control_level <= shown.high
        comparison = compare_rows(0.5, rows, dict(enumerate(levels)), {}, reference, cache, scenario.draws)
        for (a, b), delta in comparison.deltas.items():
            pair_hits += delta.low <= levels[a] - levels[b] <= delta.high
            pair_count += 1
        families += any(p < ALPHA for p in comparison.adjusted.values())
    per_row = row_hits / replications
    return Coverage(replications, float(per_row.mean()), float(per_row.min()), pair_hits / max(pair_count, 1),
                    families / replications, pooled / replications, float(spread.max() / spread.min()))
