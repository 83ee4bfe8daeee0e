"""Web apps through the tunnel: upload, WebSocket echo, idle WebSockets and SSE, against direct access.

    .venv/bin/python bench/web.py [--quick] [--bytes 1G] [--runs 3] [--profile]

Starts on 127.0.0.1 the relay as deployed (gunicorn, gevent worker,
conf/gunicorn.conf.py), a ptth_server with `web_app_url`, and the app
(bench/web_app.py: plain sockets, a thread per connection, wsproto for
WebSocket framing), all on a copy of the working tree's product files. The
same client code then measures each figure directly against the app
(`direct`) and through the relay's path mode,
`/frontend/servers/bench/...` (`tunnel`), in turn, the order rotating from
run to run; the tables keep the median of the runs:

  upload     POST of --bytes (1 GiB) from a generator of 1 MiB pieces, with
             Content-Length; the app hashes it (sha256), the client checks the
             hash. MiB/s from the first byte sent to the answer; peak RSS of
             the relay worker and ptth_server (VmRSS sampled every 50 ms and
             VmHWM after a reset), CPU of every process.
  ws-1       one WebSocket, a 100-byte binary message echoed back, round
             trips back to back after a warm-up: p50/p99 ms.
  ws-100     100 WebSockets at once, each sending a 100-byte message every
             --ws-interval-ms (100: 1,000 messages/s in all), phases spread
             evenly: p50/p99 ms over all round trips. Then the same sockets
             with no pause (each sends as soon as its echo is back): messages/s
             and p50/p99, what the tunnel can carry.
  idle       --idle (1,000) WebSockets opened through the tunnel and held
             --idle-secs; relay worker and server RSS before and with them
             open; then each must still echo a message.
  sse        GET /sse: --sse-events events, one every --sse-interval-ms, each
             carrying its send time (time.time_ns(), the machine's clock);
             the client takes arrival - send per event (the first 5 left out):
             p50/p99 ms.

Added latency is tunnel - direct, both from the same run. Before each run
the machine must be quiet (bench/measure.py), and what other processes took
during it is recorded; --quick skips the wait. Prints a table; writes
bench/web-results.json and bench/web-results.md. --profile adds, after
the measured runs, one tunnel run of each scenario with py-spy sampling the
relay worker and ptth_server (bench/profile-web-*.txt).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from forward import Watch, parse_bytes, status_kib
from measure import cpu_times, wait_for_quiet
from plan import BENCH, MIB
from profiling import PROFILE_RATE_HZ, _py_spy, summarize_profile
from targets import (
    STARTUP_DEADLINE_SECS,
    STOP_SECS,
    Proc,
    ProcError,
    procs,
    raise_nofile,
    relay_config,
    snapshot_code,
)

STARTED = time.monotonic()
PATHS = ("tunnel", "direct")
PREFIX = "/frontend/servers/bench"
PIECE = os.urandom(MIB)  # the upload is this, repeated
MESSAGE_BYTES = 100
SOCKET_TIMEOUT_SECS = 60.0
SSE_SKIP = 5
# Targets of issue 13 ("Performance").
TARGET_UPLOAD_RATIO = 0.40
TARGET_WS_ADDED_P50_MS, TARGET_WS_ADDED_P99_MS = 2.0, 10.0
TARGET_IDLE_RELAY_MIB = 150.0
TARGET_SSE_ADDED_P50_MS = 2.0


def progress(message: str) -> None:
    print(f"[web {time.monotonic() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def percentiles(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": round(q[49], 3), "p90_ms": round(q[89], 3), "p99_ms": round(q[98], 3),
            "max_ms": round(max(ms), 3), "mean_ms": round(statistics.fmean(ms), 3)}


# ---- the clients ------------------------------------------------------------------------


def pieces(total: int) -> Iterator[bytes | memoryview]:
    view = memoryview(PIECE)
    while total:
        step = min(total, len(view))
        yield view[:step]
        total -= step


def expected_sha256(total: int) -> str:
    sha = hashlib.sha256()
    for piece in pieces(total):
        sha.update(piece)
    return sha.hexdigest()


def upload(base: str, total: int, want_sha: str) -> dict[str, Any]:
    """POST `total` bytes to base/upload from a generator; MiB/s until the app's answer."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=SOCKET_TIMEOUT_SECS)
    start = time.perf_counter()
    conn.request("POST", url.path + "/upload", body=pieces(total),
                 headers={"Content-Length": str(total), "Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    body = response.read()
    secs = time.perf_counter() - start
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"upload to {base}: {response.status} {body[:300]!r}")
    answer = json.loads(body)
    if answer != {"bytes": total, "sha256": want_sha}:
        raise RuntimeError(f"upload to {base}: the app got {answer}, not {total} bytes of sha256 {want_sha}")
    return {"bytes": total, "secs": round(secs, 3), "mib_per_s": round(total / MIB / secs, 1)}


class WebSocket:
    """A minimal WebSocket client: handshake, masked binary frames out, unmasked frames in.

    Hand-written rather than wsproto so that the client spends as little of
    the 2 cores as it can; the app's side uses wsproto.
    """

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=SOCKET_TIMEOUT_SECS)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = bytearray()
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {url.path}/ws HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        while (end := self.pending.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.pending[:end]).decode("latin-1")
        del self.pending[:end + 4]
        if not head.startswith("HTTP/1.1 101"):
            raise RuntimeError(f"WebSocket handshake at {base}: {head[:300]!r}")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
                                  .digest()).decode()
        if accept.lower() not in head.lower():
            raise RuntimeError(f"WebSocket handshake at {base}: wrong Sec-WebSocket-Accept in {head!r}")
        self.message = os.urandom(MESSAGE_BYTES)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(self.message))
        self.frame = bytes([0x82, 0x80 | MESSAGE_BYTES]) + mask + masked

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the WebSocket's connection closed")
        self.pending += data

    def _take(self, n: int) -> bytes:
        while len(self.pending) < n:
            self._fill()
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    def echo(self) -> float:
        """Send the message, wait for it back; the round trip in ms."""
        start = time.perf_counter_ns()
        self.sock.sendall(self.frame)
        first, second = self._take(2)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(self._take(2), "big")
        payload = self._take(n)
        took = (time.perf_counter_ns() - start) / 1e6
        if first != 0x82 or payload != self.message:
            raise RuntimeError(f"WebSocket echo: frame {first:#x} with {len(payload)} bytes, not the message")
        return took

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000, zero mask
        self.sock.close()


def ws_single(base: str, n: int, warmup: int) -> dict[str, Any]:
    ws = WebSocket(base)
    try:
        for _ in range(warmup):
            ws.echo()
        return percentiles([ws.echo() for _ in range(n)])
    finally:
        ws.close()


def open_many(base: str, count: int) -> list[WebSocket]:
    sockets: list[WebSocket] = []
    try:
        for _ in range(count):
            sockets.append(WebSocket(base))
    except BaseException:
        for ws in sockets:
            ws.close()
        raise
    return sockets


def ws_concurrent(base: str, count: int, per_socket: int, interval_ms: float) -> dict[str, Any]:
    """`count` sockets each making `per_socket` round trips, one every `interval_ms` (0: back to back)."""
    sockets = open_many(base, count)
    try:
        for ws in sockets:
            ws.echo()  # warm-up
        times: list[list[float]] = [[] for _ in sockets]
        errors: list[BaseException] = []
        interval = interval_ms / 1000
        start = time.monotonic() + 0.2

        def run(i: int, ws: WebSocket) -> None:
            try:
                first = start + interval * i / count  # phases spread over one interval
                for j in range(per_socket):
                    delay = first + j * interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    times[i].append(ws.echo())
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i, ws)) for i, ws in enumerate(sockets)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        if errors:
            raise errors[0]
        every = [t for ts in times for t in ts]
        return {**percentiles(every), "sockets": count, "interval_ms": interval_ms,
                "messages_per_s": round(len(every) / wall, 1)}
    finally:
        for ws in sockets:
            ws.close()


def sse(base: str, events: int, interval_ms: float) -> dict[str, Any]:
    """Arrival - send of each event (the first SSE_SKIP left out), in ms."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=SOCKET_TIMEOUT_SECS)
    conn.request("GET", f"{url.path}/sse?n={events}&interval_ms={interval_ms}",
                 headers={"Accept": "text/event-stream"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"SSE at {base}: {response.status}")
    delays = []
    while line := response.readline():
        if line.startswith(b"data: "):
            delays.append((time.time_ns() - int(line[6:])) / 1e6)
    conn.close()
    if len(delays) != events:
        raise RuntimeError(f"SSE at {base}: {len(delays)} events, not {events}")
    return percentiles(delays[SSE_SKIP:])


# ---- the processes ------------------------------------------------------------------------


class Setup:
    """The app, the relay and ptth_server, started on a copy of the code; stopped by close()."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.started: list[Proc] = []
        self.code_info = snapshot_code(None, work / "code")
        code = work / "code"
        self.app = Proc([sys.executable, str(BENCH / "web_app.py")], work / "app.log")
        self.started.append(self.app)
        app_url = self.app.wait_for_output(r"listening on (http://127\.0\.0\.1:\d+)", STARTUP_DEADLINE_SECS).group(1)
        key = procs.new_key("bench")
        (work / "relay.toml").write_text(relay_config({"bench": key}, code))
        relay, port = procs.start_relay(work / "relay.toml", work / "relay.log", cwd=code,
                                        deadline=STARTUP_DEADLINE_SECS)
        self.started.append(relay)
        relay_url = f"http://127.0.0.1:{port}"
        config = procs.write_server_config(work / "server.toml", "bench", key, relay_url, None,
                                           f'web_app_url = "{app_url}"')
        server = procs.start_server(config, work / "server.log", cwd=code)
        self.started.append(server)
        procs.wait_for_server(relay_url, "bench", server, STARTUP_DEADLINE_SECS)
        self.bases = {"tunnel": relay_url + PREFIX, "direct": app_url}
        self.pids = {"relay": procs.gunicorn_worker(relay), "server": server.pid, "app": self.app.pid}

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.terminate(STOP_SECS)


# ---- the run ----------------------------------------------------------------------------------


def alternate(args: argparse.Namespace, setup: Setup, label: str,
              one: Callable[[str], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`args.runs` rounds of `one(base)` for each path, the order rotating; each run with its Watch."""
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    for i in range(args.runs):
        order = PATHS[i % 2:] + PATHS[:i % 2]
        for path in order:
            quiet = None if args.quick else wait_for_quiet(f"{label}, {path}")
            progress(f"{label}: run {i + 1}/{args.runs}, {path}")
            with Watch({**setup.pids, "client": os.getpid()}, ("relay", "server", "app")) as watch:
                figures = one(setup.bases[path])
            runs[path].append({**figures, **watch.result, "others_before_pct": quiet})
    return runs


def median_of(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    out["peak_rss_mib"] = {w: max(r["peak_rss_mib"][w] for r in runs) for w in runs[0]["peak_rss_mib"]}
    out["client_cpu_pct"] = round(statistics.median(100 * r["cpu_secs"]["client"] / r["wall_secs"] for r in runs))
    out["others_cpu_pct"] = max(round(100 * r["cpu_secs"]["others"] / r["wall_secs"]) for r in runs)
    cpu = {w: statistics.median(100 * r["cpu_secs"][w] / r["wall_secs"] for r in runs)
           for w in ("relay", "server", "app")}
    out["cpu_pct"] = {w: round(v) for w, v in cpu.items()}
    return out


def idle(setup: Setup, count: int, hold_secs: float) -> dict[str, Any]:
    """`count` WebSockets opened through the tunnel and held; RSS before and with them; do they echo?"""
    pids = {w: setup.pids[w] for w in ("relay", "server")}
    before = {w: round(status_kib(p, "VmRSS") / 1024, 1) for w, p in pids.items()}
    for p in pids.values():
        Path(f"/proc/{p}/clear_refs").write_text("5")
    start = time.monotonic()
    sockets = open_many(setup.bases["tunnel"], count)
    opened_secs = time.monotonic() - start
    try:
        progress(f"idle: {count} WebSockets open in {opened_secs:.1f} s; holding them {hold_secs:g} s")
        cpu_before = {w: sum(cpu_times(p)) for w, p in pids.items()}
        time.sleep(hold_secs)
        held = {w: round(status_kib(p, "VmRSS") / 1024, 1) for w, p in pids.items()}
        cpu_held = {w: round(100 * (sum(cpu_times(p)) - cpu_before[w]) / hold_secs, 1) for w, p in pids.items()}
        echoed, failures = 0, []
        for ws in sockets:
            try:
                ws.echo()
                echoed += 1
            except (OSError, RuntimeError) as e:
                failures.append(repr(e))
        peak = {w: round(status_kib(p, "VmHWM") / 1024, 1) for w, p in pids.items()}
    finally:
        for ws in sockets:
            ws.close()
    per_socket_kib = {w: round(1024 * (held[w] - before[w]) / count, 1) for w in pids}
    return {"sockets": count, "open_secs": round(opened_secs, 1), "kib_per_socket": per_socket_kib,
            "hold_secs": hold_secs,
            "rss_before_mib": before, "rss_held_mib": held, "peak_rss_mib": peak,
            "cpu_pct_while_idle": cpu_held, "echoed_after": echoed, "echo_failures": failures[:5]}


def profile(setup: Setup, name: str, secs: float, load: Callable[[str], Any]) -> None:
    """py-spy on the relay worker and ptth_server while `load` runs through the tunnel for `secs`."""
    py_spy = _py_spy()
    raws = {w: Path(tempfile.gettempdir()) / f"profile-web-{name}-{w}.raw.txt" for w in ("relay", "server")}
    spies = [subprocess.Popen([py_spy, "record", "--pid", str(setup.pids[w]), "--duration", str(int(secs)),
                               "--rate", str(PROFILE_RATE_HZ), "--format", "raw", "--nonblocking",
                               "-o", str(raws[w])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for w in raws]
    time.sleep(0.5)
    progress(f"profile: {name} through the tunnel, py-spy for {secs:g} s")
    with Watch(setup.pids, ()) as watch:
        end = time.monotonic() + secs - 0.5
        while time.monotonic() < end:
            load(setup.bases["tunnel"])
    for spy in spies:
        _, err = spy.communicate(timeout=120)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err[-1000:]}")
    w = watch.result
    text = [f"# py-spy profile: {name} through the tunnel (bench/web.py --profile)",
            f"# {secs:g} s at {PROFILE_RATE_HZ} Hz, --nonblocking; idle samples left out.", ""]
    for who, raw in raws.items():
        pct = 100 * w["cpu_secs"][who] / w["wall_secs"]
        sys_pct = 100 * w["cpu_sys_secs"][who] / w["wall_secs"]
        text += summarize_profile(raw, who, pct, sys_pct, setup.work / "code")
    out = BENCH / f"profile-web-{name}.txt"
    out.write_text("\n".join(text) + "\n")
    progress(f"profile: {out}")


def run(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    results: dict[str, Any] = {}
    want = expected_sha256(args.bytes)
    # Warm-up: both paths, every kind of request, once.
    for base in setup.bases.values():
        upload(base, min(args.bytes, 16 * MIB), expected_sha256(min(args.bytes, 16 * MIB)))
        ws_single(base, 50, 10)
        sse(base, SSE_SKIP + 5, 1)

    runs = alternate(args, setup, "upload", lambda b: upload(b, args.bytes, want))
    results["upload"] = {p: {**median_of(r, ("mib_per_s", "secs")), "runs": r} for p, r in runs.items()}

    runs = alternate(args, setup, "ws-1", lambda b: ws_single(b, args.round_trips, args.warmup))
    results["ws_1"] = {p: {**median_of(r, ("p50_ms", "p90_ms", "p99_ms", "max_ms")), "runs": r}
                       for p, r in runs.items()}

    per_socket = max(1, round(args.ws_secs * 1000 / args.ws_interval_ms))
    runs = alternate(args, setup, f"ws-{args.sockets}",
                     lambda b: ws_concurrent(b, args.sockets, per_socket, args.ws_interval_ms))
    results["ws_many"] = {p: {**median_of(r, ("p50_ms", "p90_ms", "p99_ms", "max_ms", "messages_per_s")), "runs": r}
                          for p, r in runs.items()}

    runs = alternate(args, setup, f"ws-{args.sockets} back to back",
                     lambda b: ws_concurrent(b, args.sockets, args.flat_out_messages, 0))
    results["ws_many_flat_out"] = {p: {**median_of(r, ("p50_ms", "p99_ms", "messages_per_s")), "runs": r}
                                   for p, r in runs.items()}

    runs = alternate(args, setup, "sse", lambda b: sse(b, args.sse_events, args.sse_interval_ms))
    results["sse"] = {p: {**median_of(r, ("p50_ms", "p90_ms", "p99_ms", "max_ms")), "runs": r}
                      for p, r in runs.items()}

    if not args.quick:
        wait_for_quiet("idle")
    progress(f"idle: opening {args.idle} WebSockets through the tunnel")
    results["idle"] = idle(setup, args.idle, args.idle_secs)

    if args.profile:
        small = min(args.bytes, 256 * MIB)
        small_sha = expected_sha256(small)
        profile(setup, "upload", args.profile_secs, lambda b: upload(b, small, small_sha))
        profile(setup, "ws-1", args.profile_secs, lambda b: ws_single(b, 500, 0))
        profile(setup, f"ws-{args.sockets}", args.profile_secs,
                lambda b: ws_concurrent(b, args.sockets, per_socket // 2 or 1, args.ws_interval_ms))
        profile(setup, "sse", args.profile_secs, lambda b: sse(b, 200, args.sse_interval_ms))
    return results


def targets(results: dict[str, Any], sockets: int, idle_count: int) -> list[dict[str, Any]]:
    up = results["upload"]
    ratio = up["tunnel"]["mib_per_s"] / up["direct"]["mib_per_s"]
    out = [{"target": f"upload: tunnel >= {TARGET_UPLOAD_RATIO:.0%} of direct",
            "value": f"{ratio:.1%} ({up['tunnel']['mib_per_s']:,.0f} / {up['direct']['mib_per_s']:,.0f} MiB/s)",
            "met": ratio >= TARGET_UPLOAD_RATIO}]
    for key, n in (("ws_1", 1), ("ws_many", sockets)):
        r = results[key]
        for q, limit in (("p50_ms", TARGET_WS_ADDED_P50_MS), ("p99_ms", TARGET_WS_ADDED_P99_MS)):
            added = r["tunnel"][q] - r["direct"][q]
            out.append({"target": f"WebSocket echo, {n} socket{'s' * (n > 1)}: added {q[:3]} <= {limit:g} ms",
                        "value": f"+{added:.2f} ms ({r['tunnel'][q]:.2f} vs {r['direct'][q]:.2f})",
                        "met": added <= limit})
    i = results["idle"]
    ok = i["rss_held_mib"]["relay"] < TARGET_IDLE_RELAY_MIB and i["echoed_after"] == idle_count == i["sockets"]
    out.append({"target": f"{idle_count:,} idle WebSockets: relay worker < {TARGET_IDLE_RELAY_MIB:g} MiB RSS, "
                          "all still echo",
                "value": f"{i['rss_held_mib']['relay']:.0f} MiB (peak {i['peak_rss_mib']['relay']:.0f}), "
                         f"{i['echoed_after']:,} of {i['sockets']:,} echoed",
                "met": ok})
    s = results["sse"]
    added = s["tunnel"]["p50_ms"] - s["direct"]["p50_ms"]
    out.append({"target": f"SSE: added delay per event p50 <= {TARGET_SSE_ADDED_P50_MS:g} ms",
                "value": f"+{added:.2f} ms ({s['tunnel']['p50_ms']:.2f} vs {s['direct']['p50_ms']:.2f})",
                "met": added <= TARGET_SSE_ADDED_P50_MS})
    return out


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    rows = ["| figure | tunnel | direct | tunnel - direct | tunnel/direct |", "|---|---:|---:|---:|---:|"]

    def row(name: str, t: float, d: float, digits: int = 2, ratio: bool = False) -> None:
        diff = f"{t - d:+,.{digits}f}" if not ratio else "-"
        rat = f"{t / d:.2f}" if d else "-"
        rows.append(f"| {name} | {t:,.{digits}f} | {d:,.{digits}f} | {diff} | {rat} |")

    up = results["upload"]
    row(f"1. upload {args.bytes / MIB:,.0f} MiB, MiB/s", up["tunnel"]["mib_per_s"], up["direct"]["mib_per_s"], 0,
        ratio=True)
    rss = up["tunnel"]["peak_rss_mib"]
    rows.append(f"| 1. upload, peak RSS MiB (max of runs) | relay {rss['relay']:.0f}, server {rss['server']:.0f} "
                f"| app {up['direct']['peak_rss_mib']['app']:.0f} | - | - |")
    cpu_t, cpu_d = up["tunnel"]["cpu_pct"], up["direct"]["cpu_pct"]
    rows.append(f"| 1. upload, CPU % of a core | relay {cpu_t['relay']}, server {cpu_t['server']}, "
                f"app {cpu_t['app']} | app {cpu_d['app']} | - | - |")
    for key, name in (("ws_1", "2. WebSocket echo 100 B, 1 socket"),
                      ("ws_many", (f"2. WebSocket echo 100 B, {args.sockets} sockets, one message each "
                                  f"{args.ws_interval_ms:g} ms"))):
        r = results[key]
        for q in ("p50_ms", "p99_ms"):
            row(f"{name}, {q[:3]} ms", r["tunnel"][q], r["direct"][q])
    r = results["ws_many_flat_out"]
    row(f"2. WebSocket echo 100 B, {args.sockets} sockets back to back, messages/s",
        r["tunnel"]["messages_per_s"], r["direct"]["messages_per_s"], 0, ratio=True)
    row(f"2. WebSocket echo 100 B, {args.sockets} sockets back to back, p50 ms",
        r["tunnel"]["p50_ms"], r["direct"]["p50_ms"])
    i = results["idle"]
    rows.append(f"| 3. {i['sockets']:,} idle WebSockets held {i['hold_secs']:g} s: RSS MiB | relay "
                f"{i['rss_held_mib']['relay']:.0f} (before {i['rss_before_mib']['relay']:.0f}), server "
                f"{i['rss_held_mib']['server']:.0f} (before {i['rss_before_mib']['server']:.0f}) | - | - | - |")
    rows.append(f"| 3. ... RSS per idle WebSocket, KiB | relay {i['kib_per_socket']['relay']:.0f}, "
                f"server {i['kib_per_socket']['server']:.0f} | - | - | - |")
    rows.append(f"| 3. ... then echoing, each once | {i['echoed_after']:,} of {i['sockets']:,} | - | - | - |")
    s = results["sse"]
    for q in ("p50_ms", "p99_ms"):
        row(f"4. SSE, send to arrival per event, {q[:3]} ms", s["tunnel"][q], s["direct"][q])
    return "\n".join(rows)


def machine(code_info: dict[str, Any]) -> dict[str, Any]:
    import platform
    import re
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    mem = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpu_model": model.group(1).strip() if model else platform.processor(),
            "nproc": os.cpu_count(), "mem_gib": round(mem / 1024 / 1024, 1), "kernel": platform.release(),
            "python": platform.python_version(), "code": code_info}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: small sizes, 1 run, no waiting "
                                                             "for a quiet machine; not figures")
    parser.add_argument("--bytes", type=parse_bytes, help="upload size (default 1G; --quick 64M)")
    parser.add_argument("--runs", type=int, help="runs of each figure per path, median kept (default 3)")
    parser.add_argument("--round-trips", type=int, help="WebSocket round trips on 1 socket (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="round trips before those measured")
    parser.add_argument("--sockets", type=int, default=100, help="concurrent WebSockets (default 100)")
    parser.add_argument("--ws-interval-ms", type=float, default=100.0,
                        help="each of those sends a message this often (default 100)")
    parser.add_argument("--ws-secs", type=float, help="for this long (default 5)")
    parser.add_argument("--flat-out-messages", type=int, help="messages per socket back to back (default 100)")
    parser.add_argument("--idle", type=int, help="idle WebSockets (default 1000)")
    parser.add_argument("--idle-secs", type=float, help="how long they are held (default 30)")
    parser.add_argument("--sse-events", type=int, help="events per SSE run (default 500)")
    parser.add_argument("--sse-interval-ms", type=float, default=10.0, help="between events (default 10)")
    parser.add_argument("--profile", action="store_true", help="then py-spy each scenario through the tunnel")
    parser.add_argument("--profile-secs", type=float, help="py-spy time per scenario (default 10; --quick 3)")
    parser.add_argument("--json", type=Path, default=BENCH / "web-results.json")
    parser.add_argument("--markdown", type=Path, default=BENCH / "web-results.md")
    args = parser.parse_args(argv)
    q = args.quick
    args.bytes = args.bytes or (64 * MIB if q else 1024 * MIB)
    args.runs = args.runs or (1 if q else 3)
    args.round_trips = args.round_trips or (300 if q else 2000)
    args.warmup = min(args.warmup, 50) if q else args.warmup
    args.ws_secs = args.ws_secs or (1 if q else 5)
    args.flat_out_messages = args.flat_out_messages or (20 if q else 100)
    args.idle = args.idle if args.idle is not None else (100 if q else 1000)
    args.idle_secs = args.idle_secs if args.idle_secs is not None else (2 if q else 30)
    args.sse_events = args.sse_events or (60 if q else 500)
    args.profile_secs = args.profile_secs or (3 if q else 10)
    raise_nofile()  # 1,000 WebSockets: our sockets, and the relay's and server's (they inherit it)
    work = Path(tempfile.mkdtemp(prefix="ptth-bench-web-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop what we started
    setup = None
    try:
        progress(f"starting the app, the relay and ptth_server (logs in {work})")
        setup = Setup(work)
        info = machine(setup.code_info)
        results = run(args, setup)
    except (OSError, RuntimeError, ProcError) as e:
        print(f"bench/web.py: {type(e).__name__}: {e}\n(logs in {work})", file=sys.stderr)
        return 1
    finally:
        if setup is not None:
            setup.close()
    found = targets(results, args.sockets, args.idle)
    code = info["code"]
    dirty = " (dirty)" if code["dirty"] else ""
    head = (f"PTTH web apps, {info['date']}, code {code['commit']}{dirty} \"{code['subject'][:60]}\", "
            f"{info['cpu_model']} x {info['nproc']}, {round(time.monotonic() - STARTED)} s")
    text = table(results, args)
    lines = [f"- {t['target']}: {t['value']} -> {'met' if t['met'] else '**missed**'}" for t in found]
    print(f"{head}\n\n{text}\n\nTargets\n" + "\n".join(lines))
    settings = {k: getattr(args, k) for k in ("quick", "bytes", "runs", "round_trips", "warmup", "sockets",
                                              "ws_interval_ms", "ws_secs", "flat_out_messages", "idle",
                                              "idle_secs", "sse_events", "sse_interval_ms")}
    args.json.write_text(json.dumps({**info, "duration_secs": round(time.monotonic() - STARTED),
                                     "settings": settings, "results": results, "targets": found},
                                    indent=2) + "\n")
    args.markdown.write_text(f"{head}\n\n{text}\n\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {args.json} and {args.markdown} (logs in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
