"""What the desktop app's rows show of a forward's traffic: rates, a small graph, sizes in words.

Pure: the window (window.py) feeds `Traffic` the forward's byte counters at
every refresh and draws the bars `Traffic.bars` gives as rectangles of a Tk
image; nothing here knows Tk.
"""

from __future__ import annotations

from collections import deque

# How many refreshes the graph shows: at the window's 0.5 s refresh, half a minute.
HISTORY_POINTS = 60


class Traffic:
    """One forward's recent throughput, from its cumulative byte counts (bounded: HISTORY_POINTS)."""

    def __init__(self) -> None:
        self.up: deque[float] = deque([0.0] * HISTORY_POINTS, maxlen=HISTORY_POINTS)  # bytes/s
        self.down: deque[float] = deque([0.0] * HISTORY_POINTS, maxlen=HISTORY_POINTS)
        self._last: tuple[float, int, int] | None = None

    def sample(self, now: float, bytes_up: int, bytes_down: int) -> None:
        """Add the rates since the last sample (the first sample only sets the baseline)."""
        if self._last is not None:
            then, up, down = self._last
            secs = max(now - then, 1e-3)
            # A forward restarted counts from 0 again: no negative rate.
            self.up.append(max(bytes_up - up, 0) / secs)
            self.down.append(max(bytes_down - down, 0) / secs)
        self._last = (now, bytes_up, bytes_down)

    @property
    def rate_up(self) -> float:
        return self.up[-1]

    @property
    def rate_down(self) -> float:
        return self.down[-1]

    def bars(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """Rectangles (x0, y0, x1, y1), one per history point with traffic, the newest at the right:
        the history spread over `width` pixels, each bar as high as both directions' rate against
        the highest in view, and at least 2 pixels, so that a trickle still shows."""
        totals = [u + d for u, d in zip(self.up, self.down, strict=True)]
        top = max(totals)
        if top <= 0 or width <= 0 or height <= 0:
            return []
        rects = []
        for i, total in enumerate(totals):
            if total > 0:
                x0 = i * width // HISTORY_POINTS
                x1 = max((i + 1) * width // HISTORY_POINTS, x0 + 1)
                h = max(round(total / top * height), min(2, height))
                rects.append((x0, height - h, x1, height))
        return rects


def size_text(n: float) -> str:
    """A byte count for people: "0 B", "930 B", "12.4 KiB", "1.1 GiB"."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def rate_text(bytes_per_sec: float) -> str:
    """A rate for people: "" when idle, else "12.4 KiB/s"."""
    return f"{size_text(bytes_per_sec)}/s" if bytes_per_sec >= 1 else ""
