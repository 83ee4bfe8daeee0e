"""The desktop app's traffic figures (ptth_lib/gui/traffic.py): rates, graph bars, sizes in words."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ptth_lib.gui.traffic import HISTORY_POINTS, Traffic, rate_text, size_text


def test_rates_come_from_byte_counts_between_samples() -> None:
    t = Traffic()
    t.sample(10.0, 0, 0)  # the baseline: no rate yet
    assert (t.rate_up, t.rate_down) == (0.0, 0.0)
    t.sample(10.5, 512, 2048)
    assert (t.rate_up, t.rate_down) == (1024.0, 4096.0)
    t.sample(11.0, 0, 0)  # the forward restarted: its counters start again, never a negative rate
    assert (t.rate_up, t.rate_down) == (0.0, 0.0)


def test_an_idle_forward_has_no_bars_and_the_newest_point_is_at_the_right() -> None:
    t = Traffic()
    assert t.bars(60, 12) == []
    t.sample(0.0, 0, 0)
    t.sample(0.5, 100, 0)
    assert t.bars(60, 12) == [(59, 0, 60, 12)]


@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 10**9)), max_size=3 * HISTORY_POINTS),
       st.integers(1, 400), st.integers(1, 60))
def test_bars_stay_inside_the_image_and_the_history_is_bounded(counts: list[tuple[int, int]], width: int,
                                                              height: int) -> None:
    t = Traffic()
    up = down = 0
    for i, (du, dd) in enumerate(counts):
        up, down = up + du, down + dd
        t.sample(i * 0.5, up, down)
    assert len(t.up) == len(t.down) == HISTORY_POINTS
    bars = t.bars(width, height)
    assert len(bars) <= HISTORY_POINTS
    for x0, y0, x1, y1 in bars:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 == height
    if any(du or dd for du, dd in counts[1:][-HISTORY_POINTS:]):
        assert any(y0 == 0 for _, y0, _, _ in bars)  # the busiest point fills the height


def test_sizes_and_rates_in_words() -> None:
    assert [size_text(n) for n in (0, 930, 1024, 12_700, 5 * 2**20, 150 * 2**30, 3 * 2**50)] == [
        "0 B", "930 B", "1.0 KiB", "12.4 KiB", "5.0 MiB", "150 GiB", "3072 TiB"]
    assert rate_text(0.4) == ""
    assert rate_text(2048) == "2.0 KiB/s"
