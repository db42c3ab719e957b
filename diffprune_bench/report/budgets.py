"""Budget comparison: two leaderboard tables that differ only by fine-tune budget, side by side.

The tables stay separate (a row is only ever compared within its budget); this note reads them together
to answer "does a longer fine-tune change which method wins?": per target saving, each row present at
both budgets with its FID (mean ± std over seeds) and its compact letters in each table, and whether the
leading group (the significant best row, else the rows tied with the lowest FID) changes. Everything
is read from what the tables' statistics found (:class:`~diffprune_bench.report.compare.TableStatistics`,
:class:`~diffprune_bench.report.pairwise.TargetComparison`), never recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from diffprune_bench.report.training_compute import finetune_steps

if TYPE_CHECKING:
    from diffprune_bench.report.board import Group, Leaderboard
    from diffprune_bench.report.pairwise import TargetComparison

#: a table row's identity within its table (what aggregate() groups seeds by)
ROW_KEYS = ["method", "variant", "sparsity", "trained_sparsity", "then"]
_FINETUNE_PART = "fine-tune "


def _other_parts(budget: str) -> tuple[str, ...]:
    """A budget string without its fine-tune part (what must agree for two tables to pair)."""
    return tuple(p for p in str(budget).split("; ") if not p.startswith(_FINETUNE_PART))


def budget_pairs(board: Leaderboard) -> list[tuple[Group, Group]]:
    """Pairs of tables (shorter fine-tune first) that share everything but the fine-tune steps; with more
    than two budgets of one protocol, each budget is paired with the next longer one."""
    by_rest: dict[tuple, list[Group]] = {}
    for group in board.groups:
        steps = finetune_steps(group.key["budget"])
        if math.isnan(steps):
            continue
        rest = tuple((k, str(v)) for k, v in sorted(group.key.items()) if k != "budget")
        by_rest.setdefault((rest, _other_parts(group.key["budget"])), []).append(group)
    pairs = []
    for groups in by_rest.values():
        ordered = sorted(groups, key=lambda g: finetune_steps(g.key["budget"]))
        pairs += [(a, b) for a, b in zip(ordered, ordered[1:], strict=False)
                  if finetune_steps(a.key["budget"]) != finetune_steps(b.key["budget"])]
    return pairs


def _key(row: pd.Series) -> tuple:
    return tuple(round(float(row[k]), 4) if k in ("sparsity", "trained_sparsity") else str(row.get(k) or "")
                 for k in ROW_KEYS)


def _fid(row: pd.Series) -> str:
    mean, std = row.get("fid_mean"), row.get("fid_std")
    if mean is None or pd.isna(mean):
        return "-"
    return f"{mean:.3f}" + ("" if std is None or pd.isna(std) else f" ± {std:.3f}")


def _letters(group: Group, index: Any, target: float) -> str:
    comparison = group.stats.targets.get(target)
    return comparison.letters().get(index, "") if comparison is not None else ""


def _steps_text(group: Group) -> str:
    return f"{finetune_steps(group.key['budget']):g}"


def comparison_frame(short: Group, long: Group) -> pd.DataFrame:
    """One line per row present in both tables (controls first, then by target and FID at the shorter
    budget): its FID and letters in each."""
    from diffprune_bench.report.board import row_label

    a, b = _steps_text(short), _steps_text(long)
    longer = {_key(r): (i, r) for i, r in long.table.iterrows()}
    lines = []
    for i, row in short.table.iterrows():
        match = longer.get(_key(row))
        if match is None:
            continue
        j, other = match
        target = float(row["sparsity"])
        lines.append({
            "method": row_label(row),
            "target": "control" if row.get("is_reference") else f"{target:g}",
            f"FID @{a}": _fid(row),
            f"letters @{a}": _letters(short, i, target),
            f"FID @{b}": _fid(other),
            f"letters @{b}": _letters(long, j, target),
            "_order": (not row.get("is_reference"), target, float(row["fid_mean"]) if pd.notna(row["fid_mean"])
                       else math.inf),
        })
    frame = pd.DataFrame(lines)
    if frame.empty:
        return frame
    return frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


@dataclass(frozen=True)
class Leading:
    """The leading group of one table at one target: the significant best row, else the tied group."""

    labels: frozenset[str]
    best: bool  # a single row significantly better than every other

    def describe(self) -> str:
        names = ", ".join(sorted(self.labels))
        return f"{names} (best)" if self.best else f"{{{names}}} (tied)"


def leading(group: Group, target: float) -> Leading | None:
    """The leading group at ``target`` as the table's pairwise comparisons found it (None: no comparison)."""
    comparison: TargetComparison | None = group.stats.targets.get(target)
    if comparison is None or not comparison.deltas:
        return None
    labels = comparison.labels
    best = comparison.best
    rows = [best] if best is not None else comparison.tied()
    return Leading(frozenset(labels.get(r, str(r)) for r in rows), best is not None)


def leading_lines(short: Group, long: Group) -> list[str]:
    """Per target compared at both budgets: the leading group at each and whether it changes."""
    a, b = _steps_text(short), _steps_text(long)
    lines = []
    for target in sorted(set(short.stats.targets) & set(long.stats.targets)):
        first, second = leading(short, target), leading(long, target)
        if first is None or second is None:
            continue
        verdict = "unchanged" if first.labels == second.labels else "**changes**"
        lines.append(f"Target {target:g}: leading group at {a} steps {first.describe()}; at {b} steps "
                     f"{second.describe()}: {verdict}.")
    return lines


def markdown_section(board: Leaderboard) -> str:
    """The leaderboard's "Budget comparison" section ("" when no two tables differ only by fine-tune budget)."""
    pairs = budget_pairs(board)
    if not pairs:
        return ""
    lines = ["## Budget comparison", "",
             "Tables that differ only by the fine-tune budget, side by side (each row's FID: mean ± std over seeds; "
             "letters from its own table's pairwise comparisons, so letters are comparable within a column, never "
             "across the two). Leading group: the row significantly better than every other on-target row, else "
             "the rows not significantly worse than the lowest FID.", ""]
    for short, long in pairs:
        k = short.key
        lines += [f"### {k['dataset']}: {k['extractor']} FID, N={k['num_samples']}, {str(k['sampler']).upper()} "
                  f"{k['sample_steps']} steps: fine-tune {_steps_text(short)} vs {_steps_text(long)} steps", ""]
        frame = comparison_frame(short, long)
        if frame.empty:
            lines += ["No row is present in both tables.", ""]
            continue
        lines += [frame.to_markdown(index=False, disable_numparse=True), ""]
        lines += [f"- {line}" for line in leading_lines(short, long)] + [""]
    return "\n".join(lines)


def site_sections(board: Leaderboard) -> list[dict[str, Any]]:
    """The same comparison for the web page: per pair of tables a title, columns, rows and the leading-group
    lines (plain text)."""
    sections = []
    for short, long in budget_pairs(board):
        frame = comparison_frame(short, long)
        k = short.key
        sections.append({
            "title": f"{k['dataset']}: {k['extractor']} FID, N={k['num_samples']}, {str(k['sampler']).upper()} "
                     f"{k['sample_steps']} steps: fine-tune {_steps_text(short)} vs {_steps_text(long)} steps",
            "columns": list(frame.columns),
            "rows": frame.astype(str).values.tolist(),
            "lines": [line.replace("**", "") for line in leading_lines(short, long)],
        })
    return sections
