"""Requested vs realised saving: the one tolerance the record, the run summary and the leaderboard share.

A method asked for a target it cannot reach (DeepCache's shallow branch runs every step, a step count is
an integer) still produces a row; the record says how far off it landed so no table passes it off as
the operating point it was asked for.
"""

from __future__ import annotations

import math
from typing import Any

#: realised saving may differ from the requested target by this much before a row is flagged (±2 points)
TARGET_TOLERANCE = 0.02


def target_report(requested: float | None, realised: float | None) -> dict[str, Any] | None:
    """``{"requested", "realised", "missed"}`` for a row with a target (None for controls at 0)."""
    if requested is None or not requested > 0:
        return None
    known = realised is not None and math.isfinite(realised)
    missed = known and abs(float(realised) - float(requested)) > TARGET_TOLERANCE
    return {"requested": float(requested), "realised": float(realised) if known else None,
            "tolerance": TARGET_TOLERANCE, "missed": bool(missed)}
