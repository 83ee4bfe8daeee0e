"""Load with real processes: limits that give clear answers, many clients, many servers.

- Limits: more than 256 requests queued for one server (503 with Retry-After),
  oversized client headers, more than 32 parked listens for one name (429).
- 200 concurrent clients downloading from 10 ptth_server processes.
- Marked slow (`-m slow`): 1,000 idle servers long-polling one relay, and a
  soak of mixed traffic ($PTTH_SOAK_SECS, default 600 s) watching RSS.

Every process runs on 127.0.0.1; every loop is bounded in count and time.
This machine may be shared with benchmarks, so time limits are generous.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import requests
from conftest import Cluster, Proc, Relay, new_key, wait_for_online, wait_until
from procs import relay_samples

pytestmark = pytest.mark.process

LISTEN = "/7ZSFUKGV/http_listen/"
RESPOND = "/7ZSFUKGV/http_response/"
HEAD_HEADER = "X-PTTH-2LJYXWC4"
MIB = 1024 * 1024
AT_ONCE_SECS = 2.0
# rendezvous.MAX_QUEUED_PER_SERVER and MAX_LISTENERS_PER_SERVER, as PROTOCOL.md states them.
MAX_QUEUED = 256
MAX_LISTENS = 32
MAX_LISTEN_ANSWER_BYTES = 4 * MIB


# ---- helpers ---------------------------------------------------------------


def metrics(relay: Relay) -> dict[str, float]:
    """Every sample of /metrics, keyed by its text (name plus labels), a cluster's nodes summed."""
    return {name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""): value
            for (name, labels), value in relay_samples(relay.url).items()}


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def listen(relay: Relay, name: str, key: str, timeout: float = 30) -> requests.Response:
    return requests.get(relay.url + LISTEN + name, headers={"X-ApiKey": key}, timeout=timeout)


def respond(relay: Relay, rid: str, key: str, body: bytes) -> requests.Response:
    head = msgpack.packb({"status_code": 200, "headers": {"content-length": str(len(body)).encode()}})
    return requests.post(relay.url + RESPOND + rid, data=body, timeout=30,
                         headers={"X-ApiKey": key, HEAD_HEADER: base64.b64encode(head).decode()})


def park_listen(relay: Relay, name: str, key: str) -> socket.socket:
    """A listen parked on a raw socket, left unanswered until the socket closes."""
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    sock.sendall(f"GET {LISTEN}{name} HTTP/1.1\r\nHost: x\r\nX-ApiKey: {key}\r\n\r\n".encode())
    return sock


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- 1. limits with clear answers ----------------------------------------------


def test_more_than_256_queued_requests_get_503_with_retry_after(cluster: Cluster) -> None:
    """A server online but not picking up: 256 requests wait, the rest get 503 at once."""
    key = new_key("busy")
    # One client address sends them all: requests_per_address must not make them wait their turn.
    relay = cluster.relay({"busy": key}, extra="listen_timeout_secs = 1\nrequest_timeout_secs = 10\n"
                                              "requests_per_address = 10000")
    assert listen(relay, "busy", key).status_code == 204
    total = MAX_QUEUED + 44
    present = threading.Event()

    def stay_present() -> None:
        """A server at capacity: it listens asking for nothing, so the relay keeps it online."""
        while not present.wait(0.5):
            requests.get(relay.url + "/7ZSFUKGV/http_listen/busy", timeout=10,
                         headers={"X-ApiKey": key, "X-PTTH-Max-Requests": "0"})

    def get(i: int) -> requests.Response:
        return requests.get(f"{relay.url}/frontend/servers/busy/q/{i}", timeout=30)

    threading.Thread(target=stay_present, daemon=True).start()
    with ThreadPoolExecutor(total) as pool:
        futures = [pool.submit(get, i) for i in range(total)]
        wait_until(lambda: sum(f.done() for f in futures) >= total - MAX_QUEUED, "the overflow answered",
                   relay.proc, 8)
        refused_secs = time.monotonic()
        assert metrics(relay)["ptth_requests_queued"] == MAX_QUEUED
        # Now the server picks everything up in one listen and answers.
        present.set()
        r = listen(relay, "busy", key)
        assert r.status_code == 200
        assert len(r.content) <= MAX_LISTEN_ANSWER_BYTES
        items = msgpack.unpackb(r.content, raw=False)
        assert len(items) == MAX_QUEUED
        with ThreadPoolExecutor(32) as answerers:
            answers = list(answerers.map(lambda item: respond(relay, item["id"], key,
                                                              item["req"]["uri"].encode()), items))
        assert {a.status_code for a in answers} == {200}
        results = [f.result() for f in futures]
    statuses = Counter(r.status_code for r in results)
    assert statuses == {200: MAX_QUEUED, 503: total - MAX_QUEUED}, statuses
    for i, r in enumerate(results):
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) > 0
            assert "too many requests" in r.text
        else:
            assert r.content == f"/q/{i}".encode()
    assert time.monotonic() - refused_secs < 30
    wait_until(lambda: metrics(relay)["ptth_requests_pending"] == 0, "no requests pending", relay.proc, 10)


@pytest.mark.direct_relay  # nginx in front answers or changes this itself
def test_a_client_header_over_64_kib_gets_431(cluster: Cluster) -> None:
    key = new_key("h")
    relay = cluster.relay({"h": key}, extra="listen_timeout_secs = 1\nrequest_timeout_secs = 5")
    started = time.monotonic()
    r = requests.get(f"{relay.url}/frontend/servers/h/files/x", headers={"X-Big": "a" * 70_000}, timeout=10)
    assert r.status_code == 431, (r.status_code, r.text[:300])  # gunicorn's answer, before the relay
    assert "Request Header Fields Too Large" in r.text
    assert time.monotonic() - started < AT_ONCE_SECS
    assert requests.get(relay.url + "/frontend/relay_up_check", timeout=10).status_code == 200


def test_client_headers_too_big_for_a_listen_answer_are_refused(cluster: Cluster) -> None:
    """80 headers of 60 KiB each pass gunicorn's per-line limit, but do not fit a 4 MiB listen answer.

    The relay must refuse such a request itself. Passed on, it makes the
    listen answer that carries it too large for any ptth_server, which drops
    the whole answer, and with it every other request batched with it; and
    256 such requests queued for one server would hold 1 GiB in the relay.
    """
    key = new_key("h")
    # The parked listen ends (204) 4 s after it parked if the relay refuses the request, as it
    # should; if the relay queued the request instead, it gets 504 after request_timeout_secs.
    relay = cluster.relay({"h": key}, extra="listen_timeout_secs = 4\nrequest_timeout_secs = 5")
    box: dict[str, requests.Response] = {}
    listener = threading.Thread(target=lambda: box.update(r=listen(relay, "h", key)), daemon=True)
    listener.start()
    wait_until(lambda: metrics(relay)["ptth_listeners_waiting"] == 1, "a parked listen", relay.proc, 10)
    big_headers = {f"X-Big-{i}": "a" * 60_000 for i in range(80)}
    started = time.monotonic()
    r = requests.get(f"{relay.url}/frontend/servers/h/files/big", headers=big_headers, timeout=60)
    secs = time.monotonic() - started
    listener.join(30)
    carried = len(box["r"].content) if "r" in box and box["r"].status_code == 200 else 0
    assert r.status_code in (400, 413, 431) and carried <= MAX_LISTEN_ANSWER_BYTES, (
        f"a request with {sum(map(len, big_headers.values())) / MIB:.2f} MiB of headers got "
        f"{r.status_code} after {secs:.1f} s; the listen answer that carried it to the server was "
        f"{carried / MIB:.2f} MiB (PROTOCOL.md: at most 4 MiB)")


@pytest.mark.alone
def test_a_huge_header_block_does_not_stall_the_relay(cluster: Cluster) -> None:
    """100 header lines of 60 KiB are within gunicorn's limits here; other clients must not wait on them."""
    relay = cluster.relay({}, extra="")
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with requests.Session() as s:
            while not stop.is_set() and len(latencies) < 100_000:
                started = time.monotonic()
                s.get(relay.url + "/frontend/relay_up_check", timeout=60)
                latencies.append(time.monotonic() - started)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.3)
    started = time.monotonic()
    r = requests.get(relay.url + "/frontend/relay_up_check", timeout=60,
                     headers={f"X-Big-{i}": "a" * 60_000 for i in range(90)})
    big_secs = time.monotonic() - started
    time.sleep(0.3)
    stop.set()
    prober.join(60)
    worst = max(latencies)
    assert worst < 1.0, (
        f"while one client sent 5.2 MiB of headers (answered {r.status_code} after {big_secs:.1f} s), "
        f"the relay answered nobody else for {worst:.1f} s")


def test_more_than_32_parked_listens_get_429_with_retry_after(cluster: Cluster) -> None:
    key = new_key("many")
    relay = cluster.relay({"many": key}, extra="listen_timeout_secs = 30\nrequest_timeout_secs = 5")
    socks = []
    try:
        for _ in range(MAX_LISTENS):
            socks.append(park_listen(relay, "many", key))
        wait_until(lambda: metrics(relay)["ptth_listeners_waiting"] == MAX_LISTENS, "32 parked listens",
                   relay.proc, 10)
        started = time.monotonic()
        r = listen(relay, "many", key, timeout=10)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert time.monotonic() - started < AT_ONCE_SECS
    finally:
        for s in socks:
            s.close()
    # Hung-up listens are let go at once, and the name can listen again.
    wait_until(lambda: metrics(relay)["ptth_listeners_waiting"] == 0, "parked listens freed", relay.proc, 10)
    box: dict[str, requests.Response] = {}
    listener = threading.Thread(target=lambda: box.update(r=listen(relay, "many", key)), daemon=True)
    listener.start()
    wait_until(lambda: metrics(relay)["ptth_listeners_waiting"] == 1, "a new listen", relay.proc, 10)
    client: dict[str, requests.Response] = {}
    getter = threading.Thread(target=lambda: client.update(
        r=requests.get(f"{relay.url}/frontend/servers/many/x", timeout=30)), daemon=True)
    getter.start()
    listener.join(15)
    assert box["r"].status_code == 200
    (item,) = msgpack.unpackb(box["r"].content, raw=False)
    assert respond(relay, item["id"], key, b"back").status_code == 200
    getter.join(15)
    assert client["r"].content == b"back"


# ---- 2. many clients, many servers ---------------------------------------------


def _make_files(root: Path, rng: random.Random, count: int = 3) -> dict[str, bytes]:
    root.mkdir()
    files = {}
    for i in range(count):
        data = rng.randbytes(rng.randint(1 * MIB, 4 * MIB))
        (root / f"f{i}.bin").write_bytes(data)
        files[f"f{i}.bin"] = data
    return files


def test_200_clients_download_from_10_servers(cluster: Cluster, tmp_path: Path) -> None:
    rng = random.Random(200)
    names = [f"s{i}" for i in range(10)]
    keys = {name: new_key(name) for name in names}
    relay = cluster.relay(keys, extra="request_timeout_secs = 30")
    digests: dict[tuple[str, str], tuple[int, str]] = {}
    for name in names:
        files = _make_files(tmp_path / f"root-{name}", rng)
        for rel, data in files.items():
            digests[(name, rel)] = (len(data), sha(data))
    servers = [cluster.server(relay, name, keys[name], tmp_path / f"root-{name}", wait=False) for name in names]
    for server in servers:
        wait_for_online(relay, server.name, server.proc)
    before = metrics(relay)
    jobs = [(names[i % 10], f"f{(i // 10) % 3}.bin") for i in range(200)]
    start = threading.Barrier(len(jobs), timeout=30)

    def download(job: tuple[str, str]) -> tuple[int, int, str]:
        name, rel = job
        start.wait()
        digest = hashlib.sha256()
        size = 0
        with requests.get(f"{relay.url}/frontend/servers/{name}/files/{rel}", stream=True, timeout=60) as r:
            for chunk in r.iter_content(256 * 1024):
                digest.update(chunk)
                size += len(chunk)
            return r.status_code, size, digest.hexdigest()

    started = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(download, jobs))
    secs = time.monotonic() - started
    total = sum(size for _, size, _ in results)
    for job, (status, size, digest) in zip(jobs, results, strict=True):
        assert status == 200, job
        assert (size, digest) == digests[job], f"{job}: wrong bytes"
    assert secs < 60, f"200 downloads ({total / MIB:.0f} MiB) took {secs:.0f} s"
    after = metrics(relay)
    ok = 'ptth_client_requests_total{status="200"}'
    assert after[ok] - before.get(ok, 0) == len(jobs)
    assert after.get("ptth_client_responses_cut_total", 0) == 0
    wait_until(lambda: metrics(relay)["ptth_requests_pending"] == 0, "no requests pending", relay.proc, 10)
    for server in servers:
        assert server.proc.popen.poll() is None
        assert "Traceback" not in server.proc.output()
    print(f"\n200 downloads, {total / MIB:.0f} MiB from 10 servers in {secs:.1f} s "
          f"({total / MIB / secs:.0f} MiB/s)")


# ---- 3. slow: many idle servers, and a soak ----------------------------------------

# The idle servers: one greenlet per name, long-polling on a kept-alive raw socket
# as ptth_server's listen loop does. Written to a file and run by the venv's Python.
IDLE_SERVERS = r'''
import json, sys, time
import gevent
from gevent import socket

port, keys_file, duration = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
keys = json.load(open(keys_file))
stop_at = time.monotonic() + duration
answers = {}

def read_response(reader):
    status = int(reader.readline(65536).split()[1])
    length = 0
    while True:
        line = reader.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        reader.read(length)
    return status

def idle(name, key, delay):
    gevent.sleep(delay)
    request = (f"GET /7ZSFUKGV/http_listen/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"X-ApiKey: {key}\r\n\r\n").encode()
    sock = reader = None
    while time.monotonic() < stop_at:
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=330)
                reader = sock.makefile("rb")
            sock.sendall(request)
            status = read_response(reader)
            answers[status] = answers.get(status, 0) + 1
            if status not in (200, 204):
                gevent.sleep(1)
        except (OSError, ValueError, IndexError):
            answers["error"] = answers.get("error", 0) + 1
            sock = None
            gevent.sleep(1)

greenlets = [gevent.spawn(idle, name, key, i * 0.003) for i, (name, key) in enumerate(keys.items())]
print("idle servers started", flush=True)
while time.monotonic() < stop_at:
    gevent.sleep(2)
    print("answers", answers, flush=True)
gevent.killall(greenlets)
'''


@pytest.mark.alone
@pytest.mark.slow
def test_1000_idle_servers_cost_little_and_slow_nothing(cluster: Cluster, tmp_path: Path) -> None:
    pytest.importorskip("gevent")
    idle_keys = {f"idle-{i:04d}": new_key(f"idle-{i}") for i in range(1000)}
    real_key = new_key("real")
    relay = cluster.relay({**idle_keys, "real": real_key}, extra="listen_timeout_secs = 30")
    root = tmp_path / "root"
    root.mkdir()
    (root / "small.txt").write_bytes(b"first byte\n" * 100)
    cluster.server(relay, "real", real_key, root)
    keys_file = tmp_path / "idle-keys.json"
    keys_file.write_text(json.dumps(idle_keys))
    script = tmp_path / "idle_servers.py"
    script.write_text(IDLE_SERVERS)
    idle = Proc([sys.executable, str(script), str(relay.port), str(keys_file), "240"],
                tmp_path / "idle-servers.log")
    cluster.procs.append(idle)
    idle.wait_for_output("idle servers started")
    wait_until(lambda: metrics(relay)["ptth_listeners_waiting"] >= 1000, "1,000 parked listens", idle, 60)
    assert metrics(relay)["ptth_servers_online"] >= 1001

    worker = relay.worker_pid()
    rss_mib = rss_kib(worker) / 1024
    assert rss_mib < 300, f"relay worker RSS {rss_mib:.0f} MiB with 1,000 idle servers"

    url = f"{relay.url}/frontend/servers/real/files/small.txt"
    first_byte = []
    for _ in range(20):
        started = time.monotonic()
        with requests.get(url, stream=True, timeout=10) as r:
            assert r.status_code == 200
            next(r.iter_content(1))
            first_byte.append(time.monotonic() - started)
            r.content  # noqa: B018 - drain
        time.sleep(0.05)
    median = statistics.median(first_byte)
    print(f"\nrelay worker RSS {rss_mib:.0f} MiB with 1,000 idle servers; first byte median "
          f"{median * 1000:.0f} ms, max {max(first_byte) * 1000:.0f} ms")
    assert median < 0.100, f"first byte after a median {median * 1000:.0f} ms ({first_byte})"
    assert idle.popen.poll() is None, idle.output()[-2000:]


SOAK_SECS = float(os.environ.get("PTTH_SOAK_SECS", "600"))


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECS + 240)
def test_soak_of_mixed_traffic_keeps_memory_flat(cluster: Cluster, tmp_path: Path) -> None:
    rng = random.Random(600)
    names = ["soak-a", "soak-b"]
    keys = {name: new_key(name) for name in names}
    relay = cluster.relay({**keys, "offline": new_key("offline")},
                          extra="listen_timeout_secs = 10\nrequest_timeout_secs = 10")
    files = {}
    servers = []
    for name in names:
        files[name] = _make_files(tmp_path / f"root-{name}", rng)
        servers.append(cluster.server(relay, name, keys[name], tmp_path / f"root-{name}"))
    worker = relay.worker_pid()
    stop = threading.Event()
    counts: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def one(worker_rng: random.Random) -> None:
        name = worker_rng.choice(names)
        rel = worker_rng.choice(sorted(files[name]))
        data = files[name][rel]
        url = f"{relay.url}/frontend/servers/{name}/files/{rel}"
        kind = worker_rng.choice(["full", "full", "range", "head", "missing", "listing", "leave",
                                  "wrong-key", "offline", "conditional"])
        if kind == "full":
            r = requests.get(url, timeout=60)
            ok = r.status_code == 200 and r.content == data
        elif kind == "range":
            a = worker_rng.randrange(len(data))
            r = requests.get(url, headers={"Range": f"bytes={a}-{a + 9999}"}, timeout=60)
            ok = r.status_code == 206 and r.content == data[a:a + 10000]
        elif kind == "head":
            r = requests.head(url, timeout=60)
            ok = r.status_code == 200 and r.headers["Content-Length"] == str(len(data))
        elif kind == "missing":
            ok = requests.get(url + ".nope", timeout=60).status_code == 404
        elif kind == "listing":
            r = requests.get(f"{relay.url}/frontend/servers/{name}/files/", timeout=60)
            ok = r.status_code == 200 and rel in r.text
        elif kind == "leave":
            with requests.get(url, stream=True, timeout=60) as r:
                ok = r.status_code == 200 and len(next(r.iter_content(65536))) > 0
        elif kind == "wrong-key":
            ok = listen(relay, name, new_key("wrong"), timeout=10).status_code == 403
        elif kind == "offline":
            ok = requests.get(f"{relay.url}/frontend/servers/offline/x", timeout=10).status_code == 502
        else:
            etag = requests.head(url, timeout=60).headers["ETag"]
            ok = requests.get(url, headers={"If-None-Match": etag}, timeout=60).status_code == 304
        with lock:
            counts[kind] += 1
            if not ok:
                errors.append(kind)

    def traffic(seed: int) -> None:
        worker_rng = random.Random(seed)
        while not stop.is_set():
            try:
                one(worker_rng)
            except requests.RequestException as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    pids = {"relay worker": worker, **{f"server {s.name}": s.proc.pid for s in servers}}
    warmup = min(60.0, max(10.0, SOAK_SECS / 5))
    threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(warmup)
        baseline = {what: rss_kib(pid) for what, pid in pids.items()}
        samples = []
        end = time.monotonic() + SOAK_SECS - warmup
        while time.monotonic() < end:
            time.sleep(min(10.0, max(0.0, end - time.monotonic())))
            samples.append({what: rss_kib(pid) for what, pid in pids.items()})
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    final = {what: rss_kib(pid) for what, pid in pids.items()}
    total = sum(counts.values())
    peak = {what: max([s[what] for s in samples] + [final[what]]) for what in pids}
    print(f"\nsoak {SOAK_SECS:.0f} s: {total} requests {dict(counts)}; RSS KiB baseline {baseline}, "
          f"peak {peak}, final {final}")
    assert not errors, f"{len(errors)} of {total} requests failed: {errors[:10]}"
    assert total > SOAK_SECS  # at least one request a second got through
    for what in pids:
        growth = (final[what] - baseline[what]) / baseline[what]
        assert growth < 0.10, f"{what} RSS grew {growth:.0%}: {baseline[what]} -> {final[what]} KiB"
    wait_until(lambda: metrics(relay)["ptth_requests_pending"] == 0, "no requests pending", relay.proc, 15)
    for server in servers:
        assert "Traceback" not in server.proc.output()
    assert "Traceback" not in relay.proc.output()
