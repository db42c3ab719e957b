"""What every report view shares: the leaderboard's table types and how a row is named.

The leaderboard builds :class:`Leaderboard` (groups of comparable rows); its Markdown, the plots, the
Pareto front and the web page each draw from it. Keeping the types and :func:`row_label` here, apart
from the code that builds and writes the leaderboard, lets those views import them while the
leaderboard imports the views: every import inside ``report/`` goes one way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from diffprune_bench.report.compare import TableStatistics

if TYPE_CHECKING:
    from diffprune_bench.report.pairwise import TargetComparison


@dataclass
class Group:
    """One table: rows that share dataset, protocol and budget."""

    key: dict[str, Any]
    table: pd.DataFrame
    runs: pd.DataFrame
    slug: str
    stats: TableStatistics = field(default_factory=TableStatistics)

    def title(self) -> str:
        k = self.key
        fingerprint = str(k["extractor_fingerprint"] or "")[:8]
        precision = "" if k["sampler_precision"] == "fp32" else f", {k['sampler_precision']}"
        return (
            f"{k['dataset']}: {k['extractor']} FID ({fingerprint}), N={k['num_samples']}, "
            f"{str(k['sampler']).upper()} {k['sample_steps']} steps ({k['timestep_spacing']}{precision}); "
            f"{k['budget']}"
        )


@dataclass
class Leaderboard:
    """Every table of comparable rows, the failed runs listed apart, and how many records were read."""

    groups: list[Group]
    failed: pd.DataFrame
    records: int


def row_label(row: pd.Series) -> str:
    """``sparsedm [1:4] (trained 0.5)``: the variant, and the training target where it differs; a
    composed row names its sampler-level part (``diff-pruning + deepcache``)."""
    label = str(row.get("label") or "") or str(row["method"])
    if isinstance(row.get("label"), float):  # NaN from an old record
        label = str(row["method"])
    label += f" [{row['variant']}]" if row["variant"] else ""
    if row.get("then"):
        label += f" + {row['then']}"
    if not math.isclose(float(row["sparsity"]), float(row["trained_sparsity"]), abs_tol=1e-4):
        label += f" (trained {float(row['trained_sparsity']):g})"
    return label


def pairwise_of(group: Group) -> list[TargetComparison]:
    """The pairwise comparisons of a table (primary space) with at least one compared pair, by target."""
    return [c for _, c in sorted(group.stats.targets.items()) if c.deltas]

