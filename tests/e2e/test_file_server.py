"""Tests for ptth_lib.server.file_server and the standalone ptth_file_server.py."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from conftest import Cluster, new_key
from hypothesis import given, settings
from hypothesis import strategies as st

from ptth_lib.server.file_server import (
    CHUNK_BYTES,
    UNSATISFIABLE,
    FileResponse,
    make_wsgi_app,
    parse_range,
    serve,
)

REPO = Path(__file__).resolve().parents[2]
SECRET = b"TOP-SECRET-5f1b7c0e-must-never-be-served"
STARTUP_SECONDS = 15.0


def fetch(root: Path, uri: str, method: str = "GET", **headers: str) -> tuple[FileResponse, bytes]:
    """Serve one request and drain its body (which closes the file)."""
    response = serve(
        root, method, uri, {name.replace("_", "-"): value for name, value in headers.items()}
    )
    return response, b"".join(response.body)


def header(response: FileResponse, name: str) -> str | None:
    values = [value for key, value in response.headers if key == name]
    assert len(values) <= 1, f"duplicate header {name}"
    return values[0] if values else None


def hrefs(page: bytes) -> list[str]:
    return re.findall(r'href="([^"]*)"', page.decode("utf-8"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A served root with a secret file next to it (outside)."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    served = tmp_path / "root"
    served.mkdir()
    (served / "a.txt").write_bytes(b"alpha\n")
    (served / "sub").mkdir()
    (served / "sub" / "inner.txt").write_bytes(b"inner\n")
    return served


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
    assert hrefs(body) == ["Beta/", "alpha/", "zeta/", "%3Cx%3E%26%22.txt", "c.txt", "d.txt"]
    text = body.decode()
    assert '&lt;x&gt;&amp;&quot;.txt</a></td><td title="2 bytes">2 bytes</td>' in text
    assert 'd.txt</a></td><td title="4 bytes">4 bytes</td>' in text
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


def _make_links(folder: Path) -> None:
    """Links of every kind in `folder` (inside a served root whose parent holds secret.txt)."""
    (folder / "sub").mkdir()
    (folder / "inside.txt").write_bytes(b"inside\n")
    (folder / "link-in.txt").symlink_to("inside.txt")
    (folder / "link-in-dir").symlink_to("sub")
    (folder / "link-out.txt").symlink_to(folder.parent.parent / "secret.txt")  # outside the root
    (folder / "link-out-dir").symlink_to(folder.parent.parent)
    (folder / "broken").symlink_to("nowhere")
    (folder / "loop").symlink_to("loop")
    (folder / "sub" / "up").symlink_to("../../..")  # out of the root, through a subfolder
    (folder / "back\\slash.txt").write_bytes(b"no URL reaches this name\n")


LISTED_LINKS = ["link-in-dir/", "sub/", "inside.txt", "link-in.txt"]


def test_listing_shows_only_what_can_be_served(root: Path) -> None:
    """A symlink leading out of the root is served as 404, so it is not listed either (nor its
    target's size); nor is a broken symlink, a loop, or a name no URL can reach."""
    (root / "links").mkdir()
    _make_links(root / "links")
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


def run_as_nobody() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(run_as_nobody(), reason="root reads any file; see the subprocess variant")
def test_unreadable_file_and_directory_are_403(root: Path) -> None:
    (root / "a.txt").chmod(0)
    (root / "sub").chmod(0)
    try:
        for uri in ("/files/a.txt", "/files/sub/"):
            response, _ = fetch(root, uri)
            assert response.status == 403, uri
    finally:
        (root / "sub").chmod(0o755)


@pytest.mark.skipif(not run_as_nobody(), reason="needs root to drop to nobody")
def test_unreadable_file_and_directory_are_403_as_nobody() -> None:
    # As root every file is readable, so check in a child that drops to nobody.
    # pytest's tmp_path is private to root, hence a world-searchable directory.
    with tempfile.TemporaryDirectory() as name:
        served = Path(name)
        served.chmod(0o755)
        (served / "a.txt").write_bytes(b"alpha\n")
        (served / "a.txt").chmod(0o600)
        (served / "sub").mkdir(mode=0o700)
        script = (
            "import os, sys\n"
            "from ptth_lib.server.file_server import serve\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "for uri in ('/files/a.txt', '/files/sub/', '/files/'):\n"
            "    r = serve(sys.argv[1], 'GET', uri, {}); b''.join(r.body); print(r.status)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(served)],
            cwd=REPO,
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.split() == [b"403", b"403", b"200"]


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


def start_file_server(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(REPO / "ptth_file_server.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def read_line(proc: subprocess.Popen[bytes], seconds: float) -> str:
    """The process's first stderr line, or fail with what it printed."""
    assert proc.stderr is not None
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stderr.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        return lines.get(timeout=seconds).decode()
    except queue.Empty:
        pytest.fail(f"no startup line within {seconds} s")


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    served = tmp_path / "served"
    served.mkdir()
    proc = start_file_server("--root", str(served), "--bind", "127.0.0.1:0")
    try:
        line = read_line(proc, STARTUP_SECONDS)
        match = re.fullmatch(r"ptth_file_server: listening on (http://127\.0\.0\.1:(\d+)/)\n", line)
        assert match, f"unexpected startup line {line!r}"
        assert match.group(2) != "0"
        yield match.group(1), served, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.process
def test_process_serves_files_to_requests_and_curl(
    file_server: tuple[str, Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, served, proc = file_server
    data = os.urandom(3 * 1024 * 1024 + 17)
    (served / "big file é #?%.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    listing = requests.get(url + "files/", timeout=10)
    [href] = hrefs(listing.content)
    file_url = urljoin(url + "files/", href)

    with requests.get(file_url, stream=True, timeout=10) as response:
        assert response.status_code == 200
        received = hashlib.sha256()
        for chunk in response.iter_content(64 * 1024):
            received.update(chunk)
    assert received.hexdigest() == digest

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = tmp_path / "curl.out"
    subprocess.run([curl, "-sS", "-f", "-o", str(out), file_url], check=True, timeout=30)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    ranged = subprocess.run(
        [curl, "-sS", "-f", "-r", "100-199", "-w", "%{http_code}", "-o", str(out), file_url],
        check=True,
        timeout=30,
        capture_output=True,
    )
    assert ranged.stdout == b"206"
    assert out.read_bytes() == data[100:200]

    proc.terminate()
    assert proc.wait(timeout=10) == 0


@pytest.fixture(scope="module")
def both_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """One root served by ptth_file_server and by ptth_server through a relay: the root and the
    `/files/` URL of each. A secret file lies beside the root."""
    tmp = tmp_path_factory.mktemp("both")
    (tmp / "secret.txt").write_bytes(SECRET)
    served = tmp / "root"
    served.mkdir()
    cluster = Cluster(tmp)
    try:
        key = new_key("files")
        relay = cluster.relay({"files": key})
        cluster.server(relay, "files", key, served)
        _, direct = cluster.file_server(served)
        yield served, {"ptth_file_server": direct + "/files/",
                       "ptth_server": f"{relay.url}/frontend/servers/files/files/"}
    finally:
        cluster.close()


@pytest.mark.process
@pytest.mark.parametrize("program", ["ptth_file_server", "ptth_server"])
def test_process_lists_only_what_it_serves(both_servers: tuple[Path, dict[str, str]], program: str) -> None:
    served, urls = both_servers
    folder = served / f"links-{program}"
    folder.mkdir()
    _make_links(folder)
    base = f"{urls[program]}links-{program}/"
    listing = requests.get(base, timeout=10)
    assert listing.status_code == 200
    assert hrefs(listing.content) == ["../", *LISTED_LINKS]
    assert f"{len(SECRET)} bytes" not in listing.text
    for href in LISTED_LINKS:
        assert requests.get(base + href, timeout=10).status_code == 200, href
    for name in ("link-out.txt", "link-out-dir/", "broken", "loop"):
        assert requests.get(base + name, timeout=10).status_code == 404, name


UTF8_TEXT = "Grüße, ça va? 日本語 ✓ — naïve café\n"


@pytest.mark.process
@pytest.mark.parametrize("program", ["ptth_file_server", "ptth_server"])
@pytest.mark.parametrize(("name", "content_type"), [
    ("utf8.txt", "text/plain; charset=utf-8"),
    ("utf8.json", "application/json; charset=utf-8"),
])
def test_process_serves_text_as_utf8(both_servers: tuple[Path, dict[str, str]], program: str, name: str,
                                     content_type: str) -> None:
    """Without a charset a browser (and requests) reads text/plain as Latin-1: mojibake."""
    served, urls = both_servers
    data = UTF8_TEXT if name.endswith(".txt") else json.dumps({"greeting": UTF8_TEXT}, ensure_ascii=False)
    (served / name).write_text(data, encoding="utf-8")
    r = requests.get(urls[program] + name, timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == content_type
    assert r.encoding == "utf-8" and r.text == data


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


@pytest.mark.process
def test_process_exits_0_on_ctrl_c(file_server: tuple[str, Path, subprocess.Popen[bytes]]) -> None:
    url, _, proc = file_server
    assert requests.get(url, timeout=10).status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    assert b"Traceback" not in proc.stderr.read()


def run_failing(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, str(REPO / "ptth_file_server.py"), *args],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stderr.decode()


@pytest.mark.process
def test_process_missing_root_exits_2(tmp_path: Path) -> None:
    code, stderr = run_failing("--root", str(tmp_path / "nonexistent"), "--bind", "127.0.0.1:0")
    assert code == 2
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr
    assert "nonexistent" in stderr


@pytest.mark.process
@pytest.mark.parametrize(
    "bind", ["localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000", ":80"]
)
def test_process_bad_bind_exits_2(tmp_path: Path, bind: str) -> None:
    code, stderr = run_failing("--root", str(tmp_path), "--bind", bind)
    assert code == 2
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr


@pytest.mark.process
def test_process_port_in_use_exits_nonzero(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        code, stderr = run_failing("--root", str(tmp_path), "--bind", f"127.0.0.1:{port}")
    assert code != 0
    assert time.monotonic() - started < 30
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"ptth_file_server: cannot listen on 127.0.0.1:{port}: ")


def test_listing_shows_sizes_as_people_read_them(tmp_path: Path) -> None:
    (tmp_path / "k.bin").write_bytes(b"x" * 1536)
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(10 * 1024 * 1024)
    _, body = fetch(tmp_path, "/files/")
    text = body.decode()
    assert '<td title="1536 bytes">1.5 KiB</td>' in text
    assert '<td title="10485760 bytes">10.0 MiB</td>' in text
