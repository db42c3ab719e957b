"""Pairwise comparisons of the rows at one target saving: paired ΔFID, Holm, best row, letters.

A reader asks *which method should I use at 75 %?*, which a row-vs-control interval cannot answer: two
rows may both beat their control and still not differ. So every pair of on-target rows at a target is
compared directly: per seed, Δ_ij = FID_i - FID_j on the same seed's evaluation noise, with the pair's
own seed variance (t, S - 1 df) floored by its paired bootstrap (:mod:`diffprune_bench.report.stats`).
The k(k - 1)/2 p-values of a target are one family, Holm-corrected (valid under any dependence, which
matters: every row appears in k - 1 pairs). A row is the *best* only when it is significantly better than
every other on-target row; the compact letter display (Piepho 2004) summarises the rest.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from string import ascii_lowercase

import numpy as np

from diffprune_bench.report.stats import (
    BOOTSTRAP_DRAWS,
    CONFIDENCE,
    DrawCache,
    PairedDelta,
    Reference,
    paired_fid_delta,
)

#: family-wise error rate of the pairwise tests at one target
ALPHA = 1 - CONFIDENCE


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (statsmodels' ``multipletests(method="holm")``, which this
    project does not depend on for four lines): sorted ascending, p_(i) x (m - i), running maximum, at most 1."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, p[order] * (m - np.arange(m))))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted


def letters(order: Sequence[Hashable], different: set[frozenset]) -> dict[Hashable, str]:
    """Compact letter display by Piepho's (2004) insert-and-absorb algorithm: rows that share a letter are
    not significantly different. ``order`` lists the rows best first (the first column met gets "a");
    ``different`` holds the significantly different pairs as frozensets.

    Start with one column holding every row; for each different pair, every column holding both is split
    into a copy without the one and a copy without the other, and a column contained in another is
    absorbed (dropped). Columns are then named a, b, c, ... in the order of their best row."""
    rank = {row: position for position, row in enumerate(order)}
    columns: list[set[Hashable]] = [set(order)]
    for pair in sorted((p for p in different if p <= rank.keys()), key=lambda p: sorted(rank[r] for r in p)):
        i, j = sorted(pair, key=rank.__getitem__)
        split: list[set[Hashable]] = []
        for column in columns:
            if i in column and j in column:
                split += [column - {i}, column - {j}]
            else:
                split.append(column)
        columns = [c for k, c in enumerate(split)
                   if c and not any(c < other or (c == other and m < k) for m, other in enumerate(split))]
    columns.sort(key=lambda c: sorted(rank[r] for r in c))
    names = [_letter(k) for k in range(len(columns))]
    return {row: "".join(name for name, column in zip(names, columns, strict=True) if row in column)
            for row in order}


def _letter(k: int) -> str:
    return ascii_lowercase[k] if k < 26 else f"{ascii_lowercase[k // 26 - 1]}{ascii_lowercase[k % 26]}"


@dataclass
class TargetComparison:
    """All pairwise comparisons of the rows at one target; ``rows`` best (lowest mean FID) first."""

    target: float
    rows: list[Hashable]
    labels: dict[Hashable, str]
    means: dict[Hashable, float]
    #: (i, j) with i before j in ``rows`` -> Δ = row i minus row j; absent: no shared paired evidence
    deltas: dict[tuple[Hashable, Hashable], PairedDelta] = field(default_factory=dict)
    adjusted: dict[tuple[Hashable, Hashable], float] = field(default_factory=dict)

    def delta(self, a: Hashable, b: Hashable) -> tuple[float, float] | None:
        """(Δ of a minus b, Holm-adjusted p), whichever order they were compared in; None if never."""
        if (a, b) in self.deltas:
            return self.deltas[(a, b)].mean, self.adjusted[(a, b)]
        if (b, a) in self.deltas:
            return -self.deltas[(b, a)].mean, self.adjusted[(b, a)]
        return None

    def better(self, a: Hashable, b: Hashable) -> bool:
        """Row ``a`` has a significantly lower FID than row ``b`` (after Holm)."""
        found = self.delta(a, b)
        return found is not None and found[0] < 0 and found[1] < ALPHA

    def different(self) -> set[frozenset]:
        return {frozenset(pair) for pair, p in self.adjusted.items() if p < ALPHA}

    @property
    def best(self) -> Hashable | None:
        """The row significantly better than every other row at this target, if there is one."""
        if len(self.rows) < 2:
            return None
        first = self.rows[0]
        return first if all(self.better(first, other) for other in self.rows[1:]) else None

    def tied(self) -> list[Hashable]:
        """The lowest-FID row and every row not significantly worse than it (no best row: the leading group)."""
        first = self.rows[0]
        return [first, *(r for r in self.rows[1:] if not self.better(first, r))]

    def letters(self) -> dict[Hashable, str]:
        """Letters of the rows with paired evidence (a row compared with nothing gets none)."""
        compared = [r for r in self.rows if any(r in pair for pair in self.deltas)]
        return letters(compared, self.different()) if len(compared) >= 2 else {}


def compare_rows(target: float, features: dict[Hashable, dict[int, np.ndarray]], means: dict[Hashable, float],
                 labels: dict[Hashable, str], reference: Reference | None, cache: DrawCache | None = None,
                 draws: int = BOOTSTRAP_DRAWS) -> TargetComparison:
    """Every pair of ``features``' rows (features by seed) compared by paired ΔFID, Holm over the pairs.

    ``means`` orders the rows (lowest FID first); rows without features or a reference stay in ``rows``
    but in no comparison, so they can never be beaten significantly (and no row is then the best)."""
    rows = sorted(means, key=lambda r: means[r])
    comparison = TargetComparison(target, rows, labels, means)
    if reference is None:
        return comparison
    cache = cache or DrawCache()
    for a, b in combinations(rows, 2):
        if features.get(a) and features.get(b):
            delta = paired_fid_delta(features[a], features[b], reference, draws, cache)
            if delta is not None:
                comparison.deltas[(a, b)] = delta
    pairs = list(comparison.deltas)
    comparison.adjusted = dict(zip(pairs, holm([comparison.deltas[p].p_value for p in pairs]), strict=True))
    return comparison
