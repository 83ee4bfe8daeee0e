"""The operators' features of a relay cluster (CLUSTER.md section 5): gunicorn with 4 workers on a real redis-server.

Each test would fail if its state stayed in each worker's memory: calls are
made on new connections, so they land on several workers (each audit entry
names its worker, which is how a test shows they did), and what one worker
saw must show on every other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import Cluster, Relay, new_key, tripcode_of, wait_until
from procs import relay_config
from prometheus_client.parser import text_string_to_metric_families
from redis_harness import RedisServer, own_redis
from werkzeug.security import generate_password_hash

from ptth_lib.relay.cluster.store import NODE_ID_CHARS
from ptth_lib.wire.envelope import WAIT_HEADER

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="needs Debian's redis-server (make debian-deps installs it)")]

WORKERS = 4
LISTEN_PATH = "/7ZSFUKGV/http_listen/{name}"
# A saved config applies within the check interval (2 s) and is published with the next
# heartbeat (2 s); this is the margin.
RELOAD_DEADLINE_SECS = 15.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


redis_server = pytest.fixture(own_redis)


def cluster_extra(redis: RedisServer, extra: str = "", listen_secs: int = 2) -> str:
    # Each worker takes the first free port of the range: 40 ports leave room for other tests.
    return (f'redis_url = "{redis.url}"\npeer_bind = "127.0.0.1:42080-42119"\nlisten_timeout_secs = {listen_secs}\n'
            + extra)


def start_cluster(cluster: Cluster, redis: RedisServer, servers: dict[str, str], extra: str = "",
                  workers: int = WORKERS, listen_secs: int = 2) -> Relay:
    relay = cluster.relay(servers, extra=cluster_extra(redis, extra, listen_secs),
                          gunicorn_args=["-w", str(workers)])
    relay.proc.wait_for_output(r"(?s)(relay node \S+ up.*){" + str(workers) + "}")
    return relay


def listen_with(relay: Relay, name: str, key: str) -> requests.Response:
    """One backend listen as a server makes it, on a new connection (so, maybe another worker)."""
    return requests.get(relay.url + LISTEN_PATH.format(name=name), headers={"X-ApiKey": key}, timeout=15)


def audit_entries(path: Path) -> list[dict[str, object]]:
    """Every line of the audit file, each parsed whole: lines written by 4 processes never mix."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def nodes_of(entries: list[dict[str, object]], event: str) -> Counter[str]:
    return Counter(str(e["node"]) for e in entries if e["event"] == event)


def scrape(relay: Relay) -> tuple[str, Samples]:
    """/metrics on a new connection: its text and every sample, keyed by (name, sorted labels)."""
    r = requests.get(relay.url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return r.text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """A metric summed over its nodes (`sum without (node)`), for these other labels."""
    return sum(value for (n, lbls), value in samples.items()
               if n == name and {k: v for k, v in lbls if k != "node"} == labels)


def per_node(samples: Samples, name: str) -> dict[str, float]:
    return {dict(lbls)["node"]: value for (n, lbls), value in samples.items() if n == name and "node" in dict(lbls)}


def make_root(tmp: Path, name: str) -> Path:
    root = tmp / f"root-{name}"
    root.mkdir()
    (root / "hello.txt").write_bytes(f"hello from {name}\n".encode())
    return root


# ---- scraper API ----------------------------------------------------------------


def test_failed_scraper_keys_are_limited_for_the_whole_cluster(redis_server: RedisServer, cluster: Cluster) -> None:
    """10 wrong keys over 4 workers get 403, the 11th 429, as in one process; a valid key needs no Redis."""
    valid = new_key("scraper-valid")
    audit = cluster.tmp / "audit.jsonl"
    relay = start_cluster(cluster, redis_server, {}, f'audit_log = "{audit}"\nenable_scraper_api = true\n'
                                                     f'[[scraper_keys]]\nname = "v"\nhash = "{tripcode_of(valid)}"\n')
    url = relay.url + "/scraper/v1/test"
    def guess(i: int) -> int:
        headers = {"X-ApiKey": new_key(f"guess{i}")} if i % 2 else {}
        return requests.get(url, headers=headers, timeout=5).status_code

    # Ten at once, each on its own connection: gunicorn hands them to several workers (one at a
    # time, a burst of connections may all go to one).
    with ThreadPoolExecutor(10) as pool:
        assert list(pool.map(guess, range(10))) == [403] * 10
    r = requests.get(url, headers={"X-ApiKey": new_key("guess")}, timeout=5)
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    r = requests.get(url, headers={"X-ApiKey": new_key("guess-again")}, timeout=5)
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert requests.get(url, headers={"X-ApiKey": valid}, timeout=5).status_code == 200
    # The attempts were spread over workers: in one worker's memory, none would have reached 10.
    rejected = nodes_of(audit_entries(audit), "scraper_key_rejected")
    assert sum(rejected.values()) == 12 and len(rejected) >= 2, rejected

    # Redis paused: a valid key is still checked in the worker alone; a wrong one cannot be counted (503).
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        assert requests.get(url, headers={"X-ApiKey": valid}, timeout=10).status_code == 200
        r = requests.get(url, headers={"X-ApiKey": new_key("while-paused")}, timeout=10)
        assert r.status_code == 503 and "Redis" in r.text, r.text
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    output = relay.proc.output()
    assert valid not in output and "Traceback" not in output


# ---- unregistered servers ------------------------------------------------------------


def test_servers_refused_by_any_worker_show_on_every_worker(redis_server: RedisServer, cluster: Cluster) -> None:
    audit = cluster.tmp / "audit.jsonl"
    relay = start_cluster(cluster, redis_server, {"alpha": new_key("alpha")}, f'audit_log = "{audit}"\n')
    # New connections until at least two workers have refused one (gunicorn may hand a burst of
    # connections to one worker); at most 40, inside the list's 50.
    strangers: dict[str, str] = {}
    refused_by: Counter[str] = Counter()
    while len(strangers) < 40 and (len(strangers) < 8 or len(refused_by) < 2):
        name = f"stranger{len(strangers)}"
        strangers[name] = new_key(name)
        assert listen_with(relay, name, strangers[name]).status_code == 403
        refused_by = nodes_of(audit_entries(audit), "backend_key_rejected")
    assert sum(refused_by.values()) == len(strangers) and len(refused_by) >= 2, refused_by

    for _ in range(8):  # each page on a new connection: whichever worker answers shows them all
        r = requests.get(relay.url + "/frontend/unregistered_servers", timeout=5)
        assert r.status_code == 200
        for name, key in strangers.items():
            assert name in r.text and tripcode_of(key) in r.text
            assert key not in r.text


# ---- audit log -------------------------------------------------------------------


def test_audit_log_entries_name_their_worker_and_the_page_shows_the_cluster(redis_server: RedisServer,
                                                                            cluster: Cluster) -> None:
    audit = cluster.tmp / "audit.jsonl"
    alpha_key = new_key("alpha")
    relay = start_cluster(cluster, redis_server, {"alpha": alpha_key}, f'audit_log = "{audit}"\n')
    alpha = cluster.server(relay, "alpha", alpha_key, make_root(cluster.tmp, "alpha"))
    wrong = [new_key(f"wrong{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # at once: on several workers (see above)
        assert list(pool.map(lambda key: listen_with(relay, "alpha", key).status_code, wrong)) == [403] * 8
    alpha.proc.kill()  # gone without a word: offline once its listens are cut and OFFLINE_AFTER_SECS pass
    wait_until(lambda: any(e["event"] == "server_offline" for e in audit_entries(audit)), "server_offline",
               relay.proc, 10)

    entries = audit_entries(audit)
    assert all(isinstance(e.get("node"), str) and re.fullmatch(r"[^/]+/\d+/[A-Z2-7]{8}", str(e["node"]))
               for e in entries), entries
    rejected = nodes_of(entries, "backend_key_rejected")
    assert sum(rejected.values()) == 8 and len(rejected) >= 2, rejected
    # PRESENCE runs on one node a second: a server's coming and going is recorded once for the cluster.
    assert [e["event"] for e in entries if e["event"].startswith("server_")] == ["server_online", "server_offline"]

    def every_entry_on_the_page(text: str) -> bool:
        return all(tripcode_of(key) in text for key in wrong) and text.count(">server_online<") == 1 \
            and text.count(">server_offline<") == 1

    wait_until(lambda: every_entry_on_the_page(requests.get(relay.url + "/frontend/audit_log", timeout=5).text),
               "the audit page to show every worker's entries", relay.proc, 5)
    for _ in range(8):  # whichever worker answers
        text = requests.get(relay.url + "/frontend/audit_log", timeout=5).text
        assert every_entry_on_the_page(text), text
        assert len(set(re.findall(r'data-label="node">([^<]+)<', text))) >= 2
        assert not any(key in text for key in [alpha_key, *wrong])
    assert not any(key in audit.read_text() for key in [alpha_key, *wrong])


# ---- metrics ---------------------------------------------------------------------


def test_one_scrape_shows_every_worker(redis_server: RedisServer, cluster: Cluster) -> None:
    alpha_key = new_key("alpha")
    relay = start_cluster(cluster, redis_server, {"alpha": alpha_key, "beta": new_key("beta")})
    cluster.server(relay, "alpha", alpha_key, make_root(cluster.tmp, "alpha"))
    before = total(scrape(relay)[1], "ptth_client_requests_total", status="200")  # waiting for it online
    downloads = 40
    for _ in range(downloads):  # a new connection each: clients on every worker
        r = requests.get(relay.url + "/frontend/servers/alpha/files/hello.txt", timeout=10)
        assert r.status_code == 200 and r.content == b"hello from alpha\n"

    def counted_by_every_worker() -> bool:
        return total(scrape(relay)[1], "ptth_client_requests_total", status="200") >= before + downloads

    wait_until(counted_by_every_worker, "the scrape to count every worker's requests", relay.proc, 5)
    for _ in range(4):  # whichever worker answers
        text, samples = scrape(relay)
        assert total(samples, "ptth_client_requests_total", status="200") >= before + downloads
        served = per_node(samples, "ptth_client_requests_total")
        assert len(per_node(samples, "ptth_listeners_waiting")) == WORKERS
        assert sum(1 for value in served.values() if value > 0) >= 2, served
        for name, value in [("ptth_cluster_nodes", WORKERS), ("ptth_cluster_nodes_scraped", WORKERS),
                            ("ptth_cluster_config_versions", 1), ("ptth_servers_online", 1),
                            ("ptth_servers_registered", 2)]:
            assert samples[(name, ())] == value, (name, samples.get((name, ())))
        assert samples[("ptth_cluster_listeners_waiting", ())] >= 1
        # One HELP and one TYPE per family, however many nodes have it.
        for kind in ("HELP", "TYPE"):
            lines = Counter(line.split()[2] for line in text.splitlines() if line.startswith(f"# {kind} "))
            assert lines and max(lines.values()) == 1, lines


def test_every_worker_s_dashboard_shows_the_cluster_s_online_servers(redis_server: RedisServer,
                                                                     cluster: Cluster) -> None:
    """One listen parked on one worker: every worker's dashboard shows its server online, and whose figures it has."""
    alpha_key = new_key("alpha")
    login = generate_password_hash("dashboard-password", method="pbkdf2:sha256:1000")
    relay = start_cluster(cluster, redis_server, {"alpha": alpha_key, "beta": new_key("beta")},
                          f'[dashboard]\nenabled = true\nbasic_auth = ["admin:{login}"]\n', listen_secs=60)
    with ThreadPoolExecutor(1) as pool:
        parked = pool.submit(requests.get, relay.url + LISTEN_PATH.format(name="alpha"), timeout=60,
                             headers={"X-ApiKey": alpha_key, WAIT_HEADER: "8"})
        wait_until(lambda: requests.get(relay.url + "/frontend/servers/", headers={"Accept": "application/json"},
                                        timeout=5).json()[0]["online"], "alpha online", relay.proc, 10)
        workers: set[str] = set()

        def page_workers() -> set[str]:
            r = requests.get(relay.url + "/frontend/dashboard", auth=("admin", "dashboard-password"), timeout=10)
            assert r.status_code == 200, r.text
            cards = {name: state for state, name in
                     re.findall(r'<article class="card server (\S+)" data-server="(\w+)">', r.text)}
            assert cards == {"alpha": "is-online", "beta": "is-offline"}, cards
            return set(re.findall(r'id="worker-scope">.*?<code>([^<]+)</code>', r.text))

        # Eight pages at once, until two workers have answered: gunicorn hands requests sent one after
        # another to the same worker.
        with ThreadPoolExecutor(8) as pages:
            deadline = time.monotonic() + 10
            while len(workers) < 2 and time.monotonic() < deadline:
                for found in pages.map(lambda _: page_workers(), range(8)):
                    workers |= found
        assert len(workers) >= 2, workers
        assert parked.result().status_code == 204


# ---- hot reload ------------------------------------------------------------------


def test_a_saved_config_reaches_every_worker(redis_server: RedisServer, cluster: Cluster) -> None:
    alpha_key, beta_key = new_key("alpha"), new_key("beta")
    relay = start_cluster(cluster, redis_server, {"alpha": alpha_key})

    def configs() -> set[str]:
        return {dict(lbls)["config"] for (n, lbls) in scrape(relay)[1] if n == "ptth_cluster_node_config_info"}

    [before] = configs()
    saving = relay.config.with_suffix(".saving")
    saving.write_text(relay_config({"alpha": alpha_key, "beta": beta_key}, cluster_extra(redis_server)))
    os.replace(saving, relay.config)
    wait_until(lambda: len(configs() - {before}) == 1 and before not in configs(),
               "every worker to run the new config", relay.proc, RELOAD_DEADLINE_SECS)
    _, samples = scrape(relay)
    assert samples[("ptth_cluster_config_versions", ())] == 1
    assert len(per_node(samples, "ptth_cluster_node_config_info")) == WORKERS
    assert relay.proc.output().count("config reloaded from") == WORKERS

    beta = cluster.server(relay, "beta", beta_key, make_root(cluster.tmp, "beta"))
    owners: set[str] = set()
    for _ in range(200):  # new connections until clients have reached every worker
        r = requests.get(relay.url + "/frontend/servers/beta/files/hello.txt", timeout=10)
        assert r.status_code == 200 and r.content == b"hello from beta\n", r.text
        owners = {i[:NODE_ID_CHARS] for i in re.findall(r"request (\S+) from \S+: GET /files/", beta.proc.output())}
        if len(owners) == WORKERS:
            break
    assert len(owners) == WORKERS, owners
    output = relay.proc.output()
    assert "has differed for" not in output and "Traceback" not in output


def _two_hosts_with_different_configs(redis_server: RedisServer, cluster: Cluster) -> tuple[Relay, Relay]:
    """Two hosts (two gunicorns on one Redis, 2 workers each) whose files differ, once the metric says 2."""
    alpha_key = new_key("alpha")
    first = start_cluster(cluster, redis_server, {"alpha": alpha_key}, workers=2)
    second = start_cluster(cluster, redis_server, {"alpha": alpha_key, "beta": new_key("beta")}, workers=2)
    wait_until(lambda: scrape(first)[1].get(("ptth_cluster_config_versions", ())) == 2, "two configs", first.proc)
    assert scrape(second)[1][("ptth_cluster_nodes", ())] == 4
    return first, second


def _make_second_like_first(first: Relay, second: Relay) -> None:
    saving = second.config.with_suffix(".saving")
    saving.write_text(first.config.read_text())
    os.replace(saving, second.config)
    wait_until(lambda: scrape(second)[1].get(("ptth_cluster_config_versions", ())) == 1, "one config again",
               second.proc, RELOAD_DEADLINE_SECS)


def test_hosts_running_different_configs_are_counted(redis_server: RedisServer, cluster: Cluster) -> None:
    """Hosts whose files differ: the metric says 2, and 1 once they agree (the warnings: the next test)."""
    first, second = _two_hosts_with_different_configs(redis_server, cluster)
    _make_second_like_first(first, second)


@pytest.mark.slow  # it waits out CONFIG_DRIFT_SECS; ConfigDrift itself is unit-tested
def test_hosts_running_different_configs_are_told(redis_server: RedisServer, cluster: Cluster) -> None:
    """Two hosts whose files differ: each node warns once, and says so once they agree again."""
    first, second = _two_hosts_with_different_configs(redis_server, cluster)
    warning = "has differed for"
    wait_until(lambda: first.proc.output().count(warning) == 2 and second.proc.output().count(warning) == 2,
               "each node to warn", first.proc, 20)
    _make_second_like_first(first, second)
    again = "the same as every other live node's again"
    wait_until(lambda: first.proc.output().count(again) == 2 and second.proc.output().count(again) == 2,
               "each node to say so", first.proc, 10)
    assert first.proc.output().count(warning) == 2 and second.proc.output().count(warning) == 2
