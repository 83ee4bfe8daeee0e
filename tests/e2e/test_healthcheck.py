"""The cron health check, run as cron runs it: a subprocess with no tty, no
stdin and only PATH and HOME, against the real relay and server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REPO, Cluster, new_key, refusing_port, tripcode_of, wait_until

pytestmark = pytest.mark.process

PREFIX = "ptth healthcheck: "


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    return subprocess.run([sys.executable, "-m", "ptth_lib.healthcheck", *args], check=False, cwd=REPO,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def problems(r: subprocess.CompletedProcess[str], code: int = 1) -> list[str]:
    """Assert the exit code, no stdout and no traceback; return the stderr lines."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert all(line.startswith(PREFIX) for line in lines), lines
    return lines


def make_root(tmp_path: Path) -> Path:
    """A folder to serve, apart from the server's config (which holds its key)."""
    root = tmp_path / "root"
    root.mkdir()
    return root




def server_entry(url: str, name: str) -> dict[str, Any]:
    listing = requests.get(url + "/frontend/servers/", headers={"Accept": "application/json"}, timeout=5).json()
    return next(s for s in listing if s["name"] == name)


def is_offline(url: str, name: str) -> bool:
    return not server_entry(url, name)["online"]


def seen_secs_ago(url: str, name: str) -> float:
    seen = datetime.strptime(server_entry(url, name)["last_seen"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (datetime.now(UTC) - seen).total_seconds()


def test_relay_up_and_server_online(cluster: Cluster, tmp_path: Path) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key})
    cluster.server(relay, "alpha", key, make_root(tmp_path))

    r = run_check("--relay", relay.url, "--server", "alpha")
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok: relay up, 1 server online\n", "")

    r = run_check("--relay", relay.url + "/", "--server", "alpha", "--quiet")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")

    r = run_check("--relay", relay.url)
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok: relay up\n", "")


def test_never_connected_and_unknown_servers(cluster: Cluster, tmp_path: Path) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key, "beta": new_key("beta")})
    cluster.server(relay, "alpha", key, make_root(tmp_path))

    [line] = problems(run_check("--relay", relay.url, "--server", "alpha", "--server", "beta"))
    assert "server 'beta' has never connected" in line

    [line] = problems(run_check("--relay", relay.url, "--server", "alpha", "--server", "nosuch"))
    assert "server 'nosuch' is not registered at the relay" in line

    lines = problems(run_check("--relay", relay.url, "--server", "beta", "--server", "nosuch", "--quiet"))
    assert len(lines) == 2


def test_stopped_server(cluster: Cluster, tmp_path: Path) -> None:
    key = new_key("alpha")
    # A short listen timeout, so the relay soon notices that the parked listen is gone.
    relay = cluster.relay({"alpha": key}, extra="listen_timeout_secs = 1")
    server = cluster.server(relay, "alpha", key, make_root(tmp_path))
    assert server.proc.stop() == 0

    # For OFFLINE_AFTER_SECS (5 s) after its last listen ended the relay still calls it
    # online: only --max-age catches it then. Timing decides which message we get.
    wait_until(lambda: seen_secs_ago(relay.url, "alpha") >= 2, "alpha's last listen to end")
    [line] = problems(run_check("--relay", relay.url, "--server", "alpha", "--max-age", "1"))
    assert "is online at the relay but stale" in line or "is offline" in line
    assert line.endswith("; max-age 1 s)")

    wait_until(lambda: is_offline(relay.url, "alpha"), "relay to see alpha offline")

    [line] = problems(run_check("--relay", relay.url, "--server", "alpha"))
    assert "server 'alpha' is offline (last seen " in line and "max-age 120 s)" in line

    [line] = problems(run_check("--relay", relay.url, "--server", "alpha", "--max-age", "2", "--quiet"))
    assert "server 'alpha' is offline" in line and "max-age 2 s)" in line


def test_relay_not_reachable(cluster: Cluster) -> None:
    relay = cluster.relay({})
    assert run_check("--relay", relay.url, "--quiet").returncode == 0
    relay.proc.stop()

    [line] = problems(run_check("--relay", relay.url, "--server", "alpha"))
    assert line.startswith(f"{PREFIX}relay {relay.url} is not reachable: ")

    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}"
        [line] = problems(run_check("--relay", url + "/", "--server", "alpha", "--quiet"))
    assert line == f"{PREFIX}relay {url} is not reachable: [Errno 111] Connection refused"


def test_not_a_relay(cluster: Cluster, tmp_path: Path) -> None:
    _, url = cluster.file_server(make_root(tmp_path))
    [line] = problems(run_check("--relay", url, "--server", "alpha"))
    assert "/frontend/relay_up_check answered HTTP 404" in line


@pytest.mark.parametrize("args", [
    ["--relay", "http://127.0.0.1:4000", "--max-age", "-5"],
    ["--relay", "http://127.0.0.1:4000", "--max-age", "0"],
    ["--relay", "http://127.0.0.1:4000", "--max-age", "soon"],
    ["--relay", "notaurl"],
    ["--relay", "ftp://relay.example.com"],
    ["--server", "alpha"],
    ["--relay", "http://127.0.0.1:4000", "--scraper-key-file", "/nonexistent"],
    ["--relay", "http://127.0.0.1:4000", "--no-such-flag"],
])
def test_usage_errors(args: list[str]) -> None:
    [line] = problems(run_check(*args), code=2)
    assert "usage:" not in line


def test_empty_scraper_key_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(" \n")
    [line] = problems(run_check("--relay", "http://127.0.0.1:4000", "--scraper-key-file", str(tmp_path / "key")),
                      code=2)
    assert "--scraper-key-file" in line


def test_scraper_api_disabled(cluster: Cluster, tmp_path: Path) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key})
    cluster.server(relay, "alpha", key, make_root(tmp_path))
    scraper_key = new_key("scraper")
    (tmp_path / "key").write_text(scraper_key + "\n")

    r = run_check("--relay", relay.url, "--server", "alpha", "--scraper-key-file", str(tmp_path / "key"))
    [line] = problems(r)
    assert "scraper API disabled" in line and "enable_scraper_api" in line
    assert scraper_key not in r.stderr


def test_scraper_api(cluster: Cluster, tmp_path: Path) -> None:
    key, scraper_key, old_key = new_key("alpha"), new_key("scraper"), new_key("old")
    extra = (f'enable_scraper_api = true\n[[scraper_keys]]\nname = "cron"\nhash = "{tripcode_of(scraper_key)}"\n'
             f'[[scraper_keys]]\nname = "old"\nhash = "{tripcode_of(old_key)}"\nnot_after = 2000-01-01T00:00:00Z\n')
    relay = cluster.relay({"alpha": key, "beta": new_key("beta")}, extra=extra)
    cluster.server(relay, "alpha", key, make_root(tmp_path))
    (tmp_path / "good").write_text(f"  {scraper_key}\n")
    (tmp_path / "bad").write_text(new_key("wrong") + "\n")
    (tmp_path / "old").write_text(old_key)

    r = run_check("--relay", relay.url, "--server", "alpha", "--scraper-key-file", str(tmp_path / "good"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok: relay up, 1 server online\n", "")

    r = run_check("--relay", relay.url, "--server", "alpha", "--server", "beta",
                  "--scraper-key-file", str(tmp_path / "good"))
    [line] = problems(r)
    assert "server 'beta' has never connected" in line

    r = run_check("--relay", relay.url, "--server", "alpha", "--scraper-key-file", str(tmp_path / "bad"))
    [line] = problems(r)
    assert "refused the key in --scraper-key-file" in line
    assert (tmp_path / "bad").read_text().strip() not in r.stderr

    r = run_check("--relay", relay.url, "--server", "alpha", "--scraper-key-file", str(tmp_path / "old"))
    [line] = problems(r)
    assert "refused the key" in line and "expired" in line and old_key not in r.stderr
