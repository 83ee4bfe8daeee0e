"""The file browser's pure parts (ptth_lib/server/file_listing.py) and its pages and zip, in-process."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlsplit

import pytest
from file_server_helpers import fetch, header, make_links, served_root  # noqa: F401 - served_root: the root fixture
from hypothesis import given
from hypothesis import strategies as st

from ptth_lib.server import file_listing
from ptth_lib.server.file_listing import (
    Entry,
    breadcrumbs,
    href,
    kind_of,
    landing,
    parse_sort,
    query_href,
    sort_entries,
)

# ---- kinds ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [
    ("a.png", "image"), ("A.JPG", "image"), ("x.svg", "image"), ("x.webp", "image"), ("x.tiff", "file"),
    ("v.mp4", "video"), ("v.webm", "video"), ("s.mp3", "audio"), ("s.flac", "audio"), ("s.ogg", "audio"),
    ("d.pdf", "pdf"), ("README.md", "markdown"), ("notes.markdown", "markdown"),
    ("a.txt", "text"), ("a.py", "text"), ("main.rs", "text"), ("c.json", "text"), ("x.csv", "text"),
    ("conf.toml", "text"), ("x.yaml", "text"), ("Makefile", "text"), ("LICENSE", "text"), ("x.css", "text"),
    ("a.zip", "archive"), ("a.tar.gz", "archive"), ("a.7z", "archive"), ("a.txt.gz", "archive"),
    ("noext", "file"), ("a.bin", "file"), ("a.exe", "file"),
])
def test_kind_of(name: str, kind: str) -> None:
    assert kind_of(name) == kind


# ---- sorting ----------------------------------------------------------------------

ENTRIES = [
    Entry("b.txt", False, 30, 300.0), Entry("A.txt", False, 10, 100.0), Entry("c.txt", False, 10, 200.0),
    Entry("zdir", True, 0, 50.0), Entry("Adir", True, 0, 400.0),
]


def names(entries: list[Entry]) -> list[str]:
    return [e.name for e in entries]


@pytest.mark.parametrize(("key", "order", "expected"), [
    ("name", "asc", ["Adir", "zdir", "A.txt", "b.txt", "c.txt"]),
    ("name", "desc", ["zdir", "Adir", "c.txt", "b.txt", "A.txt"]),
    ("size", "asc", ["Adir", "zdir", "A.txt", "c.txt", "b.txt"]),  # equal sizes stay A to Z
    ("size", "desc", ["Adir", "zdir", "b.txt", "A.txt", "c.txt"]),
    ("mtime", "asc", ["zdir", "Adir", "A.txt", "c.txt", "b.txt"]),
    ("mtime", "desc", ["Adir", "zdir", "b.txt", "c.txt", "A.txt"]),
])
def test_sort_entries_keeps_folders_first(key: str, order: str, expected: list[str]) -> None:
    assert names(sort_entries(ENTRIES, key, order)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("query", "expected"), [
    ("", ("name", "asc")), ("sort=size", ("size", "desc")), ("sort=mtime", ("mtime", "desc")),
    ("sort=size&order=asc", ("size", "asc")), ("sort=name&order=desc", ("name", "desc")),
    ("sort=evil&order=sideways", ("name", "asc")), ("sort=SIZE", ("name", "asc")), ("order=desc", ("name", "desc")),
])
def test_parse_sort(query: str, expected: tuple[str, str]) -> None:
    assert parse_sort(parse_qs(query, keep_blank_values=True)) == expected


# ---- links ----------------------------------------------------------------------

HOSTILE = ['<script>"x"</script>', "a b", "#frag", "what?", "100%", "ünï", "日本", "javascript:alert(1)",
           "'q'&amp;", "+plus", os.fsdecode(b"bad-\xff")]


@pytest.mark.parametrize("name", HOSTILE)
def test_href_is_one_plain_segment(name: str) -> None:
    link = href(name)
    assert re.fullmatch(r"[A-Za-z0-9_.~%-]+", link), link
    # A browser resolving it from a folder lands on exactly that name.
    resolved = urlsplit(urljoin("http://h/files/dir/", link))
    assert resolved.path.startswith("/files/dir/") and not resolved.query and not resolved.fragment
    assert os.fsdecode(unquote_to_bytes(resolved.path[len("/files/dir/"):])) == name


@given(st.text(min_size=1, max_size=20).filter(lambda n: n not in (".", "..") and "/" not in n))
def test_query_links_land_on_the_folder_with_the_name(name: str) -> None:
    """`../../files?at=FOLDER/&view=NAME`, resolved from inside FOLDER and redirected, names NAME in FOLDER."""
    folder = ["a b", "ü#?"]
    link = query_href(folder, [("view", name)])
    assert link.startswith("../../../files?at=")
    page = "http://h/frontend/servers/s/files/" + "".join(href(n) + "/" for n in folder)
    resolved = urlsplit(urljoin(page, link))
    assert resolved.path == "/frontend/servers/s/files" and not resolved.fragment
    params = parse_qs(resolved.query, keep_blank_values=True, errors="surrogateescape")
    location = landing(params)
    assert location is not None
    lands = urlsplit(urljoin("http://h/frontend/servers/s/files", location))
    assert lands.path == urlsplit(page).path
    assert parse_qs(lands.query, errors="surrogateescape")["view"] == [name]


@pytest.mark.parametrize("at", ["../", "a/../../", "./", "a//b/", "..", "a\\b/"])
def test_landing_refuses_what_is_not_a_plain_folder_path(at: str) -> None:
    assert landing({"at": [at]}) is None


def test_landing_keeps_only_folder_page_parameters() -> None:
    assert landing(parse_qs("at=x/&sort=size&order=asc&evil=1", keep_blank_values=True)) == \
        "files/x/?sort=size&order=asc"
    assert landing(parse_qs("at=x/&zip", keep_blank_values=True)) == "files/x/?zip"
    assert landing({}) == "files/"


def test_breadcrumbs_climb_back_to_the_relay_list() -> None:
    crumbs = breadcrumbs("My box", ["a", "b<"], via_relay=True)
    assert [(c.label, c.href) for c in crumbs] == [
        ("Servers", "../../../../"), ("My box", "../../"), ("a", "../"), ("b<", None)]
    # From /frontend/servers/NAME/files/a/b%3C/, "../../../../" is /frontend/servers/.
    assert urljoin("http://h/frontend/servers/n/files/a/b%3C/", "../../../../") == "http://h/frontend/servers/"
    standalone = breadcrumbs("root", [], via_relay=False, current="x.txt")
    assert [(c.label, c.href) for c in standalone] == [("root", "./"), ("x.txt", None)]


# ---- pages, in-process ----------------------------------------------------------

BROWSER = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def test_listing_links_every_entry_plainly_and_queries_from_above(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pic.png").write_bytes(b"x")
    (tmp_path / "d" / "blob.bin").write_bytes(b"y")
    _, page = fetch(tmp_path, "/files/d/")
    links = re.findall(r'href="([^"]*)"', page.decode())
    plain = [h for h in links if "?" not in h]
    assert {"pic.png", "blob.bin", "../"} <= set(plain)
    queries = [h for h in links if "?" in h]
    assert queries and all(h.startswith("../../files?at=d/&amp;") for h in queries), queries


def test_preview_and_error_pages_are_html_for_browsers_only(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Grüße <b>\n", "utf-8")
    response, page = fetch(tmp_path, "/files/?view=a.txt", **BROWSER)
    assert response.status == 200 and "Grüße &lt;b&gt;" in page.decode()
    assert "script-src" not in (header(response, "content-security-policy") or "x")
    response, page = fetch(tmp_path, "/files/nope", **BROWSER)
    assert response.status == 404 and b"<h1>" in page
    response, page = fetch(tmp_path, "/files/nope", accept="*/*")
    assert (response.status, page) == (404, b"404 Not Found\n")


def test_file_url_is_bytes_and_view_redirects_to_the_folder_page(tmp_path: Path) -> None:
    (tmp_path / "a b.md").write_bytes(b"# hi\n")
    response, body = fetch(tmp_path, "/files/a%20b.md", **BROWSER)
    assert (response.status, body) == (200, b"# hi\n")
    assert header(response, "content-type") == "text/markdown; charset=utf-8"
    response, _ = fetch(tmp_path, "/files/a%20b.md?view")
    assert (response.status, header(response, "location")) == (302, "./?view=a+b.md")
    response, body = fetch(tmp_path, "/files/a%20b.md?download")
    assert body == b"# hi\n"
    assert header(response, "content-disposition") == "attachment; filename=\"a b.md\"; filename*=UTF-8''a%20b.md"


def test_markdown_html_is_escaped_and_links_checked(tmp_path: Path) -> None:
    (tmp_path / "r.md").write_text('<script>x()</script>\n\n[a](javascript:alert(1)) ![i](data:text/html,x)\n')
    _, page = fetch(tmp_path, "/files/?view=r.md")
    text = page.decode()
    assert "<script>x()" not in text and "&lt;script&gt;x()" in text
    assert "javascript:" not in text.replace("[a](javascript:alert(1))", "")


def test_preview_of_a_big_text_shows_its_start(tmp_path: Path) -> None:
    (tmp_path / "big.log").write_bytes(b"line\n" * 400_000)  # 2 MB
    _, page = fetch(tmp_path, "/files/?view=big.log")
    assert b"Only the first 1.0 MiB" in page and len(page) < 1_200_000


def test_preview_refuses_paths_and_escapes(root: Path) -> None:
    for view in ("../secret.txt", "sub/inner.txt", "", ".."):
        assert fetch(root, "/files/?view=" + view)[0].status == 404, view


def test_zip_holds_what_is_served_and_nothing_outside(root: Path) -> None:
    (root / "links").mkdir()
    make_links(root / "links")
    response, data = fetch(root, "/files/links/?zip")
    assert header(response, "content-type") == "application/zip" and header(response, "content-length") is None
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        listed = sorted(z.namelist())
        contents = b"".join(z.read(n) for n in listed if not n.endswith("/"))
    assert listed == ["links/", "links/inside.txt", "links/link-in-dir/", "links/link-in.txt", "links/sub/"]
    assert b"TOP-SECRET" not in contents


def test_zip_does_not_loop_on_a_symlink_to_an_ancestor(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_bytes(b"f")
    (tmp_path / "d" / "again").symlink_to("..")
    _, data = fetch(tmp_path, "/files/?zip")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert sorted(z.namelist()) == ["PTTH server/", "PTTH server/d/", "PTTH server/d/f.txt"]


def test_head_of_a_zip_walks_nothing(tmp_path: Path) -> None:
    response, body = fetch(tmp_path, "/files/?zip", method="HEAD")
    assert (response.status, body) == (200, b"")


def test_links_to_pages_of_names_that_are_not_utf8_keep_their_bytes() -> None:
    """A name read with surrogateescape (b"caf\\xe9.txt") is linked by its bytes, not refused."""
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    link = file_listing.query_href([name[:3]], [("view", name)])
    assert link == "../../files?at=caf/&view=caf%E9.txt"
    assert file_listing.folder_query({"view": [name]}) == "?view=caf%E9.txt"
