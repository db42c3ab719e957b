"""Whether a ranking belongs to the models or to the extractor: two feature spaces' orders compared.

FID is a distance in one network's features. If a second, independently trained extractor orders the
rows of a target differently, the ranking says as much about the extractor as about the models. Per
target: Kendall τ between the rows' mean FIDs in the two spaces (scipy), and every pair whose order
flips with *both* differences significant (each space's pairwise comparisons, Holm-corrected within
that space): a flip of two non-significant differences is noise, not disagreement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from scipy import stats as scipy_stats

from diffprune_bench.report.pairwise import TargetComparison


@dataclass
class SpaceAgreement:
    """The primary space against ``space`` at one target."""

    space: str
    target: float
    rows: int
    tau: float
    p: float
    #: (better in the primary space, better in ``space``), both orders significant
    flips: list[tuple[Hashable, Hashable]] = field(default_factory=list)

    def describe(self, label: Callable[[Hashable], str] = str) -> str:
        """``at 0.5: Kendall τ = +0.60 (p = 0.14, 5 rows); significant flips: a < b, ...`` where ``a < b``
        is the primary space's order, reversed in the other space."""
        if self.rows < 2 or math.isnan(self.tau):
            return f"at {self.target:g}: fewer than two rows with FID in both spaces"
        flips = ", ".join(f"{label(a)} < {label(b)}" for a, b in self.flips) or "none"
        return (f"at {self.target:g}: Kendall τ = {self.tau:+.2f} (p = {self.p:.2g}, {self.rows} rows); "
                f"significant flips: {flips}")


def agreement(space: str, primary: TargetComparison, other: TargetComparison) -> SpaceAgreement:
    """τ over the rows with a mean FID in both spaces, and the significant flips among their pairs."""
    shared = [r for r in primary.rows if r in other.means and math.isfinite(other.means[r])]
    if len(shared) < 2:
        return SpaceAgreement(space, primary.target, len(shared), float("nan"), float("nan"))
    result = scipy_stats.kendalltau([primary.means[r] for r in shared], [other.means[r] for r in shared])
    flips = [(x, y) for i, a in enumerate(shared) for b in shared[i + 1:] for x, y in ((a, b), (b, a))
             if primary.better(x, y) and other.better(y, x)]
    return SpaceAgreement(space, primary.target, len(shared), float(result.statistic), float(result.pvalue), flips)
