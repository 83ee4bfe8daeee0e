"""The file browser in a real browser and with real mirroring tools, through the real relay and ptth_server.

Headless Chromium (devtools.py) opens the listing, the previews, and follows
the breadcrumb back to the relay's server list; it reads the DOM (not the
HTML text) so what is checked is what a person sees, and it records every
failed load and console error. `wget -r -np` mirrors a folder through the
relay, and a folder's zip is unzipped with Python's zipfile.

With PTTH_SAVE_SCREENSHOTS=1 the screenshots also go to docs/screenshots/
(the README shows files-listing.png); otherwise only to the test's tmp dir.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import procs
import pytest
import requests
from conftest import Cluster, Relay, new_key
from devtools import Browser, decode_png

pytestmark = [pytest.mark.process]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
NAME = "holiday"
DISPLAY_NAME = "Holiday box"
WIDTH, HEIGHT = 900, 640
PHONE_WIDTH, PHONE_HEIGHT = 390, 760
TEXT = "Grüße, 日本\nline two\n"
XSS_NAME = '<img src=x onerror="document.title=1">"#?%.txt'
MARKDOWN = """# Trip notes

Some *emphasis*, a [link](photos/), and `code`.

| day | where |
| --- | --- |
| 1 | Lyon |

<script>document.title = "PWNED"</script>
<img src=x onerror="document.title='PWNED'">
"""


def png(width: int, height: int) -> bytes:
    """An RGB PNG of a sunset-like gradient (zlib only: no Pillow in the tests)."""
    rows = b"".join(
        b"\0" + b"".join(bytes((min(255, 120 + y * 135 // height), 60 + x * 120 // width, 160 - y * 100 // height))
                         for x in range(width))
        for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def make_browser_tree(root: Path) -> None:
    """A folder as someone might share it: photos, notes, a video, music, an archive, odd names."""
    for folder in ("photos", "notes", "music", "Old stuff"):
        (root / folder).mkdir()
    (root / "photos" / "sunset.png").write_bytes(png(480, 300))
    (root / "photos" / "beach.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(180_000))
    (root / "notes" / "grüße.txt").write_text(TEXT, "utf-8")
    (root / "notes" / "drafts").mkdir()
    (root / "notes" / "drafts" / "idea #1.md").write_text("# An idea\n", "utf-8")
    (root / "notes" / "map.png").write_bytes(png(64, 48))
    (root / "README.md").write_text(MARKDOWN, "utf-8")
    (root / "itinerary.pdf").write_bytes(b"%PDF-1.4\n" + os.urandom(91_000))
    sparse(root / "day-one.mp4", 73 * 1024 * 1024 + 123_456)
    sparse(root / "music" / "theme.mp3", 4_400_000)
    (root / "backup.tar.gz").write_bytes(os.urandom(2_500_000))
    (root / "budget.csv").write_text("item,eur\ntrain,89\n", "utf-8")
    (root / XSS_NAME).write_text("harmless\n")
    (root / "Old stuff" / "plan 100% #2?.txt").write_text("old\n")


@dataclass
class Site:
    relay: Relay
    root: Path

    @property
    def files(self) -> str:
        return f"{self.relay.url}/frontend/servers/{NAME}/files/"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("browse")
    root = tmp / "root"
    root.mkdir()
    make_browser_tree(root)
    c = Cluster(tmp)
    try:
        key = new_key(NAME)
        config = tmp / "relay.toml"
        config.write_text(procs.relay_config({NAME: key}).replace(
            f'name = "{NAME}"', f'name = "{NAME}"\ndisplay_name = "{DISPLAY_NAME}"'))
        relay = c.start_relay(config)
        c.server(relay, NAME, key, root, extra_config=f'display_name = "{DISPLAY_NAME}"')
        yield Site(relay, root)
    finally:
        c.close()


class Page:
    """One headless Chromium tab that records failed loads, error answers and console errors."""

    def __init__(self, tmp: Path, width: int = WIDTH, height: int = HEIGHT, mobile: bool = False) -> None:
        chromium = shutil.which("chromium")
        if chromium is None:
            pytest.skip("chromium is not installed (make debian-deps installs it)")
        tmp.mkdir(exist_ok=True)
        self.tmp = tmp
        self.browser = Browser(chromium, tmp / "profile", tmp / "chromium.log", width, height)
        self.browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                 "deviceScaleFactor": 1, "mobile": mobile})
        for domain in ("Network", "Page", "Log", "Runtime"):
            self.browser.call(f"{domain}.enable")

    def open(self, url: str, lands: str | None = None) -> None:
        """Navigate to `url` and wait until the page at `lands` (after redirects; default `url`) has loaded."""
        self.browser.call("Page.navigate", {"url": url})
        final = self.browser.wait_for("document.readyState + ' ' + location.href",
                                      lambda v: v == f"complete {lands or url}", 30)
        assert final == f"complete {lands or url}"

    def js(self, expression: str) -> Any:
        return self.browser.evaluate(expression)

    def problems(self) -> list[str]:
        """Every load that failed, every answer of 400 or more, every console error so far."""
        urls = {e["requestId"]: e["request"]["url"] for e in self.browser.events_named("Network.requestWillBeSent")}
        failed = [f"failed: {e.get('errorText')} {urls.get(e['requestId'])}"
                  for e in self.browser.events_named("Network.loadingFailed")]
        bad = [f"{r['response']['status']} {r['response']['url']}"
               for r in self.browser.events_named("Network.responseReceived") if r["response"]["status"] >= 400]
        logged = [f"log: {e['entry'].get('text')} {e['entry'].get('url', '')}"
                  for e in self.browser.events_named("Log.entryAdded") if e["entry"]["level"] == "error"]
        console = [f"console: {e.get('args')}" for e in self.browser.events_named("Runtime.consoleAPICalled")
                   if e.get("type") == "error"]
        return failed + bad + logged + console

    def screenshot(self, name: str) -> bytes:
        data = self.browser.screenshot()
        (self.tmp / name).write_bytes(data)
        if os.environ.get("PTTH_SAVE_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / name).write_bytes(data)
        return data

    def close(self) -> None:
        self.browser.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    p = Page(tmp_path)
    yield p
    p.close()


def row_link(page: Page, label: str) -> str:
    """The absolute URL the name `label` opens in the listing (its link's resolved href)."""
    return str(page.js(f"[...document.querySelectorAll('td.name a')]"
                       f".find(a => a.textContent.trim() === {json.dumps(label)}).href"))


def check_painted(png_data: bytes, width: int) -> None:
    """A real render: the size asked for, and many colours (text, icons), not a blank page."""
    w, h, rows = decode_png(png_data)
    assert w == width and h > 300
    colours = {rows[y][x:x + 3] for y in range(0, h, 7) for x in range(0, 3 * w, 21)}
    assert len(colours) > 20, "the page looks blank"


def test_listing_through_the_relay_links_back_to_the_server_list(site: Site, page: Page) -> None:
    page.open(site.files)
    crumbs = page.js("[...document.querySelectorAll('.crumbs li')].map(li => li.textContent.trim())")
    assert crumbs == ["Servers", DISPLAY_NAME]
    names = page.js("[...document.querySelectorAll('td.name a')].map(a => a.textContent.trim())")
    assert names[:4] == ["music/", "notes/", "Old stuff/", "photos/"], "folders first, A to Z whatever the case"
    assert XSS_NAME in names, "the hostile name is shown as text"
    assert page.js("document.querySelectorAll('td img, td [onerror]').length") == 0
    assert page.js("document.title") == DISPLAY_NAME
    sizes = page.js("Object.fromEntries([...document.querySelectorAll('tbody tr')].map(r => "
                    "[r.cells[0].textContent.trim(), r.cells[1].textContent.trim()]))")
    assert sizes["day-one.mp4"] == "73.1 MiB" and sizes["budget.csv"] == "18 B"
    check_painted(page.screenshot("files-listing.png"), WIDTH)
    assert page.problems() == []

    # The link back: to the relay's list, which links back to this server.
    page.open(str(page.js("document.querySelector('.crumbs a').href")))
    assert page.js("location.pathname") == "/frontend/servers/"
    assert page.js(f"[...document.links].some(a => a.textContent.includes({json.dumps(DISPLAY_NAME)}))")


def test_listing_sorts_by_each_column_without_javascript(site: Site, page: Page) -> None:
    page.open(site.files)
    size_link = page.js("[...document.querySelectorAll('th a')].find(a => a.textContent.startsWith('Size')).href")
    # The sort links are written from the server's level (so wget -np never follows them); the
    # server sends them on to the folder's own URL.
    assert size_link == f"{site.relay.url}/frontend/servers/{NAME}/files?sort=size&order=desc"
    page.open(size_link, lands=site.files + "?sort=size&order=desc")
    files = page.js("[...document.querySelectorAll('tbody tr')].filter(r => r.cells[1].title)"
                    ".map(r => r.cells[0].textContent.trim())")
    assert files[0] == "day-one.mp4" and files[-1] == XSS_NAME, files
    assert page.problems() == []


def test_dark_and_phone_listings(site: Site, tmp_path: Path) -> None:
    dark = Page(tmp_path / "dark")
    try:
        dark.browser.call("Emulation.setEmulatedMedia",
                          {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark.open(site.files)
        background = dark.js("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(21, 24, 28)", background
        check_painted(dark.screenshot("files-listing-dark.png"), WIDTH)
        assert dark.problems() == []
    finally:
        dark.close()
    phone = Page(tmp_path / "phone", PHONE_WIDTH, PHONE_HEIGHT, mobile=True)
    try:
        phone.open(site.files)
        # Nothing wider than the screen: no sideways scrolling on a phone.
        assert phone.js("document.documentElement.scrollWidth") <= PHONE_WIDTH
        check_painted(phone.screenshot("files-listing-phone.png"), PHONE_WIDTH)
        assert phone.problems() == []
    finally:
        phone.close()


def test_text_preview_shows_utf8(site: Site, page: Page) -> None:
    page.open(site.files + "notes/")
    url = row_link(page, "grüße.txt")
    assert url == site.files.removesuffix("/") + "?at=notes/&view=gr%C3%BC%C3%9Fe.txt"
    page.open(url, lands=site.files + "notes/?view=gr%C3%BC%C3%9Fe.txt")
    assert page.js("document.querySelector('.preview pre').textContent") == TEXT
    crumbs = page.js("[...document.querySelectorAll('.crumbs li')].map(li => li.textContent.trim())")
    assert crumbs == ["Servers", DISPLAY_NAME, "notes", "grüße.txt"]
    raw = page.js("[...document.querySelectorAll('.actions a')].map(a => a.href)")
    assert raw[0] == site.files + "notes/" + quote("grüße.txt")
    check_painted(page.screenshot("files-preview-text.png"), WIDTH)
    assert page.problems() == []


def test_image_preview_displays(site: Site, page: Page) -> None:
    page.open(site.files + "photos/?view=sunset.png")
    size = page.js("(() => { const i = document.querySelector('.preview img'); "
                   "return i.complete ? [i.naturalWidth, i.naturalHeight] : null })()")
    assert size == [480, 300]
    check_painted(page.screenshot("files-preview-image.png"), WIDTH)
    assert page.problems() == []


def test_markdown_is_rendered_and_its_html_is_not(site: Site, page: Page) -> None:
    page.open(site.files + "?view=README.md")
    assert page.js("document.querySelector('.markdown h1').textContent") == "Trip notes"
    assert page.js("document.querySelector('.markdown td').textContent") == "1"
    assert page.js("document.querySelectorAll('.markdown script, .markdown img').length") == 0
    assert '<script>document.title = "PWNED"</script>' in page.js("document.querySelector('.markdown').textContent")
    assert page.js("document.title") == f"README.md · {DISPLAY_NAME}"
    assert page.problems() == []


def test_xss_name_preview_title_and_links(site: Site, page: Page) -> None:
    page.open(site.files + "?view=" + quote(XSS_NAME, safe=""))
    assert page.js("document.querySelector('h1').textContent") == XSS_NAME
    assert page.js("document.querySelector('.preview pre').textContent") == "harmless\n"
    assert page.js("document.querySelectorAll('main img').length") == 0
    raw = page.js("document.querySelector('.actions a').href")
    assert requests.get(raw, timeout=10).content == b"harmless\n"
    assert page.problems() == []


def test_curl_gets_bytes_and_one_line_errors(site: Site) -> None:
    raw = subprocess.run(["curl", "-sS", "--fail", site.files + "notes/" + quote("grüße.txt")],
                         capture_output=True, timeout=30, check=True)
    assert raw.stdout == TEXT.encode()
    missing = subprocess.run(["curl", "-sS", "-w", "%{http_code}", site.files + "nope.txt"],
                             capture_output=True, timeout=30, check=True)
    assert missing.stdout == b"404 Not Found\n404"
    answer = requests.get(site.files + "nope.txt", headers={"Accept": "text/html"}, timeout=10)
    assert answer.status_code == 404 and "<h1>" in answer.text and DISPLAY_NAME in answer.text


def test_wget_mirrors_the_tree_and_nothing_else(site: Site, tmp_path: Path) -> None:
    run = subprocess.run(["wget", "-r", "-np", "-nH", "--cut-dirs=3", "-q",
                          "-P", str(tmp_path / "mirror"), site.files],
                         capture_output=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    mirrored = {str(p.relative_to(tmp_path / "mirror" / "files")): p.read_bytes()
                for p in (tmp_path / "mirror" / "files").rglob("*") if p.is_file()}
    served = {str(p.relative_to(site.root)): p.read_bytes() for p in site.root.rglob("*") if p.is_file()}
    indexes = {name for name in mirrored if name.rsplit("/", 1)[-1] == "index.html"}
    folders = {"", *(str(p.relative_to(site.root)) + "/" for p in site.root.rglob("*") if p.is_dir())}
    assert indexes == {f"{f}index.html" for f in folders}, "one listing per folder, no sorted copies"
    assert {k: hashlib.sha256(v).hexdigest() for k, v in mirrored.items() if k not in indexes} == {
        k: hashlib.sha256(v).hexdigest() for k, v in served.items()}


def test_folder_zip_unzips_to_the_same_bytes(site: Site) -> None:
    listing = requests.get(site.files + "notes/", timeout=10).text
    assert 'href="../../files?at=notes/&amp;zip"' in listing
    with requests.get(site.files + "../files?at=notes/&zip", timeout=60) as r:  # redirected to notes/?zip
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/zip"
        assert "Content-Length" not in r.headers, "streamed as it is built"
        assert 'filename="notes.zip"' in r.headers["Content-Disposition"]
        data = r.content
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        assert "notes/drafts/" in z.namelist()
        unzipped = {n.removeprefix("notes/"): z.read(n) for n in z.namelist() if not n.endswith("/")}
    folder = site.root / "notes"
    served = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    assert set(unzipped) == set(served)
    for name, path in served.items():
        assert hashlib.sha256(unzipped[name]).digest() == hashlib.sha256(path.read_bytes()).digest(), name


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def sha256_of(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


# What the relay and the server may grow by while a 2 GiB zip streams through them.
ZIP_RSS_GROWTH_KIB = 8 * 1024


@pytest.mark.slow
def test_a_2_gib_folder_zips_through_the_relay_in_bounded_memory(cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "big" / "inner").mkdir(parents=True)
    sparse(root / "big" / "disk.img", 1536 * 1024 * 1024)  # sparse: no disk, no page cache to speak of
    sparse(root / "big" / "inner" / "tail.img", 512 * 1024 * 1024 - 12345)
    for index in range(4):
        (root / "big" / f"random-{index}.bin").write_bytes(os.urandom(3 * 1024 * 1024 + index))
    key = new_key("zips")
    relay = cluster.relay({"zips": key})
    server = cluster.server(relay, "zips", key, root)
    pids = {"relay worker": relay.worker_pid(), "server": server.proc.pid}
    url = f"{relay.url}/frontend/servers/zips/files/big/?zip"
    # A small zip first, so both have served a zip (imports, buffers) before the baseline.
    requests.get(f"{relay.url}/frontend/servers/zips/files/big/inner/?zip", timeout=60).close()
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    peak = dict(before)
    zipped = tmp_path / "big.zip"
    with requests.get(url, stream=True, timeout=120) as r, zipped.open("wb") as out:
        assert r.status_code == 200
        for index, chunk in enumerate(r.iter_content(1 << 20)):
            out.write(chunk)
            if index % 64 == 0:
                peak = {name: max(peak[name], rss_kib(pid)) for name, pid in pids.items()}
    growth = {name: peak[name] - before[name] for name in pids}
    print(f"RSS growth while zipping 2 GiB, KiB: {growth}")
    assert all(g < ZIP_RSS_GROWTH_KIB for g in growth.values()), growth
    assert zipped.stat().st_size > 2 * 1024**3
    with zipfile.ZipFile(zipped) as z:
        for source in (root / "big").rglob("*"):
            if source.is_file():
                with z.open("big/" + str(source.relative_to(root / "big"))) as member, source.open("rb") as f:
                    assert sha256_of(member) == sha256_of(f), source
