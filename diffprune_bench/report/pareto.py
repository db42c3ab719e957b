"""Pareto fronts for the leaderboard's trade-off views (quality vs cost, both minimised)."""

from __future__ import annotations

from collections.abc import Sequence


def front_mask(x: Sequence[float], y: Sequence[float]) -> list[bool]:
    """True where point i is non-dominated when minimising both ``x`` and ``y``: no other point is at
    least as good on both and strictly better on one. Equal points are all kept (none beats the other)."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    points = list(zip(x, y, strict=True))
    return [
        not any(ox <= px and oy <= py and (ox < px or oy < py) for ox, oy in points)
        for px, py in points
    ]
