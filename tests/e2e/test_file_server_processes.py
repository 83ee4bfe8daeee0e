"""ptth_file_server.py and ptth_server as processes: serving, listing, text types, signals, bad flags.

The file server's logic itself (ptth_lib.server.file_server) is tests/unit/test_file_server.py's.
"""

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
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from conftest import Cluster, new_key
from file_server_helpers import SECRET, fetch, header, hrefs, make_links, open_fds, served_root  # noqa: F401 - served_root: the root fixture

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 15.0


LISTED_LINKS = ["link-in-dir/", "sub/", "inside.txt", "link-in.txt"]


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
    make_links(folder)
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
