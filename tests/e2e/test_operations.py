"""The relay's operations features with real processes: scraper API, metrics,
config hot reload, audit log and structured logs.

Every relay runs under gunicorn (gevent worker) and every server is a real
ptth_server, all on 127.0.0.1. Hot reload is driven by saving the relay's
real config file, as an operator would; the relay checks it every 2 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import relay_modes
import requests
from conftest import REPO, Cluster, Relay, Server, free_port, new_key, tripcode_of, wait_until
from procs import relay_samples

pytestmark = pytest.mark.process

LISTEN_PATH = "/7ZSFUKGV/http_listen/{name}"
# A saved config applies within one check interval (2 s); this is the margin.
RELOAD_DEADLINE_SECS = 10.0
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
AUDIT_EVENTS = {"server_online", "server_offline", "backend_key_rejected", "scraper_key_used",
                "scraper_key_rejected", "config_reloaded", "config_rejected"}
# Short timeouts keep parked listens and failed requests from stretching the tests.
FAST = "listen_timeout_secs = 2\nrequest_timeout_secs = 5\n"


# ---- helpers -------------------------------------------------------------


def relay_toml(servers: dict[str, str], extra: str = "", display: dict[str, str] | None = None) -> str:
    """A relay config as conftest's Cluster.relay writes it, optionally with display names."""
    text = extra + "\n"
    for name, key in servers.items():
        text += f'[[servers]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\n'
        if display and name in display:
            text += f'display_name = "{display[name]}"\n'
    return text


def save_config(relay: Relay, text: str) -> None:
    """Save the config as editors do that write a new file and rename it over the old one."""
    tmp = relay.config.with_suffix(".saving")
    tmp.write_text(relay_modes.as_deployed(relay.config, text))
    os.replace(tmp, relay.config)


def save_and_wait(relay: Relay, text: str, outcome: str = "config reloaded from") -> None:
    """Save the config and wait until the relay logs one more line with `outcome`."""
    before = relay.proc.output().count(outcome)
    save_config(relay, text)
    wait_until(lambda: relay.logged_by_all(outcome, before), f"relay to log {outcome!r}",
               relay.proc, RELOAD_DEADLINE_SECS)


def make_root(tmp: Path, name: str, size: int = 200_000) -> tuple[Path, bytes]:
    root = tmp / f"root-{name}"
    root.mkdir()
    data = os.urandom(size)
    (root / "data.bin").write_bytes(data)
    return root, data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(relay: Relay, name: str, rel: str = "data.bin") -> requests.Response:
    return requests.get(f"{relay.url}/frontend/servers/{name}/files/{rel}", timeout=15)


def assert_serves(relay: Relay, name: str, data: bytes) -> None:
    r = download(relay, name)
    assert r.status_code == 200, r.text
    assert sha(r.content) == sha(data)


def listen_with(relay: Relay, name: str, key: str) -> requests.Response:
    """One backend listen call as a server would make it, with the given key."""
    return requests.get(relay.url + LISTEN_PATH.format(name=name), headers={"X-ApiKey": key}, timeout=15)


def server_list(relay: Relay) -> list[dict[str, object]]:
    r = requests.get(relay.url + "/frontend/servers/", headers={"Accept": "application/json"}, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    entries: list[dict[str, object]] = r.json()
    return entries


def scrape(relay: Relay) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels), a cluster's nodes summed."""
    return relay_samples(relay.url)


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def audit_entries(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def audit_events(path: Path) -> list[object]:
    return [e["event"] for e in audit_entries(path)]




def run_relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "ptth_relay.py", *args], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def parse_new_key(output: str) -> tuple[str, dict[str, object]]:
    """The key and the parsed [[scraper_keys]] table from --new-scraper-key output."""
    key_lines = re.findall(r"^ {4}(\S+)$", output, re.MULTILINE)
    assert len(key_lines) == 1, output
    snippet = output[output.index("[[scraper_keys]]"):]
    tables = tomllib.loads(snippet)["scraper_keys"]
    assert len(tables) == 1, snippet
    return key_lines[0], tables[0]


# ---- a relay with the scraper API on and one server, for the module -----


@dataclass
class Ops:
    cluster: Cluster
    relay: Relay
    server: Server
    data: bytes
    valid_key: str
    expired_key: str
    future_key: str


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    """Relay with scraper keys (valid, expired, not yet valid), server alpha online, ghost offline.

    Every client here is 127.0.0.1, which the scraper API allows 10 failed
    attempts a minute: tests on this relay stay well below that.
    """
    tmp = tmp_path_factory.mktemp("ops")
    c = Cluster(tmp)
    valid, expired, future = new_key("scraper-valid"), new_key("scraper-expired"), new_key("scraper-future")
    extra = (
        FAST + "enable_scraper_api = true\n"
        f'[[scraper_keys]]\nname = "valid"\nhash = "{tripcode_of(valid)}"\n'
        "not_before = 2020-01-01T00:00:00Z\nnot_after = 2999-01-01T00:00:00Z\n"
        f'[[scraper_keys]]\nname = "old"\nhash = "{tripcode_of(expired)}"\nnot_after = 2020-01-01T00:00:00Z\n'
        f'[[scraper_keys]]\nname = "later"\nhash = "{tripcode_of(future)}"\n'
        "not_before = 2999-01-01T00:00:00Z\n"
    )
    alpha_key = new_key("alpha")
    relay = c.relay({"alpha": alpha_key, "ghost": new_key("ghost")}, extra=extra)
    root, data = make_root(tmp, "alpha", 1024 * 1024 + 3)
    server = c.server(relay, "alpha", alpha_key, root)
    yield Ops(c, relay, server, data, valid, expired, future)
    c.close()


def scraper_get(ops: Ops, path: str, key: str | None) -> requests.Response:
    headers = {"X-ApiKey": key} if key is not None else {}
    return requests.get(ops.relay.url + path, headers=headers, timeout=15)


# ---- 1. scraper API ------------------------------------------------------


def test_optional_endpoints_are_off_by_default_and_metrics_can_be_off(cluster: Cluster) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra="metrics = false")
    for path in ["/scraper/v1/test", "/scraper/v1/server_list", "/scraper/v1/server/alpha/files/x",
                 "/scraper/", "/scraper/v2/whatever"]:
        r = requests.get(relay.url + path, headers={"X-ApiKey": key}, timeout=5)
        assert r.status_code == 404, path
        assert key not in r.text
    assert requests.get(relay.url + "/metrics", timeout=5).status_code == 404
    assert requests.get(relay.url + "/frontend/audit_log", timeout=5).status_code == 404


def test_scraper_valid_key(ops: Ops) -> None:
    r = scraper_get(ops, "/scraper/v1/test", ops.valid_key)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("which", "words"), [
    ("missing", "missing"),
    ("unknown", "unknown"),
    ("expired", "expired"),
    ("future", "not valid until"),
])
def test_scraper_refusals_say_why_without_the_key(ops: Ops, which: str, words: str) -> None:
    key = {"missing": None, "unknown": new_key("scraper-unknown"), "expired": ops.expired_key,
           "future": ops.future_key}[which]
    r = scraper_get(ops, "/scraper/v1/test", key)
    assert r.status_code == 403
    assert words in r.text.lower()
    if key is not None:
        assert key not in r.text
        assert key not in str(r.headers)


def test_scraper_server_list(ops: Ops) -> None:
    r = scraper_get(ops, "/scraper/v1/server_list", ops.valid_key)
    assert r.status_code == 200
    entries = {e["name"]: e for e in r.json()}
    assert set(entries) == {"alpha", "ghost"}
    for e in entries.values():
        assert set(e) >= {"name", "display_name", "online", "last_seen", "version", "host"}
    alpha, ghost = entries["alpha"], entries["ghost"]
    assert alpha["online"] is True
    assert alpha["display_name"] == "alpha"
    assert RFC3339_Z.match(alpha["last_seen"]), alpha
    assert alpha["version"].startswith("ptth_server")
    assert alpha["host"] == socket.gethostname()
    assert ghost["online"] is False
    assert ghost["last_seen"] is None
    assert ghost["version"] is None and ghost["host"] is None


def test_scraper_relays_files_byte_for_byte(ops: Ops) -> None:
    r = scraper_get(ops, "/scraper/v1/server/alpha/files/data.bin", ops.valid_key)
    assert r.status_code == 200, r.text
    assert sha(r.content) == sha(ops.data)
    assert r.headers["Content-Length"] == str(len(ops.data))
    r = scraper_get(ops, "/scraper/v1/server/nosuchserver/files/data.bin", ops.valid_key)
    assert r.status_code == 404


def test_scraper_rate_limits_failed_attempts(cluster: Cluster) -> None:
    valid = new_key("scraper-valid")
    relay = cluster.relay({}, extra=f'enable_scraper_api = true\n[[scraper_keys]]\nname = "v"\n'
                                    f'hash = "{tripcode_of(valid)}"\n')
    url = relay.url + "/scraper/v1/test"
    for i in range(10):
        headers = {"X-ApiKey": new_key(f"guess{i}")} if i % 2 else {}
        assert requests.get(url, headers=headers, timeout=5).status_code == 403, i
    r = requests.get(url, headers={"X-ApiKey": new_key("guess")}, timeout=5)
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    # Wrong keys from the address get 429 for the rest of the window; the right key still works,
    # or one attacker behind a NAT or proxy would lock out everyone there (RELIABILITY.md).
    r = requests.get(url, headers={"X-ApiKey": new_key("guess-again")}, timeout=5)
    assert r.status_code == 429
    assert "Retry-After" in r.headers
    assert requests.get(url, headers={"X-ApiKey": valid}, timeout=5).status_code == 200


def test_new_scraper_key_cli_and_hot_reload(ops: Ops) -> None:
    result = run_relay_cli("--new-scraper-key", "ci-bot")
    assert result.returncode == 0, result.stderr
    key, table = parse_new_key(result.stdout)
    assert table["name"] == "ci-bot"
    assert table["hash"] == tripcode_of(key)
    assert set(table) == {"name", "hash", "not_after"}
    expected = datetime.now(UTC) + timedelta(days=30)
    assert abs(table["not_after"] - expected) < timedelta(minutes=2)

    result2 = run_relay_cli("--new-scraper-key", "short", "--valid-days", "2")
    assert result2.returncode == 0, result2.stderr
    key2, table2 = parse_new_key(result2.stdout)
    assert key2 != key
    assert abs(table2["not_after"] - (datetime.now(UTC) + timedelta(days=2))) < timedelta(minutes=2)

    # Paste the first snippet into the running relay's config (append and save).
    relay = ops.relay
    master, worker = relay.proc.pid, relay.worker_pids()
    before = relay.proc.output().count("config reloaded from")
    snippet = result.stdout[result.stdout.index("[[scraper_keys]]"):]
    started = time.monotonic()
    with open(relay.config, "a") as f:
        f.write("\n" + snippet)
    # Wait on the log, not by trying the key: each try before the reload would
    # count as a failed attempt.
    wait_until(lambda: relay.logged_by_all("config reloaded from", before), "reload", relay.proc, 5)
    assert time.monotonic() - started < 5
    assert scraper_get(ops, "/scraper/v1/test", key).status_code == 200
    assert relay.proc.popen.poll() is None
    assert (relay.proc.pid, relay.worker_pids()) == (master, worker)


def test_new_scraper_key_cli_refuses_bad_input() -> None:
    assert run_relay_cli("--new-scraper-key", "x", "--valid-days", "0").returncode == 2
    assert run_relay_cli("--new-scraper-key", 'quote"name').returncode == 2


# ---- 2. metrics ----------------------------------------------------------


def test_metrics_follow_requests_and_servers(ops: Ops) -> None:
    relay = ops.relay
    wait_until(lambda: metric(scrape(relay), "ptth_listeners_waiting") >= 1, "a parked listen")
    before = scrape(relay)
    assert metric(before, "ptth_servers_registered") == 2
    assert metric(before, "ptth_servers_online") == 1

    assert_serves(relay, "alpha", ops.data)
    assert download(relay, "alpha", "no-such-file").status_code == 404
    assert listen_with(relay, "alpha", new_key("wrong")).status_code == 403

    def grown() -> bool:
        now = scrape(relay)
        return (
            metric(now, "ptth_client_requests_total", status="200")
            >= metric(before, "ptth_client_requests_total", status="200") + 1
            and metric(now, "ptth_client_requests_total", status="404")
            >= metric(before, "ptth_client_requests_total", status="404") + 1
            and metric(now, "ptth_relayed_bytes_total", direction="to_client")
            >= metric(before, "ptth_relayed_bytes_total", direction="to_client") + len(ops.data)
            and metric(now, "ptth_client_request_duration_seconds_count")
            >= metric(before, "ptth_client_request_duration_seconds_count") + 2
            and metric(now, "ptth_backend_auth_rejected_total")
            >= metric(before, "ptth_backend_auth_rejected_total") + 1
            and metric(now, "ptth_requests_pending") == 0
        )

    try:
        wait_until(grown, "metrics to count the requests", deadline=5)
    except AssertionError:
        after = scrape(relay)
        changed = {k: (metric(before, k[0], **dict(k[1])), v) for k, v in after.items()
                   if k[0].startswith("ptth_") and metric(before, k[0], **dict(k[1])) != v}
        raise AssertionError(f"metrics did not follow the requests; changed: {changed}") from None
    after = scrape(relay)
    assert metric(after, "ptth_servers_online") == 1
    assert metric(after, "ptth_client_requests_in_flight") == 0


# ---- 3. hot reload -------------------------------------------------------


def test_reload_adds_a_server_without_disturbing_the_others(cluster: Cluster) -> None:
    alpha_key, beta_key = new_key("alpha"), new_key("beta")
    relay = cluster.relay({"alpha": alpha_key}, extra=FAST)
    alpha_root, alpha_data = make_root(cluster.tmp, "alpha")
    beta_root, beta_data = make_root(cluster.tmp, "beta")
    alpha = cluster.server(relay, "alpha", alpha_key, alpha_root)
    master, worker = relay.proc.pid, relay.worker_pids()
    assert_serves(relay, "alpha", alpha_data)

    before = relay.proc.output().count("config reloaded from")
    save_config(relay, relay_toml({"alpha": alpha_key, "beta": beta_key}, extra=FAST))
    # alpha keeps serving while the relay picks up the new file.
    deadline = time.monotonic() + RELOAD_DEADLINE_SECS
    while not relay.logged_by_all("config reloaded from", before):
        assert time.monotonic() < deadline, relay.proc.output()[-3000:]
        assert_serves(relay, "alpha", alpha_data)
    assert "beta" in {e["name"] for e in server_list(relay)}

    cluster.server(relay, "beta", beta_key, beta_root)
    assert_serves(relay, "beta", beta_data)
    assert_serves(relay, "alpha", alpha_data)
    assert alpha.proc.popen.poll() is None
    assert "403" not in alpha.proc.output() and "refused" not in alpha.proc.output()
    assert alpha.proc.output().count("connected to relay") == 1  # never had to reconnect
    assert (relay.proc.pid, relay.worker_pids()) == (master, worker)


def test_reload_removes_a_connected_server(cluster: Cluster) -> None:
    alpha_key, beta_key = new_key("alpha"), new_key("beta")
    # A long listen timeout: the removed server must be refused at once, not when its listen ends.
    slow = "listen_timeout_secs = 60\nrequest_timeout_secs = 5\n"
    relay = cluster.relay({"alpha": alpha_key, "beta": beta_key}, extra=slow)
    alpha_root, alpha_data = make_root(cluster.tmp, "alpha")
    beta_root, beta_data = make_root(cluster.tmp, "beta")
    alpha = cluster.server(relay, "alpha", alpha_key, alpha_root)
    beta = cluster.server(relay, "beta", beta_key, beta_root)
    master, worker = relay.proc.pid, relay.worker_pids()
    assert_serves(relay, "beta", beta_data)

    started = time.monotonic()
    reloads = relay.proc.output().count("config reloaded from")
    save_config(relay, relay_toml({"alpha": alpha_key}, extra=slow))
    try:
        code = beta.proc.popen.wait(RELOAD_DEADLINE_SECS)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"removed server still running:\n{beta.proc.output()[-3000:]}") from None
    assert time.monotonic() - started < 5
    assert code == 1
    assert "not registered" in beta.proc.output()
    # A relay of many workers: each reloads within 2 s of the change (the first refused beta).
    wait_until(lambda: relay.logged_by_all("config reloaded from", reloads), "every worker reloaded", relay.proc,
               RELOAD_DEADLINE_SECS)

    r = download(relay, "beta")
    assert r.status_code == 404
    assert "beta" not in {e["name"] for e in server_list(relay)}
    assert_serves(relay, "alpha", alpha_data)
    assert alpha.proc.popen.poll() is None
    assert (relay.proc.pid, relay.worker_pids()) == (master, worker)


def test_bad_config_is_rejected_and_the_old_one_kept(cluster: Cluster) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra=FAST)
    root, data = make_root(cluster.tmp, "alpha")
    alpha = cluster.server(relay, "alpha", key, root)
    master, worker = relay.proc.pid, relay.worker_pids()
    good = relay.config.read_text()

    save_and_wait(relay, good + "\nlisten_timeout_secs = [\n", "config reload rejected")
    assert relay.proc.output().count("config reload rejected") == len(relay.worker_pids())  # once by each
    assert_serves(relay, "alpha", data)

    # Valid TOML, invalid value: rejected the same way.
    save_and_wait(relay, "listen_timeout_secs = 0\n" + good, "config reload rejected")
    assert_serves(relay, "alpha", data)
    assert [e["name"] for e in server_list(relay)] == ["alpha"]

    # Fixed (with a new display name): applied without the server reconnecting.
    save_and_wait(relay, relay_toml({"alpha": key}, extra=FAST, display={"alpha": "Alpha Files"}))
    [entry] = server_list(relay)
    assert entry["display_name"] == "Alpha Files"
    assert entry["online"] is True
    # One line per rejected save (by each worker)
    assert relay.proc.output().count("config reload rejected") == 2 * len(relay.worker_pids())
    assert_serves(relay, "alpha", data)
    assert alpha.proc.output().count("connected to relay") == 1
    assert "refused" not in alpha.proc.output()
    assert (relay.proc.pid, relay.worker_pids()) == (master, worker)


# ---- 4. audit log --------------------------------------------------------


def test_audit_log_records_security_events_without_keys(cluster: Cluster) -> None:
    audit = cluster.tmp / "audit.jsonl"
    alpha_key, wrong_key, stranger_key = new_key("alpha"), new_key("wrong"), new_key("stranger")
    scraper_key, bad_scraper_key = new_key("scraper"), new_key("scraper-bad")
    extra = (
        f'listen_timeout_secs = 1\naudit_log = "{audit}"\nenable_scraper_api = true\n'
        f'[[scraper_keys]]\nname = "monitor"\nhash = "{tripcode_of(scraper_key)}"\n'
    )
    relay = cluster.relay({"alpha": alpha_key}, extra=extra)
    root, _ = make_root(cluster.tmp, "alpha", 10)
    alpha = cluster.server(relay, "alpha", alpha_key, root)
    wait_until(lambda: "server_online" in audit_events(audit), "server_online audited", relay.proc, 5)

    assert listen_with(relay, "alpha", wrong_key).status_code == 403
    assert listen_with(relay, "nobody", stranger_key).status_code == 403
    assert requests.get(relay.url + "/scraper/v1/test", headers={"X-ApiKey": scraper_key},
                        timeout=5).status_code == 200
    assert requests.get(relay.url + "/scraper/v1/test", headers={"X-ApiKey": bad_scraper_key},
                        timeout=5).status_code == 403

    # Stop the server, then reload twice while the relay notices it is gone.
    assert alpha.proc.stop(signal.SIGTERM) == 0
    stopped = time.monotonic()
    good = relay_toml({"alpha": alpha_key}, extra=extra, display={"alpha": "Alpha"})
    save_and_wait(relay, good)
    save_and_wait(relay, good + "\nmetrics = maybe\n", "config reload rejected")
    wait_until(lambda: "server_offline" in audit_events(audit), "server_offline in the audit log", relay.proc,
               stopped + 10 - time.monotonic())

    text = audit.read_text()
    for secret in (alpha_key, wrong_key, stranger_key, scraper_key, bad_scraper_key):
        assert secret not in text
    entries = audit_entries(audit)
    for e in entries:
        assert RFC3339_Z.match(str(e["time"])), e
        assert e["event"] in AUDIT_EVENTS, e
    assert {e["event"] for e in entries} == AUDIT_EVENTS
    rejected = {e["server"]: e for e in entries if e["event"] == "backend_key_rejected"}
    assert set(rejected) == {"alpha", "nobody"}
    assert rejected["alpha"]["tripcode"] == tripcode_of(wrong_key)
    assert rejected["nobody"]["tripcode"] == tripcode_of(stranger_key)
    assert all(e["address"] == "127.0.0.1" for e in rejected.values())
    [used] = [e for e in entries if e["event"] == "scraper_key_used"]
    assert used["key"] == "monitor" and used["address"] == "127.0.0.1"
    [online] = [e for e in entries if e["event"] == "server_online"]
    assert online["server"] == "alpha"
    [offline] = [e for e in entries if e["event"] == "server_offline"]
    assert offline["server"] == "alpha"
    assert entries.index(offline) > entries.index(online)

    r = requests.get(relay.url + "/frontend/audit_log", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    for event in AUDIT_EVENTS:
        assert event in r.text
    for secret in (alpha_key, wrong_key, stranger_key, scraper_key, bad_scraper_key):
        assert secret not in r.text


def test_audit_log_records_a_removed_server_going_offline(cluster: Cluster) -> None:
    """A reload that drops a connected server disconnects it: the audit trail must say so."""
    audit = cluster.tmp / "audit.jsonl"
    key = new_key("beta")
    extra = f'listen_timeout_secs = 1\naudit_log = "{audit}"\n'
    relay = cluster.relay({"beta": key}, extra=extra)
    root, _ = make_root(cluster.tmp, "beta", 10)
    beta = cluster.server(relay, "beta", key, root)
    wait_until(lambda: "server_online" in audit_events(audit), "server_online audited", relay.proc, 5)

    save_config(relay, relay_toml({}, extra=extra))
    assert beta.proc.popen.wait(RELOAD_DEADLINE_SECS) == 1
    try:
        wait_until(lambda: "server_offline" in audit_events(audit), "server_offline", deadline=7)
    except AssertionError:
        raise AssertionError("no server_offline event for the server the reload removed; audit log:\n"
                             + audit.read_text()) from None
    [offline] = [e for e in audit_entries(audit) if e["event"] == "server_offline"]
    assert offline["server"] == "beta"


# ---- 5. logging ----------------------------------------------------------


def test_server_json_log_lines(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    key = new_key("alpha")
    config = tmp_path / "server.toml"
    config.write_text(f'name = "alpha"\napi_key = "{key}"\nrelay_url = "http://127.0.0.1:{free_port()}/"\n'
                      f'file_server_root = "{root}"\n')
    config.chmod(0o600)
    stderr_path, stdout_path = tmp_path / "stderr", tmp_path / "stdout"
    with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "ptth_server.py", "--config", str(config),
                                 "--log-format", "json", "--log-level", "DEBUG"],
                                cwd=REPO, stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_until(lambda: "cannot reach the relay" in stderr_path.read_text(), "unreachable relay logged")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    lines = stderr_path.read_text().splitlines()
    assert lines
    entries = [json.loads(line) for line in lines]
    for e in entries:
        assert set(e) >= {"time", "level", "logger", "message"}, e
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", e["time"]), e
    levels = {e["level"] for e in entries}
    assert {"DEBUG", "WARNING"} <= levels
    assert any(e["logger"] == "ptth_server" for e in entries)
    assert key not in stderr_path.read_text()
    assert stdout_path.read_text() == ""


def test_bogus_log_format_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "ptth_server.py", "--config", str(tmp_path / "none.toml"),
                        "--log-format", "bogus"],
                       check=False, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "--log-format" in r.stderr and "invalid choice" in r.stderr


def test_relay_json_log_lines_under_gunicorn(cluster: Cluster) -> None:
    key = new_key("alpha")
    relay = cluster.relay({"alpha": key}, extra=FAST, env={"PTTH_LOG_FORMAT": "json"})
    save_and_wait(relay, relay_toml({"alpha": key}, extra=FAST, display={"alpha": "A"}))
    save_and_wait(relay, "metrics = 3\n", "config reload rejected")
    ours = [line for line in relay.proc.output().splitlines()
            if "servers registered" in line or "config reload" in line]
    workers = len(relay.worker_pids())  # each says each once
    assert len(ours) == 3 * workers, relay.proc.output()
    entries = [json.loads(line) for line in ours]
    for e in entries:
        assert set(e) >= {"time", "level", "logger", "message"}, e
        assert e["logger"].startswith("ptth_lib")
    levels = {e["message"].split(" ")[0]: e["level"] for e in entries}  # one per kind of line
    assert sorted(e["level"] for e in entries) == ["ERROR"] * workers + ["INFO"] * 2 * workers, levels
    assert [e["logger"] for e in entries if "config reloaded" in e["message"]] == ["ptth_lib.relay.config_watch"] * workers


# ---- 6. HTML server list -------------------------------------------------


def test_html_server_list_shows_version_and_host(ops: Ops) -> None:
    r = requests.get(ops.relay.url + "/frontend/servers/", headers={"Accept": "text/html"}, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert "ptth_server/" in r.text
    assert socket.gethostname() in r.text
