"""The shared page look (ptth_lib/pages): filters, Accept negotiation, the inlined stylesheet's hash."""

from __future__ import annotations

import base64
import hashlib
import re

import jinja2
import pytest

from ptth_lib import __version__, pages


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (1024 * 1024 - 1, "1.0 MiB"),  # not "1024.0 KiB"
    (5 * 2**20 + 2**19, "5.5 MiB"), (2**30, "1.0 GiB"), (2 * 2**40, "2.0 TiB"), (5000 * 2**40, "5000.0 TiB"),
])
def test_human_size(size: int, text: str) -> None:
    assert pages.human_size(size) == text


def test_times_are_utc() -> None:
    assert pages.format_time(0) == "1970-01-01 00:00"
    assert pages.iso_time(1_700_000_000.7) == "2023-11-14T22:13:20Z"


CHROME = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(("accept", "html"), [
    (CHROME, True), (FIREFOX, True), ("TEXT/HTML", True), ("application/xhtml+xml", True),
    (None, False), ("", False), ("*/*", False), ("text/*", False), ("application/json", False),
    ("text/plain, text/html;q=0.5", False), ("text/html;q=0", False), ("text/html;q=0.5, */*", False),
    ("garbage;;;", False),
])
def test_wants_html(accept: str | None, html: bool) -> None:
    assert pages.wants_html(accept) is html


def _style_of(page: str) -> str:
    match = re.search(r"<style>(.*?)</style>", page, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_inlined_stylesheet_matches_the_policy_hash() -> None:
    page = pages.render("base.html", title="t")
    digest = base64.b64encode(hashlib.sha256(_style_of(page).encode()).digest()).decode()
    assert f"'sha256-{digest}'" == pages.STYLE_SOURCE
    assert pages.STYLE_SOURCE in pages.PAGE_CSP
    assert "unsafe-inline" not in pages.PAGE_CSP


def test_nothing_is_loaded_from_elsewhere() -> None:
    assert not re.search(r"https?:|@import|url\(", pages.STYLESHEET)


def test_values_are_escaped_and_missing_ones_are_errors() -> None:
    page = pages.render("base.html", title="<b>t</b>", breadcrumbs=[("<i>home</i>", "a\"b"), ("x&y", None)])
    assert "<b>" not in page and "&lt;b&gt;t&lt;/b&gt;" in page
    assert "&lt;i&gt;home&lt;/i&gt;" in page and 'href="a&#34;b"' in page and "x&amp;y" in page
    assert f"PTTH {__version__}" in page
    with pytest.raises(jinja2.UndefinedError):
        pages.render("base.html")
