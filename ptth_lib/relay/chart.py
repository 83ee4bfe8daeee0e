"""Small line charts as hand-written SVG path data, for the dashboard. Pure: no I/O, no Flask.

A chart is drawn on the server, so the dashboard needs no script: `chart`
turns (time, value) points into the `d` of an SVG <path> for the line and
one for the area under it, in a viewBox of WIDTH x HEIGHT user units that
the page scales to its column. Time runs left to right over the window
ending now; values from 0 at the bottom to the peak near the top. The
template (templates/dashboard.html) writes the <svg>; numbers and attribute
values here are digits, commas, spaces and letters only, so nothing in them
needs escaping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The viewBox: wide and low, a sparkline's proportions.
WIDTH = 300.0
HEIGHT = 60.0
# Room kept above the peak and below zero so that a thick line is not clipped.
PAD = 2.0


@dataclass(frozen=True)
class Chart:
    """One chart's path data and what it shows."""

    line: str  # the `d` of the line; "" when there are no points
    area: str  # the `d` of the area under it, closed along the bottom; "" when there are no points
    peak: float  # the largest value (the top of the scale); 0 when all are 0
    points: int  # how many points the line has


def chart(points: Sequence[tuple[float, float]], now: float, window_secs: float) -> Chart:
    """The chart of `points` (time, value), for the `window_secs` that end at `now`.

    Points older than the window are left out; later ones (clocks never run
    back, but be safe) sit at the right edge. Negative values are drawn as 0.
    """
    kept = [(t, max(0.0, v)) for t, v in points if now - t <= window_secs]
    if not kept:
        return Chart("", "", 0.0, 0)
    peak = max(v for _, v in kept)
    coords = [(_x(t, now, window_secs), _y(v, peak)) for t, v in kept]
    line = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    bottom = HEIGHT - PAD
    area = f"{line} L{coords[-1][0]:.1f},{bottom:.1f} L{coords[0][0]:.1f},{bottom:.1f} Z"
    return Chart(line, area, peak, len(coords))


def _x(t: float, now: float, window_secs: float) -> float:
    """Time to x: the window's start at 0, now at WIDTH."""
    return WIDTH * (1.0 - min(1.0, max(0.0, now - t) / window_secs))


def _y(value: float, peak: float) -> float:
    """Value to y: 0 at the bottom, `peak` at the top (SVG's y grows downwards)."""
    span = HEIGHT - 2 * PAD
    return HEIGHT - PAD - (span * value / peak if peak > 0 else 0.0)
