"""What the file browser shows, without I/O: entries, their kinds, sorting, links and breadcrumbs.

Links are relative, so a page works the same at `/files/...` (ptth_file_server)
and at `/frontend/servers/NAME/files/...` (through the relay). A folder's
pages live at its URL with a trailing slash: the listing (`?sort=&order=`),
a file's preview (`?view=NAME`) and the folder as a zip (`?zip`).

Links with a query start from the server's level: `/files?at=FOLDER/&...`
(relative, `../../files?...`), which the file server redirects to
`/files/FOLDER/?...`. `wget -r -np` never follows a link above the folder it
started in, and `/files` (without the slash) is above every folder, so a
mirror holds the files and one index.html per folder: not a copy of each
listing in every sort order, a preview page per file and a zip per folder.
rclone skips every link with a query. (wget ignores rel="nofollow" on links;
it honours only the robots meta tag, which would stop it following the
entries too.) Each entry also has a plain link (`NAME`, `NAME/`), which is
what they follow.
"""

from __future__ import annotations

import mimetypes
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias
from urllib.parse import quote

SortKey: TypeAlias = Literal["name", "size", "mtime"]
Order: TypeAlias = Literal["asc", "desc"]
SORT_KEYS: tuple[SortKey, ...] = ("name", "size", "mtime")
# What a column starts with when clicked: names A to Z, the biggest and newest first.
FIRST_ORDER: Mapping[SortKey, Order] = {"name": "asc", "size": "desc", "mtime": "desc"}

# Kinds of entries, each with an icon; the preview page shows the first six inline.
PREVIEW_KINDS = frozenset({"image", "video", "audio", "pdf", "markdown", "text"})

# Image types every current browser shows (not TIFF, not HEIC).
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml",
                          "image/avif", "image/bmp", "image/x-icon", "image/vnd.microsoft.icon"})
_MEDIA_TYPES = {"video/mp4": "video", "video/webm": "video", "video/ogg": "video", "video/quicktime": "video",
                "audio/mpeg": "audio", "audio/ogg": "audio", "audio/wav": "audio", "audio/x-wav": "audio",
                "audio/flac": "audio", "audio/x-flac": "audio", "audio/mp4": "audio", "audio/webm": "audio",
                "audio/aac": "audio", "audio/opus": "audio"}
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".iso", ".deb", ".rpm")
_MARKDOWN_SUFFIXES = (".md", ".markdown", ".mdown")
# Source and config files that mimetypes does not know as text (or knows as something else).
TEXT_SUFFIXES = (".rs", ".go", ".toml", ".yaml", ".yml", ".ini", ".cfg", ".conf", ".log", ".kt", ".swift",
                 ".rb", ".lua", ".sql", ".tsx", ".jsx", ".vue", ".ps1", ".bat", ".cmake", ".gradle",
                 ".properties", ".env", ".diff", ".patch", ".rst", ".tex", ".dart", ".scala", ".hs",
                 ".ex", ".exs", ".erl", ".clj", ".zig", ".nim", ".proto", ".graphql", ".lock")
# Files known by their whole name.
TEXT_NAMES = frozenset({"readme", "license", "copying", "makefile", "dockerfile", "changelog", "authors",
                        "notice", "todo", "gemfile", "procfile", "vagrantfile", "justfile"})


@dataclass(frozen=True)
class Entry:
    """One thing in a folder, as listed: its name (as os.fsdecode gives it), size and mtime."""

    name: str
    is_dir: bool
    size: int
    mtime: float

    @property
    def kind(self) -> str:
        return "folder" if self.is_dir else kind_of(self.name)


def kind_of(name: str) -> str:
    """What a file is, by its name: image, video, audio, pdf, markdown, text, archive or file."""
    lower = name.lower()
    if lower.endswith(_MARKDOWN_SUFFIXES):
        return "markdown"
    if lower.endswith(_ARCHIVE_SUFFIXES):
        return "archive"
    if lower in TEXT_NAMES or lower.endswith(TEXT_SUFFIXES):
        return "text"
    ctype, _ = mimetypes.guess_type(name)
    if ctype is None:
        return "file"
    if ctype in _IMAGE_TYPES:
        return "image"
    if ctype in _MEDIA_TYPES:
        return _MEDIA_TYPES[ctype]
    if ctype == "application/pdf":
        return "pdf"
    if ctype.startswith("text/") or ctype in ("application/json", "application/javascript", "application/xml",
                                               "application/x-sh", "application/toml", "application/yaml"):
        return "text"
    return "file"


def parse_sort(query: Mapping[str, list[str]]) -> tuple[SortKey, Order]:
    """The listing's order from a parsed query; anything unknown gives the default, by name."""
    wanted = (query.get("sort") or [""])[0]
    key: SortKey = next((k for k in SORT_KEYS if k == wanted), "name")
    order_text = (query.get("order") or [""])[0]
    order: Order = "asc" if order_text == "asc" else "desc" if order_text == "desc" else FIRST_ORDER[key]
    return key, order


def sort_entries(entries: Iterable[Entry], key: SortKey, order: Order) -> list[Entry]:
    """Folders first, whatever the order; then by `key`, names breaking ties (case-insensitive)."""
    def by_name(e: Entry) -> tuple[str, str]:
        return e.name.casefold(), e.name

    ordered = sorted(entries, key=by_name)
    descending = order == "desc"
    if key == "name":
        if descending:
            ordered.reverse()
    else:
        # reverse=True keeps the sort stable: equal sizes or times stay A to Z.
        ordered.sort(key=lambda e: e.size if key == "size" else e.mtime, reverse=descending)
    return [e for e in ordered if e.is_dir] + [e for e in ordered if not e.is_dir]


def href(name: str) -> str:
    """A file name as one relative URL segment: every byte but unreserved ones percent-encoded.

    The result has no quote, `&`, `<`, `#`, `?`, `/` nor `:`, so it is safe in an
    attribute and can never read as a scheme (`javascript:`) or a fragment.
    """
    return quote(os.fsencode(name), safe="")


def display(name: str) -> str:
    """A file name as text to show: bytes that are not UTF-8 become U+FFFD (escaping is the template's)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def query_href(folder_names: list[str], params: Sequence[tuple[str, str]]) -> str:
    """A link, from inside a folder, to one of its pages: `../../files?at=FOLDER/&params` (see module doc).

    `folder_names` are the folder's names below /files/ ([] for /files/ itself). A
    parameter with an empty value is written bare (`zip`, not `zip=`).
    """
    at = [("at", "".join(href(n) + "/" for n in folder_names))] if folder_names else []
    query = "&".join(k if v == "" else f"{k}={v if k == 'at' else href(v)}" for k, v in [*at, *params])
    return "../" * (len(folder_names) + 1) + "files?" + query


def landing(params: Mapping[str, list[str]]) -> str | None:
    """Where a link of `query_href` lands, relative to `/files`; None if it names no folder plainly.

    `at` is taken apart and put back together name by name, so it can only name
    a folder below /files/ (`..`, `.` and empty names are refused).
    """
    at = (params.get("at") or [""])[0]
    names = at.split("/")
    if names[-1] == "":
        names.pop()
    if any(n in ("", ".", "..") or "\\" in n or "\0" in n for n in names):
        return None
    folder = "".join(href(n) + "/" for n in names)
    return "files/" + folder + folder_query(params)


def folder_query(params: Mapping[str, list[str]]) -> str:
    """The folder-page parameters of a parsed query, re-encoded: kept by the slash redirect, others dropped."""
    kept = [f"{k}={href(v[0])}" for k in ("view", "sort", "order") if (v := params.get(k))]
    if "zip" in params:
        kept.append("zip")
    return "?" + "&".join(kept) if kept else ""


@dataclass(frozen=True)
class Crumb:
    label: str
    href: str | None  # None: the page itself


def breadcrumbs(display_name: str, folder_names: list[str], via_relay: bool,
                current: str | None = None) -> list[Crumb]:
    """The trail from the relay's server list (when relayed) to a folder, from a page inside it.

    `current` is a file shown in the folder (a preview); None makes the folder itself the page.
    """
    depth = len(folder_names)
    crumbs = []
    if via_relay:
        # The page is at SERVERS/NAME/files/f1/.../fn/: up n folders, files/ and NAME/.
        crumbs.append(Crumb("Servers", "../" * (depth + 2)))
    trail = [display_name, *(display(n) for n in folder_names)]
    for index, label in enumerate(trail):
        up = depth - index
        crumbs.append(Crumb(label, ("../" * up) or "./"))
    if current is None:
        crumbs[-1] = Crumb(crumbs[-1].label, None)
    else:
        crumbs.append(Crumb(display(current), None))
    return crumbs


def zip_name(display_name: str, folder_names: list[str]) -> str:
    """The download's file name: the folder's own, or the server's for the root."""
    base = display(folder_names[-1]) if folder_names else display_name
    return posixpath.basename(base.replace("/", "_").replace("\\", "_")) or "files"
