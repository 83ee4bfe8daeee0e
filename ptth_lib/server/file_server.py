"""The file server: maps one request onto a directory tree, without sockets.

`serve` turns (method, raw request target, headers) into a `FileResponse`
whose body is a generator reading the file in `CHUNK_BYTES` blocks. The
server calls it in-process for each request that comes through the tunnel;
`make_wsgi_app` adapts it to WSGI for the standalone `ptth_file_server.py`.

URLs: `/` is a small root page, `/files/...` is the tree. A file's URL
without a query gives its bytes, to everyone (`?download` adds
Content-Disposition: attachment). A folder's URL gives its listing, and with
`?view=NAME` a page showing one of its files (file_pages.py), with `?zip` the
folder as a zip (folder_zip.py); file_listing.py says why their links are
written as `../../files?at=FOLDER/&...`. Every link and redirect is relative, so pages work
the same behind the relay's `/frontend/servers/NAME/` prefix. Every client
path goes through `_safe_path`, which refuses anything that would leave the
root. Errors are a page for browsers and one line of text for the rest
(`pages.wants_html`).
"""

from __future__ import annotations

import functools
import http
import logging
import mimetypes
import os
import stat
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal, TypeAlias
from urllib.parse import parse_qs, quote, unquote_to_bytes, urlencode

from werkzeug.http import http_date, parse_date, parse_etags, quote_etag

from ptth_lib.pages import wants_html
from ptth_lib.server import file_pages
from ptth_lib.server.file_listing import (
    PREVIEW_KINDS,
    Entry,
    breadcrumbs,
    display,
    folder_query,
    href,
    kind_of,
    landing,
    parse_sort,
    sort_entries,
    zip_name,
)
from ptth_lib.server.file_pages import Site
from ptth_lib.server.folder_zip import zip_folder

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

logger = logging.getLogger(__name__)

# Big enough that per-chunk overhead (a tunnel write, a gevent switch) is
# small next to the copy, small enough that a slow client pins little memory.
CHUNK_BYTES = 256 * 1024

# Longer digit strings are refused as malformed: 10**100 bytes is no real file
# and int() of thousands of digits is slow (and raises past 4300 digits).
_MAX_RANGE_DIGITS = 100

UNSATISFIABLE: Literal["unsatisfiable"] = "unsatisfiable"

# Typed as a generator (an Iterator with close()) so callers can close it.
Body: TypeAlias = Generator[bytes, None, None]

RangeResult: TypeAlias = tuple[int, int] | Literal["unsatisfiable"] | None

# Types served as UTF-8 text: `; charset=utf-8` is added to these, to every text/* type and
# to the structured +json and +xml types (RFC 6839). Without a charset browsers guess, mostly
# windows-1252 for text/plain, and UTF-8 text shows as mojibake.
_TEXT_TYPES = frozenset({
    "application/json", "application/javascript", "application/x-javascript", "application/ecmascript",
    "application/xml", "application/x-sh", "application/yaml", "application/x-yaml", "application/toml",
})
_TEXT_SUFFIXES = ("+json", "+xml")

# A preview shows this much of a text or Markdown file; the page says so and links the rest.
MAX_PREVIEW_BYTES = 1024 * 1024

_ALLOWED_METHODS = "GET, HEAD"
_FILES_PREFIX = "/files/"
_PRINTABLE_ASCII = "".join(map(chr, range(0x21, 0x7F)))


_MESSAGES = {
    403: "The server does not send this: it is not a plain file, or it may not be read.",
    404: "Nothing here: no file or folder has this name, or it left.",
    405: "This address takes only GET and HEAD.",
    416: "The requested range lies outside the file.",
}


@dataclass(frozen=True)
class _Ask:
    """What shapes every answer to one request: HEAD or not, a browser or not, who serves."""

    is_head: bool
    html: bool
    site: Site


@dataclass(frozen=True)
class FileResponse:
    """Status, lowercase headers and a body generator (close it to free the file)."""

    status: int
    headers: list[tuple[str, str]]
    body: Body


def parse_range(header: str | None, size: int) -> RangeResult:
    """Parse a Range header against a file of `size` bytes.

    Returns inclusive `(start, end)` for one satisfiable byte range,
    `UNSATISFIABLE` for a well-formed range outside the file (answer 416), and
    `None` for no header, anything malformed or several ranges (answer 200).
    """
    if header is None:
        return None
    unit, equals, spec = header.partition("=")
    if not equals or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    if first == "":
        suffix = _plain_int(last)
        if suffix is None:
            return None
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size - 1
    start = _plain_int(first)
    if start is None:
        return None
    if last == "":
        end = size - 1
    else:
        parsed_end = _plain_int(last)
        if parsed_end is None or parsed_end < start:
            return None
        end = min(parsed_end, size - 1)
    if start >= size:
        return UNSATISFIABLE
    return start, end


def _plain_int(text: str) -> int | None:
    """Parse ASCII digits only: int() would also take "+1", " 1", "1_0" and "١"."""
    if not text or len(text) > _MAX_RANGE_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def serve(
    root: str | os.PathLike[str], method: str, uri: str, headers: Mapping[str, str],
    site: Site = Site(),  # noqa: B008 - frozen, so sharing the default is safe
) -> FileResponse:
    """Answer one request for the tree under `root`.

    `uri` is the raw request target (percent-encoded path, optional query);
    `headers` has lowercase names; `site` names the server in the pages.
    """
    ask = _Ask(method == "HEAD", wants_html(headers.get("accept")), site)
    if method not in ("GET", "HEAD"):
        return _error(405, ask, [("allow", _ALLOWED_METHODS)])
    path, _, query_text = uri.partition("?")
    # surrogateescape: a name's bytes that are not UTF-8 come back as os.fsdecode gives them.
    query = parse_qs(query_text, keep_blank_values=True, errors="surrogateescape")
    if path == "/":
        return _html(file_pages.server_root(site), ask.is_head)
    if path == "/files":  # the links of file_listing.query_href come here
        location = landing(query)
        return _error(404, ask) if location is None else _redirect(location, ask)
    if not path.startswith(_FILES_PREFIX):
        return _error(404, ask)
    url_path = path[len(_FILES_PREFIX) :]
    target = _safe_path(root, url_path)
    if target is None:
        return _error(404, ask)
    try:
        st = os.stat(target)
    except OSError:
        return _error(404, ask)
    # The name as requested: `target` is the resolved path, maybe a symlink's target.
    name = _decode_segment(url_path.rsplit("/", 1)[-1])
    if stat.S_ISDIR(st.st_mode):
        if url_path and not url_path.endswith("/"):
            return _redirect(href(name) + "/" + folder_query(query), ask)
        folder_names = [_decode_segment(s) for s in url_path.split("/") if s]
        if "zip" in query:
            return _serve_zip(root, target, folder_names, ask)
        if "view" in query:
            return _serve_preview(root, url_path, folder_names, query["view"][0], ask)
        return _serve_listing(root, target, url_path, folder_names, query, ask)
    if url_path.endswith("/"):
        return _error(404, ask)
    if not stat.S_ISREG(st.st_mode):
        return _error(403, ask)  # FIFOs, devices, sockets: never opened
    if "view" in query:  # FILE?view, typed by hand: the preview lives at its folder's URL
        return _redirect("./?" + urlencode({"view": name}), ask)
    return _serve_file(target, name, ask, headers, download="download" in query)


def make_wsgi_app(root: str | os.PathLike[str], site: Site = Site()) -> WSGIApplication:  # noqa: B008
    """Wrap `serve` as a WSGI application for the standalone file server."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        response = serve(root, environ["REQUEST_METHOD"], _raw_uri(environ), headers, site)
        start_response(
            f"{response.status} {http.HTTPStatus(response.status).phrase}", response.headers
        )
        return response.body

    return app


def _raw_uri(environ: WSGIEnvironment) -> str:
    """Rebuild the request target from a WSGI environ, percent-encoded."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        raw = quote(_wsgi_bytes(environ.get("PATH_INFO", "")), safe="/")
        if environ.get("QUERY_STRING"):
            raw += "?" + environ["QUERY_STRING"]
    # Encode what is not printable ASCII so `serve` reads the original bytes
    # back out of the percent escapes.
    return quote(_wsgi_bytes(str(raw)), safe=_PRINTABLE_ASCII)


def _wsgi_bytes(text: str) -> bytes:
    """Undo WSGI's bytes-as-latin-1 strings (PEP 3333); be lenient with servers that do not."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _safe_path(root: str | os.PathLike[str], url_path: str) -> Path | None:
    """Map a percent-encoded path below `/files/` to a real path inside `root`.

    Returns None when the path is malformed or would leave the root: `.` and
    `..`, empty segments, encoded `/`, backslashes, NUL, or symlinks whose
    target lies outside the root. Symlinks that stay inside are followed.
    """
    segments = url_path.split("/")
    if segments[-1] == "":
        segments.pop()  # a trailing slash asks for a directory; serve() checks
    names = []
    for segment in segments:
        name = _decode_segment(segment)
        if not _is_plain_name(name):
            return None
        names.append(name)
    real_root = _real_root(os.fspath(root))
    candidate = real_root.joinpath(*names)
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(real_root):
        logger.debug("refused path leaving the root: %r", url_path)
        return None
    return real


def _is_plain_name(name: str) -> bool:
    """A name one URL segment can reach: not `.` nor `..`, no slash, backslash nor NUL."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


@functools.lru_cache(maxsize=16)
def _real_root(root: str) -> Path:
    """The root with symlinks resolved, once per root rather than per request."""
    return Path(os.path.realpath(root))


def _decode_segment(segment: str) -> str:
    """Percent-decode one path segment to a file name (bytes as os.fsdecode sees them)."""
    # surrogatepass: a stray surrogate in `uri` must not raise; it just names no file.
    return os.fsdecode(unquote_to_bytes(segment.encode("utf-8", "surrogatepass")))


def _serve_file(path: Path, name: str, ask: _Ask, headers: Mapping[str, str],
                download: bool = False) -> FileResponse:
    is_head = ask.is_head
    # O_NONBLOCK: a FIFO swapped in after stat() must not block open();
    # fstat then checks what we actually opened.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        return _error(403, ask)
    except OSError:
        return _error(404, ask)
    file = open(fd, "rb", buffering=0)  # noqa: SIM115 - owns fd; closed below or by the body
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            file.close()
            return _error(403, ask)
        size = st.st_size
        etag = quote_etag(f"{st.st_ino:x}-{size:x}-{st.st_mtime_ns:x}")
        last_modified = http_date(int(st.st_mtime))
        validators = [("etag", etag), ("last-modified", last_modified)]
        if _is_not_modified(headers, etag, int(st.st_mtime)):
            file.close()
            return FileResponse(304, validators, _chunks(b""))
        common = [("content-type", _content_type(name)), ("accept-ranges", "bytes"), *validators]
        if download:
            common.append(("content-disposition", _attachment(name)))
        # RFC 9110 section 14.2: range handling is defined for GET only.
        byte_range = (
            None if is_head else parse_range(_honored_range(headers, etag, last_modified), size)
        )
        if byte_range == UNSATISFIABLE:
            file.close()
            return _error(416, ask, [("content-range", f"bytes */{size}")])
        if byte_range is None:
            status, start, length, extra = 200, 0, size, []
        else:
            start, end = byte_range
            status, length = 206, end - start + 1
            extra = [("content-range", f"bytes {start}-{end}/{size}")]
        response_headers = [*common, *extra, ("content-length", str(length))]
        if is_head:
            file.close()
            return FileResponse(status, response_headers, _chunks(b""))
        body = _read_file(file, start, length)
        next(body)  # run up to the priming yield: now close() closes the file
        return FileResponse(status, response_headers, body)
    except BaseException:
        file.close()
        raise


def _content_type(name: str) -> str:
    """The Content-Type for a file called `name`: its guessed type, with a charset if it is text."""
    ctype, encoding = mimetypes.guess_type(name)
    if ctype is None and kind_of(name) == "text":  # source code and README-like names mimetypes misses
        ctype = "text/plain"
    if ctype is None or encoding is not None:
        return "application/octet-stream"  # no Content-Encoding: a .gz is served as is
    if ctype.startswith("text/") or ctype in _TEXT_TYPES or ctype.endswith(_TEXT_SUFFIXES):
        return f"{ctype}; charset=utf-8"
    return ctype


def _read_file(file: IO[bytes], start: int, length: int) -> Body:
    """Yield `length` bytes from `start` in CHUNK_BYTES blocks, then close the file.

    The first yield is an empty priming one consumed by `_serve_file`, so the
    generator is already inside `try` when handed out and closing it before
    the first read still closes the file.
    """
    try:
        file.seek(start)
        yield b""
        remaining = length
        while remaining > 0:
            chunk = file.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                logger.debug("file shrank while serving, %d bytes short", remaining)
                return
            remaining -= len(chunk)
            yield chunk
    finally:
        file.close()


def _honored_range(headers: Mapping[str, str], etag: str, last_modified: str) -> str | None:
    """Return the Range header unless an If-Range validator says the file changed."""
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() not in (etag, last_modified):
        return None
    return headers.get("range")


def _is_not_modified(headers: Mapping[str, str], etag: str, mtime_seconds: int) -> bool:
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:  # takes precedence (RFC 9110 section 13.1.3)
        return parse_etags(if_none_match).contains_weak(etag.strip('"'))
    since = parse_date(headers.get("if-modified-since"))
    return since is not None and mtime_seconds <= since.timestamp()


def _serve_listing(root: str | os.PathLike[str], directory: Path, url_path: str, folder_names: list[str],
                   query: Mapping[str, list[str]], ask: _Ask) -> FileResponse:
    try:
        with os.scandir(directory) as entries:
            listed = _listed_entries(root, url_path, entries)
    except PermissionError:
        return _error(403, ask)
    except OSError:
        return _error(404, ask)
    sort, order = parse_sort(query)
    crumbs = breadcrumbs(ask.site.display_name, folder_names, ask.site.via_relay)
    page = file_pages.listing(ask.site, crumbs, folder_names, sort_entries(listed, sort, order), sort, order)
    return _html(page, ask.is_head)


def _listed_entries(root: str | os.PathLike[str], url_path: str,
                    entries: Iterable[os.DirEntry[str]]) -> list[Entry]:
    """The entries of the folder at `url_path` that `serve` would serve, with sizes and times.

    Each entry goes through `_safe_path` as its link would, so a symlink leading
    out of the root (whose target's size would tell about a file we refuse to
    serve), a broken symlink and a name no URL can reach are left out, and a
    symlink inside shows its target's size.
    """
    listed = []
    for entry in entries:
        real = _safe_path(root, url_path + href(entry.name))
        if real is None:
            continue
        try:
            st = os.stat(real)
        except OSError:  # vanished, or a broken symlink
            continue
        if stat.S_ISDIR(st.st_mode):
            listed.append(Entry(entry.name, True, 0, st.st_mtime))
        elif stat.S_ISREG(st.st_mode):
            listed.append(Entry(entry.name, False, st.st_size, st.st_mtime))
    return listed


def _serve_preview(root: str | os.PathLike[str], url_path: str, folder_names: list[str], name: str,
                   ask: _Ask) -> FileResponse:
    """The page showing the file `name` of a folder; a file with nothing to show goes to its bytes."""
    if not name or "/" in name:
        return _error(404, ask)
    real = _safe_path(root, url_path + href(name))
    if real is None:
        return _error(404, ask)
    kind = kind_of(name)
    if kind not in PREVIEW_KINDS:
        return _redirect(href(name), ask)
    head = None
    try:
        with _open_regular(real) as file:
            st = os.fstat(file.fileno())
            if kind in ("text", "markdown"):
                head = file.read(MAX_PREVIEW_BYTES)
    except PermissionError:
        return _error(403, ask)
    except (OSError, ValueError):  # ValueError: not a regular file
        return _error(404, ask)
    crumbs = breadcrumbs(ask.site.display_name, folder_names, ask.site.via_relay, current=name)
    page = file_pages.preview(ask.site, crumbs, name, kind, st.st_size, st.st_mtime, _content_type(name), head)
    return _html(page, ask.is_head)


def _open_regular(path: Path) -> IO[bytes]:
    """Open a regular file for reading without following a symlink or blocking on a FIFO."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    file = open(os.open(path, flags), "rb")  # noqa: SIM115 - returned to a with
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise ValueError(f"{path} is not a regular file")
    return file


def _serve_zip(root: str | os.PathLike[str], folder: Path, folder_names: list[str], ask: _Ask) -> FileResponse:
    """The folder as a zip, streamed: no Content-Length (the size is known only at the end)."""
    name = zip_name(ask.site.display_name, folder_names)
    headers = [("content-type", "application/zip"), ("content-disposition", _attachment(name + ".zip"))]
    if ask.is_head:
        return FileResponse(200, headers, _chunks(b""))
    real_root = _real_root(os.fspath(root))
    return FileResponse(200, headers, _as_body(zip_folder(folder, name, _child_resolver(real_root))))


def _child_resolver(real_root: Path) -> Callable[[Path, str], Path | None]:
    """The rule of `_safe_path` for one name inside a real folder already inside the root."""
    def resolve(parent: Path, name: str) -> Path | None:
        if not _is_plain_name(name):
            return None
        real = Path(os.path.realpath(parent / name))
        return real if real.is_relative_to(real_root) else None

    return resolve


def _as_body(chunks: Iterator[bytes]) -> Body:
    """A generator over `chunks` that closes them when closed."""
    try:
        yield from chunks
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _attachment(filename: str) -> str:
    """Content-Disposition for a download: an ASCII fallback name, and the real one (RFC 6266)."""
    shown = display(filename)
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in shown)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(shown.encode('utf-8'), safe='')}"


def _html(page: str, is_head: bool, status: int = 200) -> FileResponse:
    data = page.encode("utf-8")
    headers = [("content-type", "text/html; charset=utf-8"), ("content-length", str(len(data))),
               ("content-security-policy", file_pages.PAGE_CSP)]
    return FileResponse(status, headers, _chunks(b"" if is_head else data))


def _redirect(location: str, ask: _Ask) -> FileResponse:
    return _error(302, ask, [("location", location)])


def _error(status: int, ask: _Ask, extra: list[tuple[str, str]] | None = None) -> FileResponse:
    """An answer with no file: a page for a browser (but for redirects), else one line of text."""
    if ask.html and status >= 400:
        message = _MESSAGES.get(status, "")
        answer = _html(file_pages.error(status, message, ask.site), ask.is_head, status)
        return FileResponse(status, answer.headers + (extra or []), answer.body)
    data = f"{status} {http.HTTPStatus(status).phrase}\n".encode()
    headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(data)))]
    return FileResponse(status, headers + (extra or []), _chunks(b"" if ask.is_head else data))


def _chunks(data: bytes) -> Body:
    """A generator over `data` (none if empty), so every body has close()."""
    if data:
        yield data
