"""Browsing files through the tunnel with real clients: requests and curl.

One relay (gunicorn, gevent worker) and one ptth_server for the module.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urljoin

import pytest
import requests
from conftest import Tunnel
from procs import relay_samples

pytestmark = pytest.mark.process

CURL = shutil.which("curl")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_url(t: Tunnel, rel: str) -> str:
    return f"{t.base}/files/" + quote(rel)


@pytest.mark.parametrize("rel", ["hello.txt", "empty.bin", "random-3m.bin", "sub dir/nested #1?.txt",
                                 "sub dir/100% sure.txt", "\u00fcn\u00efc\u00f6d\u00e9/\u65e5\u672c.txt"])
def test_download_equals_file(tunnel: Tunnel, rel: str) -> None:
    r = requests.get(file_url(tunnel, rel), timeout=30)
    assert r.status_code == 200
    assert sha(r.content) == sha(tunnel.files[rel])
    assert r.headers["Content-Length"] == str(len(tunnel.files[rel]))
    assert r.headers["Accept-Ranges"] == "bytes"


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_download_and_range(tunnel: Tunnel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.bin"
    url = file_url(tunnel, "random-3m.bin")
    subprocess.run([CURL, "-sSf", "-o", str(out), url], check=True, timeout=60)
    assert sha(out.read_bytes()) == sha(tunnel.files["random-3m.bin"])
    part = subprocess.run([CURL, "-sSf", "-r", "1000-1999", url], check=True, timeout=60,
                          capture_output=True).stdout
    assert part == tunnel.files["random-3m.bin"][1000:2000]


def test_range_head_and_conditional(tunnel: Tunnel) -> None:
    url = file_url(tunnel, "random-3m.bin")
    data = tunnel.files["random-3m.bin"]
    size = len(data)

    r = requests.get(url, headers={"Range": "bytes=100-299"}, timeout=30)
    assert r.status_code == 206
    assert r.content == data[100:300]
    assert r.headers["Content-Range"] == f"bytes 100-299/{size}"
    assert r.headers["Content-Length"] == "200"

    r = requests.get(url, headers={"Range": "bytes=-10"}, timeout=30)
    assert (r.status_code, r.content) == (206, data[-10:])

    r = requests.get(url, headers={"Range": f"bytes={size}-"}, timeout=30)
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{size}"

    r = requests.head(url, timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(size)  # HEAD keeps the real length
    assert r.content == b""
    etag, modified = r.headers["ETag"], r.headers["Last-Modified"]

    assert requests.get(url, headers={"If-None-Match": etag}, timeout=30).status_code == 304
    assert requests.get(url, headers={"If-Modified-Since": modified}, timeout=30).status_code == 304
    assert requests.get(url, headers={"If-None-Match": '"other"'}, timeout=30).status_code == 200


def test_listing_links_work_under_the_relay_prefix(tunnel: Tunnel) -> None:
    """Follow every link of the listings, as a browser would, and get every file."""
    found: dict[str, bytes] = {}
    pending = [f"{tunnel.base}/files/"]
    seen = set()
    while pending:
        url = pending.pop()
        if url in seen:
            continue
        seen.add(url)
        r = requests.get(url, timeout=30)
        assert r.status_code == 200, url
        if url.endswith("/"):
            import re

            for href in re.findall(r'<a [^>]*href="([^"]+)"', r.text):  # links, not icons
                if href.startswith("../"):
                    continue
                pending.append(urljoin(url, href))
        else:
            found[url] = r.content
    assert sorted(sha(v) for v in found.values()) == sorted(sha(v) for v in tunnel.files.values())


def test_relative_redirects(tunnel: Tunnel) -> None:
    r = requests.get(f"{tunnel.base}/files/sub%20dir", allow_redirects=False, timeout=10)
    assert r.status_code in (301, 302)
    assert r.headers["Location"] == "sub%20dir/"
    r = requests.get(f"{tunnel.base}/files/sub%20dir", timeout=10)
    assert r.url == f"{tunnel.base}/files/sub%20dir/"
    assert "nested" in r.text
    r = requests.get(f"{tunnel.relay.url}/frontend/servers/{tunnel.server.name}", timeout=10)
    assert r.status_code == 200 and r.url.endswith(f"/servers/{tunnel.server.name}/")
    assert 'href="files/"' in r.text


def test_older_servers_alias(tunnel: Tunnel) -> None:
    r = requests.get(f"{tunnel.relay.url}/servers/{tunnel.server.name}/files/hello.txt", timeout=10)
    assert r.content == tunnel.files["hello.txt"]


@pytest.mark.parametrize("path", [
    "/files/../../../etc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd", "/files/..%2f..%2fetc%2fpasswd",
    "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/files//etc/passwd", "/files/hello.txt%00.png",
    "/files/..%5c..%5cetc%5cpasswd",
])
def test_traversal_through_the_relay_is_refused(tunnel: Tunnel, path: str) -> None:
    # Sent raw, so that neither requests nor the relay normalise the path first.
    url = tunnel.base + path
    if CURL:
        out = subprocess.run([CURL, "-s", "--path-as-is", "-o", "-", "-w", "\n%{http_code}", url],
                             check=False, capture_output=True, timeout=30).stdout
        body, _, status = out.rpartition(b"\n")
        assert status in (b"400", b"403", b"404"), (path, status)  # 400: the relay refuses dot segments
        assert b"root:" not in body
    s = requests.Session()
    req = requests.Request("GET", url).prepare()
    req.url = url
    r = s.send(req, timeout=30)
    assert r.status_code in (400, 403, 404), path
    assert "root:" not in r.text


def test_unknown_paths_and_servers(tunnel: Tunnel) -> None:
    assert requests.get(f"{tunnel.base}/files/no-such-file", timeout=10).status_code == 404
    assert requests.get(f"{tunnel.base}/elsewhere", timeout=10).status_code == 404
    r = requests.get(f"{tunnel.relay.url}/frontend/servers/nobody/files/", timeout=10)
    assert r.status_code == 404
    assert "nobody" in r.text


def test_query_string_and_escapes_reach_the_server(tunnel: Tunnel) -> None:
    url = f"{tunnel.base}/files/sub%20dir/nested%20%231%3F.txt?download=1&x=%2F"
    r = requests.get(url, timeout=10)
    assert r.content == tunnel.files["sub dir/nested #1?.txt"]


def test_relay_pages(tunnel: Tunnel) -> None:
    r = requests.get(f"{tunnel.relay.url}/frontend/relay_up_check", timeout=10)
    assert (r.status_code, r.text.strip()) == (200, "Relay is up")
    r = requests.get(f"{tunnel.relay.url}/frontend/servers/", timeout=10)
    assert tunnel.server.name in r.text and "online" in r.text
    r = requests.get(f"{tunnel.relay.url}/", timeout=10)
    assert "frontend/servers/" in r.text


def test_request_bodies_are_refused_clearly(tunnel: Tunnel) -> None:
    r = requests.post(f"{tunnel.base}/files/hello.txt", data=b"x" * 100, timeout=10)
    assert r.status_code == 501
    r = requests.post(f"{tunnel.base}/files/hello.txt", timeout=10)
    assert r.status_code == 405  # no body: relayed, and the file server allows GET and HEAD only


def test_hop_by_hop_headers_are_not_forwarded(tunnel: Tunnel) -> None:
    r = requests.get(file_url(tunnel, "random-3m.bin"), timeout=30,
                     headers={"Connection": "keep-alive, X-Secret", "Upgrade": "h2c", "TE": "trailers"})
    assert r.status_code == 200
    assert "Upgrade" not in r.headers
    assert r.headers.get("Content-Length") == str(len(tunnel.files["random-3m.bin"]))


def test_concurrent_downloads(tunnel: Tunnel) -> None:
    names = ["random-3m.bin", "hello.txt", "sub dir/100% sure.txt"] * 8

    def fetch(rel: str) -> tuple[str, str]:
        with requests.get(file_url(tunnel, rel), timeout=60) as r:
            r.raise_for_status()
            return rel, sha(r.content)

    with ThreadPoolExecutor(12) as pool:
        for rel, digest in pool.map(fetch, names):
            assert digest == sha(tunnel.files[rel])


def test_small_answers_ride_on_listens_and_large_ones_stream_in_posts(tunnel: Tunnel) -> None:
    """PROTOCOL.md "Small answers ride on the next listen": one exchange with the relay per small file."""
    def answers() -> tuple[float, float]:
        """Answers that rode on listens, and POSTed ones (a cluster's: of every node)."""
        ways = [(dict(labels)["way"], value) for (name, labels), value in relay_samples(tunnel.relay.url).items()
                if name == "ptth_server_answers_total"]
        return sum(v for way, v in ways if way == "listen"), sum(v for way, v in ways if way == "post")

    carried, posted = answers()
    for _ in range(5):
        r = requests.get(file_url(tunnel, "hello.txt"), timeout=30)
        assert r.content == tunnel.files["hello.txt"]
    assert requests.head(file_url(tunnel, "hello.txt"), timeout=30).headers["Content-Length"] == str(
        len(tunnel.files["hello.txt"]))
    assert sha(requests.get(file_url(tunnel, "random-3m.bin"), timeout=30).content) == sha(
        tunnel.files["random-3m.bin"])
    now_carried, now_posted = answers()
    if tunnel.relay.cluster:  # only the answers whose owner the listen reached ride on it
        assert now_carried - carried + now_posted - posted == 7 and now_posted - posted >= 1
    else:
        assert (now_carried - carried, now_posted - posted) == (6, 1)


@pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")
def test_wget_mirrors_the_whole_tree(tunnel: Tunnel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """wget follows the listings' relative links like a crawler and gets every file intact."""
    out = tmp_path / "mirror"
    prefix_depth = 4  # frontend/servers/NAME/files
    subprocess.run(["wget", "-q", "-r", "-np", "-nH", f"--cut-dirs={prefix_depth}", "-e", "robots=off",
                    "--restrict-file-names=nocontrol", "-R", "index.html*", "-P", str(out),
                    f"{tunnel.base}/files/"], check=True, timeout=120)
    got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    got = {k: v for k, v in got.items() if not k.endswith("index.html")}
    assert got == tunnel.files
