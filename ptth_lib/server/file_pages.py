"""The file server's HTML pages: a folder's listing, a file's preview, errors and the root page.

Each function takes what the page shows and returns its HTML; the templates
are in ptth_lib/pages/templates and escape every value. Markdown is rendered
by markdown-it-py with raw HTML off: `<script>` in a README shows as text,
and its link checker refuses `javascript:` and `data:` URLs.
"""

from __future__ import annotations

import http
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from markupsafe import Markup

from ptth_lib import pages
from ptth_lib.pages import STYLE_SOURCE
from ptth_lib.server.file_listing import (
    FIRST_ORDER,
    PREVIEW_KINDS,
    SORT_KEYS,
    Crumb,
    Entry,
    Order,
    SortKey,
    display,
    href,
    query_href,
)

# The policy of the file server's pages (not of the files it serves): the inlined stylesheet,
# the data: icon, and the previewed file (image, media, PDF) from the same server; no script at all.
PAGE_CSP = (f"default-src 'none'; style-src {STYLE_SOURCE}; img-src 'self' data:; media-src 'self'; "
            "object-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")

_COLUMNS = (("name", "Name", "name"), ("size", "Size", "num"), ("mtime", "Modified (UTC)", "when hide-narrow"))

# CommonMark plus tables and strikethrough, as GitHub shows a README; "html": False escapes raw HTML.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable(
    ["table", "strikethrough"])


@dataclass(frozen=True)
class Site:
    """Who is serving: the name shown first in the breadcrumbs, and whether a relay's list is above it."""

    display_name: str = "PTTH server"
    via_relay: bool = False


@dataclass(frozen=True)
class _Row:
    label: str
    kind: str
    is_dir: bool
    size: int
    mtime: float
    href: str  # the entry's plain link: its bytes, or its listing
    open_href: str  # what clicking the name opens: the preview when there is one


def listing(site: Site, crumbs: Sequence[Crumb], folder_names: list[str], entries: Sequence[Entry],
            sort: SortKey, order: Order) -> str:
    """A folder's page: `entries` already sorted by (`sort`, `order`)."""
    rows = []
    for e in entries:
        plain = href(e.name) + ("/" if e.is_dir else "")
        opens = plain if e.is_dir or e.kind not in PREVIEW_KINDS else query_href(folder_names, [("view", e.name)])
        rows.append(_Row(display(e.name), e.kind, e.is_dir, e.size, e.mtime, plain, opens))
    sort_links = {}
    for key in SORT_KEYS:
        # A click on the sorted column flips it; on another, starts that one's natural way.
        next_order = ("desc" if order == "asc" else "asc") if key == sort else FIRST_ORDER[key]
        sort_links[key] = query_href(folder_names, [("sort", key), ("order", next_order)])
    files = [e for e in entries if not e.is_dir]
    counts = {"folders": len(entries) - len(files), "files": len(files), "bytes": sum(e.size for e in files)}
    return pages.render(
        "listing.html", title=_title(site, crumbs), breadcrumbs=_pairs(crumbs), rows=rows, columns=_COLUMNS,
        sort=sort, order=order, sort_links=sort_links, has_parent=bool(folder_names), counts=counts,
        zip_href=query_href(folder_names, [("zip", "")]),
    )


def preview(site: Site, crumbs: Sequence[Crumb], name: str, kind: str, size: int, mtime: float, content_type: str,
            head: bytes | None) -> str:
    """A file's page, from its folder: `head` is its first bytes for text and Markdown (None otherwise)."""
    context: dict[str, Any] = {"text": "", "rendered": "", "truncated": False, "shown": 0}
    if head is not None:
        text = head.decode("utf-8", "replace")
        context.update(truncated=len(head) < size, shown=len(head), text=text)
        if kind == "markdown":
            context["rendered"] = Markup(_MARKDOWN.render(text))
    return pages.render(
        "preview.html", title=_title(site, crumbs), breadcrumbs=_pairs(crumbs), label=display(name), kind=kind,
        size=size, mtime=mtime, content_type=content_type, raw_href=href(name),
        download_href=href(name) + "?download", **context,
    )


def error(status: int, message: str, site: Site) -> str:
    """An error page for browsers."""
    phrase = http.HTTPStatus(status).phrase
    return pages.render("error.html", title=f"{status} {phrase} · {site.display_name}",
                        breadcrumbs=[(site.display_name, None)], status=status, phrase=phrase, message=message)


def server_root(site: Site) -> str:
    """The page at the server's "/": a link to the files."""
    crumbs = [("Servers", "../")] if site.via_relay else []
    return pages.render("server_root.html", title=site.display_name,
                        breadcrumbs=[*crumbs, (site.display_name, None)])


def _pairs(crumbs: Sequence[Crumb]) -> list[tuple[str, str | None]]:
    return [(c.label, c.href) for c in crumbs]


def _title(site: Site, crumbs: Sequence[Crumb]) -> str:
    """"photos · My server": the page's own name first, so browser tabs tell pages apart."""
    here = crumbs[-1].label
    return here if len(crumbs) == 1 + site.via_relay else f"{here} · {site.display_name}"
