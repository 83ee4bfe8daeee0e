"""ptth_lib.server.file_server driven directly: pages, listings, ranges, conditional requests, safe paths.

No processes: `serve` and the WSGI app are called in-process. tests/e2e/test_file_server.py runs
ptth_file_server.py, and ptth_server through a relay, on the cases that need a process.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import msgpack
import pytest
from file_server_helpers import SECRET, fetch, header, hrefs, make_links, open_fds, served_root  # noqa: F401 - served_root: the root fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from ptth_lib.errors import ProtocolError
from ptth_lib.server import file_server
from ptth_lib.server.file_server import (
    CHUNK_BYTES,
    UNSATISFIABLE,
    make_wsgi_app,
    parse_range,
    serve,
)
from ptth_lib.wire.envelope import decode_requests

# --- pages, listing, redirects ---------------------------------------------


def test_root_page_links_to_files(root: Path) -> None:
    response, body = fetch(root, "/")
    assert response.status == 200
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert b"PTTH server" in body
    assert hrefs(body) == ["files/"]
    assert header(response, "content-length") == str(len(body))


def test_listing_puts_directories_first_sorted_with_sizes(tmp_path: Path) -> None:
    for name in ("zeta", "Beta", "alpha"):
        (tmp_path / name).mkdir()
    for name, data in (("d.txt", b"1234"), ("c.txt", b""), ('<x>&".txt', b"12")):
        (tmp_path / name).write_bytes(data)
    response, body = fetch(tmp_path, "/files/")
    assert response.status == 200
    # Names sort as people read them, whatever their case.
    assert hrefs(body) == ["alpha/", "Beta/", "zeta/", "%3Cx%3E%26%22.txt", "c.txt", "d.txt"]
    text = body.decode()
    assert '&lt;x&gt;&amp;&#34;.txt</span></a></td>\n<td title="2 bytes">2 B</td>' in text
    assert 'd.txt</span></a></td>\n<td title="4 bytes">4 B</td>' in text
    assert "<x>" not in text
    assert "../" not in hrefs(body), "no parent link at the files root"


def test_subdirectory_listing_has_parent_link(root: Path) -> None:
    response, body = fetch(root, "/files/sub/")
    assert response.status == 200
    assert hrefs(body) == ["../", "inner.txt"]


ODD_NAMES = [
    "a b.txt",
    "hash#tag.txt",
    "what?.txt",
    "100%.txt",
    "pct%41.txt",
    "plus+semi;amp&eq=.txt",
    "ünïcødé.txt",
    "日本語.txt",
    "colon:start.txt",
    "'quote'.txt",
]


@pytest.mark.parametrize("prefix", ["", "/frontend/servers/my_server"])
def test_odd_names_list_and_download(tmp_path: Path, prefix: str) -> None:
    odd_dir = tmp_path / "dir #?%é"
    odd_dir.mkdir()
    for index, name in enumerate(ODD_NAMES):
        (tmp_path / name).write_bytes(f"content {index}".encode())
        (odd_dir / name).write_bytes(f"nested {index}".encode())

    def browse(listing_uri: str) -> dict[str, bytes]:
        """Follow every link of a listing the way a browser resolves it."""
        _, page = fetch(tmp_path, listing_uri)
        base = "http://relay.example" + prefix + listing_uri
        found = {}
        for href in hrefs(page):
            target = urlsplit(urljoin(base, href))
            assert target.path.startswith(prefix + "/files/")
            uri = target.path[len(prefix) :] + (f"?{target.query}" if target.query else "")
            response, body = fetch(tmp_path, uri)
            assert response.status == 200, (href, uri)
            found[href] = body
        return found

    top = browse("/files/")
    contents = {body for href, body in top.items() if not href.endswith("/")}
    assert contents == {f"content {index}".encode() for index in range(len(ODD_NAMES))}
    [odd_href] = [href for href in top if href.endswith("/")]
    nested = browse("/files/" + odd_href)
    assert {body for href, body in nested.items() if href != "../"} == {
        f"nested {index}".encode() for index in range(len(ODD_NAMES))
    }


def test_listing_shows_undecodable_names(tmp_path: Path) -> None:
    name = os.fsdecode(b"bad-\xff.bin")
    (tmp_path / name).write_bytes(b"raw bytes")
    _, page = fetch(tmp_path, "/files/")
    assert hrefs(page) == ["bad-%FF.bin"]
    assert "bad-\ufffd.bin" in page.decode("utf-8")
    response, body = fetch(tmp_path, "/files/bad-%FF.bin")
    assert (response.status, body) == (200, b"raw bytes")


@pytest.mark.parametrize(
    ("uri", "location"),
    [
        ("/files", "files/"),
        ("/files?x=1", "files/"),
        ("/files/sub", "sub/"),
        ("/files/sub/deeper", "deeper/"),
        ("/files/a%20b%23", "a%20b%23/"),
        ("/files/x:y", "x%3Ay/"),
    ],
)
def test_directories_without_slash_redirect_relatively(root: Path, uri: str, location: str) -> None:
    (root / "sub" / "deeper").mkdir()
    (root / "a b#").mkdir()
    (root / "x:y").mkdir()
    response, _ = fetch(root, uri)
    assert response.status in (301, 302)
    assert header(response, "location") == location
    # Behind the relay the same relative Location lands on the directory listing.
    prefix = "/frontend/servers/my_server"
    target = urlsplit(urljoin("http://relay.example" + prefix + uri, location)).path
    assert target.startswith(prefix + "/files") and target.endswith("/")
    response, page = fetch(root, target[len(prefix) :])
    assert response.status == 200 and b"<table>" in page


@pytest.mark.parametrize(
    "uri",
    [
        "/x",
        "/filesx",
        "/files.txt",
        "/index.html",
        "/files/nope",
        "/files/a.txt/",
        "",
        "*",
        "http://evil/files/a.txt",
    ],
)
def test_paths_outside_files_or_missing_are_404(root: Path, uri: str) -> None:
    response, body = fetch(root, uri)
    assert response.status == 404
    assert body
    assert (header(response, "content-type") or "").startswith("text/plain")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get"])
def test_other_methods_are_405(root: Path, method: str) -> None:
    response, _ = fetch(root, "/files/a.txt", method)
    assert response.status == 405
    assert header(response, "allow") == "GET, HEAD"


@pytest.mark.parametrize("uri", ["/", "/files/", "/files/a.txt", "/files", "/files/nope"])
def test_head_has_get_headers_and_no_body(root: Path, uri: str) -> None:
    got, got_body = fetch(root, uri)
    head, head_body = fetch(root, uri, "HEAD")
    assert (head.status, head.headers) == (got.status, got.headers)
    assert head_body == b""
    assert got_body


def test_query_string_is_ignored_for_files(root: Path) -> None:
    response, body = fetch(root, "/files/a.txt?download=1&x=%2e%2e")
    assert (response.status, body) == (200, b"alpha\n")


def test_file_headers(root: Path) -> None:
    (root / "page.html").write_bytes(b"<p>hi</p>")
    (root / "blob.unknownext").write_bytes(b"??")
    response, _ = fetch(root, "/files/page.html")
    assert header(response, "content-type") == "text/html; charset=utf-8"
    assert header(response, "content-length") == "9"
    assert header(response, "accept-ranges") == "bytes"
    assert re.fullmatch(r'(W/)?"[^"]+"', header(response, "etag") or "")
    assert (header(response, "last-modified") or "").endswith(" GMT")
    response, _ = fetch(root, "/files/blob.unknownext")
    assert header(response, "content-type") == "application/octet-stream"


# --- conditional requests -------------------------------------------------


def test_conditional_requests(root: Path) -> None:
    first, _ = fetch(root, "/files/a.txt")
    etag = header(first, "etag")
    last_modified = header(first, "last-modified")
    assert etag and last_modified

    for value in (etag, "W/" + etag, f'"other", {etag}', "*"):
        response, body = fetch(root, "/files/a.txt", if_none_match=value)
        assert response.status == 304, value
        assert body == b""
        assert header(response, "etag") == etag
        assert header(response, "last-modified") == last_modified
        assert header(response, "content-length") is None

    response, _ = fetch(root, "/files/a.txt", if_modified_since=last_modified)
    assert response.status == 304
    response, body = fetch(root, "/files/a.txt", if_modified_since="Thu, 01 Jan 1970 00:00:00 GMT")
    assert (response.status, body) == (200, b"alpha\n")
    response, _ = fetch(root, "/files/a.txt", if_modified_since="not a date")
    assert response.status == 200
    # If-None-Match wins over If-Modified-Since.
    response, _ = fetch(
        root, "/files/a.txt", if_none_match='"other"', if_modified_since=last_modified
    )
    assert response.status == 200
    response, _ = fetch(root, "/files/a.txt", "HEAD", if_none_match=etag)
    assert response.status == 304


def test_etag_changes_with_content(root: Path) -> None:
    before, _ = fetch(root, "/files/a.txt")
    (root / "a.txt").write_bytes(b"a different length\n")
    after, _ = fetch(root, "/files/a.txt", if_none_match=header(before, "etag") or "")
    assert after.status == 200
    assert header(after, "etag") != header(before, "etag")


# --- Range ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=2-5", 10, (2, 5)),
        ("bytes=2-", 10, (2, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=5-99999999999999999999999", 10, (5, 9)),
        ("BYTES=1-2", 10, (1, 2)),
        (" bytes= 1-2 ", 10, (1, 2)),
        ("bytes=9-9", 10, (9, 9)),
        ("bytes=10-", 10, UNSATISFIABLE),
        ("bytes=10-20", 10, UNSATISFIABLE),
        ("bytes=-0", 10, UNSATISFIABLE),
        ("bytes=0-", 0, UNSATISFIABLE),
        ("bytes=-1", 0, UNSATISFIABLE),
        ("bytes=5-1", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("bytes=0-1,", 10, None),
        ("bytes=-", 10, None),
        ("bytes=", 10, None),
        ("bytes", 10, None),
        ("items=0-1", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=+1-2", 10, None),
        ("bytes=1_0-20", 10, None),
        ("bytes=0x1-2", 10, None),
        ("bytes=\u0661-\u0662", 10, None),
        ("bytes=1 -2", 10, None),
        ("bytes=1-2-3", 10, None),
        ("bytes=" + "9" * 5000 + "-", 10, None),
    ],
)
def test_parse_range_table(value: str | None, size: int, expected: object) -> None:
    assert parse_range(value, size) == expected


@given(
    st.one_of(st.none(), st.text(), st.from_regex(r"\A[bB]ytes=[0-9]{0,14}-[0-9]{0,14}\Z")),
    st.integers(0, 10**12),
)
def test_parse_range_never_raises_and_stays_inside(value: str | None, size: int) -> None:
    result = parse_range(value, size)
    if result is None or result == UNSATISFIABLE:
        return
    assert isinstance(result, tuple)
    start, end = result
    assert 0 <= start <= end < size


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(1, 10**12))
def test_parse_range_satisfiable_ranges_round_trip(a: int, b: int, size: int) -> None:
    start, end = sorted((a % size, b % size))
    assert parse_range(f"bytes={start}-{end}", size) == (start, end)


DATA = bytes(range(256)) * 4  # 1024 bytes, every offset distinguishable mod 256


@pytest.mark.parametrize(
    ("value", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=10-19", 10, 19),
        ("bytes=1000-", 1000, 1023),
        ("bytes=-24", 1000, 1023),
        ("bytes=-5000", 0, 1023),
        ("bytes=1023-5000", 1023, 1023),
    ],
)
def test_range_gives_206_with_correct_length(
    tmp_path: Path, value: str, start: int, end: int
) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    response, body = fetch(tmp_path, "/files/data.bin", range=value)
    assert response.status == 206
    assert header(response, "content-range") == f"bytes {start}-{end}/1024"
    assert header(response, "content-length") == str(end - start + 1)
    assert body == DATA[start : end + 1]


@pytest.mark.parametrize(
    "value", ["bytes=a-b", "bytes=5-1", "bytes=0-1,3-4", "items=0-1", "bytes=\u0661-"]
)
def test_malformed_or_multi_range_gives_whole_file(tmp_path: Path, value: str) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    response, body = fetch(tmp_path, "/files/data.bin", range=value)
    assert response.status == 200
    assert header(response, "content-range") is None
    assert header(response, "content-length") == "1024"
    assert body == DATA


@pytest.mark.parametrize(
    ("value", "size"),
    [("bytes=1024-", 1024), ("bytes=5000-6000", 1024), ("bytes=-0", 1024), ("bytes=0-", 0)],
)
def test_unsatisfiable_range_gives_416(tmp_path: Path, value: str, size: int) -> None:
    (tmp_path / "data.bin").write_bytes(DATA[:size])
    response, _ = fetch(tmp_path, "/files/data.bin", range=value)
    assert response.status == 416
    assert header(response, "content-range") == f"bytes */{size}"


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    response, body = fetch(tmp_path, "/files/empty")
    assert (response.status, body, header(response, "content-length")) == (200, b"", "0")


def test_if_range(root: Path) -> None:
    first, _ = fetch(root, "/files/a.txt")
    etag, last_modified = header(first, "etag") or "", header(first, "last-modified") or ""
    for validator in (etag, last_modified):
        response, body = fetch(root, "/files/a.txt", range="bytes=0-1", if_range=validator)
        assert (response.status, body) == (206, b"al")
    for stale in ('"stale"', "W/" + etag, "Thu, 01 Jan 1970 00:00:00 GMT"):
        response, body = fetch(root, "/files/a.txt", range="bytes=0-1", if_range=stale)
        assert (response.status, body) == (200, b"alpha\n")


def test_head_ignores_range(root: Path) -> None:
    # RFC 9110 section 14.2: Range is defined for GET only.
    response, body = fetch(root, "/files/a.txt", "HEAD", range="bytes=0-1")
    assert (response.status, body, header(response, "content-length")) == (200, b"", "6")


def test_large_range_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_BYTES * 2 + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    start, end = 1000, CHUNK_BYTES * 2 + 99
    response = serve(tmp_path, "GET", "/files/big.bin", {"range": f"bytes={start}-{end}"})
    chunks = list(response.body)
    assert all(0 < len(chunk) <= CHUNK_BYTES for chunk in chunks)
    assert b"".join(chunks) == data[start : end + 1]
    assert header(response, "content-length") == str(end - start + 1)


# --- path safety ------------------------------------------------------------


TRAVERSALS = [
    "/files/../secret.txt",
    "/files/%2e%2e/secret.txt",
    "/files/%2E%2E/secret.txt",
    "/files/..%2fsecret.txt",
    "/files/%2e%2e%2fsecret.txt",
    "/files/sub/../../secret.txt",
    "/files/sub/%2e%2e/%2e%2e/secret.txt",
    "/files/./a.txt",
    "/files/%2e/a.txt",
    "/files//etc/passwd",
    "/files/%2fetc%2fpasswd",
    "/files/a%00b",
    "/files/a.txt%00.html",
    "/files/..\\secret.txt",
    "/files/..%5csecret.txt",
    "/files/sub%5c..%5c..%5csecret.txt",
    "/files/sub//inner.txt",
    "/files/../root/a.txt",
]


@pytest.mark.parametrize("uri", TRAVERSALS)
def test_traversal_is_refused(root: Path, uri: str) -> None:
    response, body = fetch(root, uri)
    assert response.status in (403, 404), uri
    assert SECRET not in body and b"alpha" not in body


def test_absolute_path_is_refused(root: Path) -> None:
    secret = (root.parent / "secret.txt").as_posix()
    for uri in ("/files/" + secret, "/files/" + secret.replace("/", "%2f")):
        response, body = fetch(root, uri)
        assert response.status in (403, 404)
        assert SECRET not in body


def test_symlinks_leaving_the_root_are_refused(root: Path) -> None:
    (root / "out.txt").symlink_to(root.parent / "secret.txt")
    (root / "outdir").symlink_to(root.parent)
    (root / "sub" / "up").symlink_to("../..")
    for uri in (
        "/files/out.txt",
        "/files/outdir/secret.txt",
        "/files/outdir/",
        "/files/sub/up/secret.txt",
    ):
        response, body = fetch(root, uri)
        assert response.status in (403, 404), uri
        assert SECRET not in body


def test_symlinks_inside_the_root_are_served(root: Path) -> None:
    (root / "link.txt").symlink_to("a.txt")
    (root / "sub" / "back").symlink_to("..")
    (root / "subdir-link").symlink_to(root / "sub")
    response, body = fetch(root, "/files/link.txt")
    assert (response.status, body) == (200, b"alpha\n")
    response, body = fetch(root, "/files/sub/back/a.txt")
    assert (response.status, body) == (200, b"alpha\n")
    response, _ = fetch(root, "/files/subdir-link")
    assert header(response, "location") == "subdir-link/"
    response, body = fetch(root, "/files/subdir-link/")
    assert response.status == 200 and "inner.txt" in hrefs(body)


LISTED_LINKS = ["link-in-dir/", "sub/", "inside.txt", "link-in.txt"]


def test_listing_shows_only_what_can_be_served(root: Path) -> None:
    """A symlink leading out of the root is served as 404, so it is not listed either (nor its
    target's size); nor is a broken symlink, a loop, or a name no URL can reach."""
    (root / "links").mkdir()
    make_links(root / "links")
    response, body = fetch(root, "/files/links/")
    assert response.status == 200
    assert hrefs(body) == ["../", *LISTED_LINKS]
    assert f"{len(SECRET)} bytes" not in body.decode()
    for href in LISTED_LINKS:
        assert fetch(root, "/files/links/" + href)[0].status == 200, href
    assert hrefs(fetch(root, "/files/links/sub/")[1]) == ["../"]


def test_symlinked_root_works(tmp_path: Path, root: Path) -> None:
    (tmp_path / "alias").symlink_to(root)
    response, body = fetch(tmp_path / "alias", "/files/a.txt")
    assert (response.status, body) == (200, b"alpha\n")


def test_fifo_and_socket_are_never_opened(root: Path) -> None:
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        for uri in ("/files/fifo", "/files/sock"):
            response, _ = fetch(root, uri)  # a blocking open() of the FIFO would hang here
            assert response.status in (403, 404)
        _, page = fetch(root, "/files/")
        assert "fifo" not in hrefs(page)


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    (base / "secret.txt").write_bytes(SECRET)
    served = base / "root"
    (served / "sub").mkdir(parents=True)
    (served / "a.txt").write_bytes(b"alpha\n")
    (served / "out").symlink_to(base)
    (served / "out.txt").symlink_to(base / "secret.txt")
    return served


URI_PIECES = [
    "/",
    "files",
    "..",
    ".",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "%00",
    "%",
    "?",
    "#",
    "secret.txt",
    "root",
    "out",
    "out.txt",
    "a.txt",
    "sub",
    "%252e",
    "\x00",
    "é",
    "%ff",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(), st.lists(st.sampled_from(URI_PIECES), max_size=12).map("".join)),
    st.sampled_from(["GET", "HEAD"]),
    st.dictionaries(
        st.sampled_from(["range", "if-range", "if-none-match", "if-modified-since"]), st.text()
    ),
)
def test_arbitrary_uris_never_raise_or_escape(
    hostile_root: Path, uri: str, method: str, headers: dict[str, str]
) -> None:
    response = serve(hostile_root, method, uri, headers)
    body = b"".join(response.body)
    assert SECRET not in body
    assert response.status in (200, 206, 302, 304, 403, 404, 416)
    if (
        method == "GET"
        and response.status in (200, 206)
        and header(response, "content-length") is not None
    ):
        assert len(body) == int(header(response, "content-length") or "")


# --- closing ------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_closing_the_body_closes_the_file_at_once(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"x" * (CHUNK_BYTES * 3))
    before = open_fds()
    response = serve(tmp_path, "GET", "/files/big.bin", {})
    assert open_fds() == before + 1, "the file is opened before the response is returned"
    response.body.close()  # closed before the first chunk
    assert open_fds() == before

    response = serve(tmp_path, "GET", "/files/big.bin", {"range": "bytes=10-"})
    assert len(next(response.body)) == CHUNK_BYTES
    response.body.close()  # closed mid-stream, as a WSGI server does when the client leaves
    assert open_fds() == before

    for method, headers in (("HEAD", {}), ("GET", {"range": "bytes=999999999-"})):
        response = serve(tmp_path, method, "/files/big.bin", headers)
        assert open_fds() == before, (method, headers)
        response.body.close()


# --- WSGI adapter ---------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"RAW_URI": "/files/%C3%A9%20%23.txt?x=1"},
        {"REQUEST_URI": "/files/%C3%A9%20%23.txt"},
        # No raw target: PATH_INFO holds the decoded bytes as latin-1 (PEP 3333).
        {"PATH_INFO": "/files/\u00c3\u00a9 #.txt", "QUERY_STRING": "x=1"},
        # gevent's raw path: non-ASCII bytes sent unencoded, as latin-1.
        {"RAW_URI": "/files/\u00c3\u00a9 #.txt"},
    ],
)
def test_wsgi_app_passes_the_raw_path(tmp_path: Path, extra: dict[str, str]) -> None:
    (tmp_path / "é #.txt").write_bytes(b"accent")
    started: list[tuple[str, list[tuple[str, str]]]] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/unused", "HTTP_RANGE": "bytes=1-", **extra}

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        started.append((status, headers))
        return lambda data: None

    body = make_wsgi_app(tmp_path)(environ, start_response)
    try:
        assert b"".join(body) == b"ccent"
    finally:
        body.close()  # type: ignore[attr-defined]
    assert started[0][0] == "206 Partial Content"


# --- the real process ---------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [
    ("a.txt", True), ("a.json", True), ("a.js", True), ("a.css", True), ("a.html", True), ("a.csv", True),
    ("a.xml", True), ("a.svg", True), ("a.webmanifest", True), ("a.geojson", True),
    ("a.png", False), ("a.bin", False), ("a.txt.gz", False), ("a.pdf", False), ("noext", False),
])
def test_text_types_get_a_charset(root: Path, name: str, text: bool) -> None:
    (root / name).write_bytes(b"x")
    ctype = header(fetch(root, "/files/" + name)[0], "content-type") or ""
    assert ctype.endswith("; charset=utf-8") == text, ctype
    assert ctype.count("charset") == (1 if text else 0), ctype


def test_listing_shows_sizes_as_people_read_them(tmp_path: Path) -> None:
    (tmp_path / "k.bin").write_bytes(b"x" * 1536)
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(10 * 1024 * 1024)
    _, body = fetch(tmp_path, "/files/")
    text = body.decode()
    assert '<td title="1536 bytes">1.5 KiB</td>' in text
    assert '<td title="10485760 bytes">10.0 MiB</td>' in text


# ---- whatever a relay sends, the file server stays inside its root (from tests/e2e/test_hostile.py) ----


def _item(rid: str, uri: str, method: str = "GET", headers: dict[str, bytes] | None = None) -> dict[str, object]:
    """One request of a listen answer, built by hand."""
    return {"id": rid, "req": {"method": method, "uri": uri, "headers": headers or {}}}


_URI_PIECES = ["..", "%2e%2e", "%2E%2e", ".", "%2f", "%5c", "%00", "", "secret.txt", "root", "files",
               "ok.txt", "link-out", "%252e", "\u2025", "/"]


@pytest.fixture(scope="module")
def pure_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pure")
    (tmp / "secret.txt").write_bytes(SECRET)
    root = tmp / "root"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"fine\n")
    (root / "link-out").symlink_to(tmp / "secret.txt")
    return root


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(_item, st.text(max_size=5),
                          st.lists(st.sampled_from(_URI_PIECES), max_size=10).map(lambda p: "/" + "/".join(p)),
                          st.sampled_from(["GET", "HEAD", "get", ""]),
                          st.dictionaries(st.sampled_from(["range", "if-range", "if-none-match"]),
                                          st.binary(max_size=20))),
                max_size=5))
def test_any_decodable_listen_answer_is_served_inside_the_root(pure_root: Path, items: list[object]) -> None:
    """The server's P3 and P4 without sockets: decode a listen answer, serve each request."""
    try:
        batch = decode_requests(msgpack.packb(items))
    except ProtocolError:
        return
    for req in batch:
        headers = {k: v.decode("latin-1") for k, v in req.headers.items()}
        answer = file_server.serve(pure_root, req.method, req.uri, headers)
        body = b"".join(answer.body)
        assert SECRET not in body
        assert answer.status in (200, 206, 302, 304, 403, 404, 405, 416)
