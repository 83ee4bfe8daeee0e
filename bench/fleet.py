"""A fleet of idle servers at one relay: what each costs it, and whether visitors notice (make bench-fleet).

    .venv/bin/python bench/fleet.py [--servers 0,1000,5000,10000] [--rev REV] [--requests 1000]
        [--ramp-secs 30] [--idle-secs 120] [--connections 2000] [--relay-extra TOML] [--spec-002]

For each N in --servers, one after the other: a fresh relay as deployed
(gunicorn, gevent worker, conf/gunicorn.conf.py) with N + 1 servers
registered, a real ptth_server as the probe (serving a 1 KiB file), and,
for N > 0, bench/idle_servers.py parking N idle servers' listens (one each,
as an idle ptth_server keeps; announcing PTTH's features, or none with
--spec-002), their first listens spread over --ramp-secs. Then, in this
order:

  parked     how long until the relay shows N + the probe's listens parked
             (ptth_listeners_waiting), and the relay worker's RSS before the
             idle servers came and with them parked: RSS per parked listen.
  idle CPU   the relay worker's CPU over --idle-secs with only the idle
             servers (and the probe's listens) there, in % of a core, and the
             re-listens per second the idle client sent meanwhile: CPU per
             re-listen. Measure over a whole listen timeout (the default is
             the relay's default, 120 s; 30 for --spec-002): each server then
             re-listens once in the window.
  probe      --requests GETs of the probe's 1 KiB file through the relay,
             one at a time on one kept-alive connection: p50 / p99 ms, and
             the relay worker's CPU per request (steadier than latency on a
             shared machine). A request unanswered in 10 s counts as such.
  conns      --connections connections opened to the relay that send
             nothing (a visitor's kept-alive connection between requests,
             as the relay sees it), RSS sampled with them open: RSS per open
             connection, over those the relay accepted (its open files; the
             rest wait in the kernel). gunicorn closes them after its
             keepalive (5 s).

Everything runs on a copy of the product files (the working tree, or git
revision --rev), on 127.0.0.1. Prints a table, N side by side (N = 0 is the
baseline); writes bench/fleet-results.json. Run it alone on a quiet machine:
it measures a whole core's share. The open-file limit is raised to the hard
limit for the relay and the idle client (each needs a file per server).
"""

from __future__ import annotations

import argparse
import ast
import http.client
import json
import os
import platform
import re
import resource
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from measure import cpu_times, memory_kib
from plan import BENCH, BenchError, progress
from targets import STOP_SECS, Proc, ProcError, procs, relay_config, snapshot_code

PROBE = "probe"
PROBE_FILE = "1k.bin"
# The probe (ptth_server) keeps this many listens parked (ptth_lib/server/loop.py LISTENS_IN_FLIGHT).
PROBE_LISTENS = 2
# How long parking may take beyond the ramp before the run records what it got.
PARK_GRACE_SECS = 60.0
# A probe request unanswered this long counts as "no answer"; after this many of them the probe gives up.
PROBE_TIMEOUT_SECS = 10.0
MAX_UNANSWERED = 3
# Requests to the probe before anything is measured (the relay's and the server's first requests are slow).
WARMUP_REQUESTS = 50
# How long after opening the idle connections their RSS is sampled: after the relay accepted them all,
# before gunicorn's keepalive (5 s) closes them.
CONNS_SETTLE_SECS = 2.0
RESULTS = BENCH / "fleet-results.json"


def _metrics(url: str) -> dict[str, float]:
    """The relay's unlabelled /metrics samples (empty if it does not answer)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for m in re.finditer(r"^([a-z_]+) ([0-9.e+-]+)$", text, re.MULTILINE):
        out[m.group(1)] = float(m.group(2))
    return out


def _idle_status(idle: Proc) -> tuple[int, dict[str, int], int]:
    """The idle client's last status line: listens sent, answers by status, errors."""
    lines = re.findall(r"(\d+) listens sent, answers (\{[^}]*\}), (\d+) errors", idle.output())
    if not lines:
        return 0, {}, 0
    sent, answers, errors = lines[-1]
    return int(sent), {str(k): int(v) for k, v in ast.literal_eval(answers).items()}, int(errors)


def _probe(port: int, requests: int) -> dict[str, Any]:
    """`requests` GETs of the probe's file on one kept-alive connection: p50 and p99 in ms.

    A request that gets no answer within PROBE_TIMEOUT_SECS (a relay whose
    gunicorn stopped accepting) counts as "no answer"; after MAX_UNANSWERED
    of them the probe gives up.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_SECS)
    times = []
    statuses: dict[str, int] = {}
    unanswered = 0
    for _ in range(requests):
        started = time.perf_counter()
        try:
            conn.request("GET", f"/frontend/servers/{PROBE}/files/{PROBE_FILE}")
            r = conn.getresponse()
            body = r.read()
            status = str(r.status)
        except OSError as e:
            status, body = f"no answer ({type(e).__name__})", b""
            unanswered += 1
        times.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1
        if status != "200" or len(body) != 1024:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_SECS)
        if unanswered >= MAX_UNANSWERED:
            break
    conn.close()
    times.sort()
    return {"p50_ms": round(1000 * statistics.median(times), 2),
            "p99_ms": round(1000 * times[min(len(times) - 1, int(len(times) * 0.99))], 2),
            "statuses": statuses, "requests": len(times)}


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _open_connections(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    return socks


class FleetRun:
    """One N: a relay, the probe, the idle servers; what they measured."""

    def __init__(self, code: Path, work: Path, root: Path, args: argparse.Namespace) -> None:
        self.code, self.work, self.root, self.args = code, work, root, args
        self.procs: list[Proc] = []

    def start(self, what: str, proc_args: list[str]) -> Proc:
        proc = Proc(proc_args, self.work / f"{what}.log", cwd=self.code)
        self.procs.append(proc)
        return proc

    def run(self, servers: int) -> dict[str, Any]:
        idle_keys = {f"idle-{i:05d}": procs.new_key(f"idle-{i:05d}") for i in range(servers)}
        probe_key = procs.new_key(PROBE)
        config = self.work / f"relay-{servers}.toml"
        config.write_text(relay_config({PROBE: probe_key, **idle_keys}, self.code, self.args.relay_extra))
        progress(f"N = {servers}: starting a relay with {servers + 1} servers registered")
        relay, port = procs.start_relay(config, self.work / f"relay-{servers}.log", cwd=self.code,
                                        deadline=120)
        self.procs.append(relay)
        url = f"http://127.0.0.1:{port}"
        server_config = procs.write_server_config(self.work / f"probe-{servers}.toml", PROBE, probe_key, url,
                                                  self.root)
        probe = procs.start_server(server_config, self.work / f"probe-{servers}.log", cwd=self.code)
        self.procs.append(probe)
        procs.wait_for_server(url, PROBE, probe, 60)
        worker = procs.gunicorn_worker(relay)
        _probe(port, WARMUP_REQUESTS)
        log_lines_before = len(relay.output().splitlines())
        rss_before = memory_kib(worker)["VmRSS"]
        result: dict[str, Any] = {"servers": servers, "rss_before_mib": round(rss_before / 1024, 1)}
        idle = None
        if servers:
            keys_file = self.work / f"idle-keys-{servers}.json"
            keys_file.write_text(json.dumps(idle_keys))
            progress(f"N = {servers}: parking {servers} idle servers' listens over {self.args.ramp_secs:g} s")
            idle = self.start(f"idle-{servers}", [
                sys.executable, str(BENCH / "idle_servers.py"), "--relay", url, "--keys", str(keys_file),
                "--ramp-secs", str(self.args.ramp_secs), "--duration-secs", "3600",
                *(["--spec-002"] if self.args.spec_002 else [])])
            started = time.monotonic()
            want = servers + PROBE_LISTENS
            deadline = started + self.args.ramp_secs + PARK_GRACE_SECS
            parked: float | None = None
            while time.monotonic() < deadline:
                idle.check_alive()
                parked = _metrics(url).get("ptth_listeners_waiting")  # None: /metrics did not answer
                if parked is not None and parked >= want:
                    break
                time.sleep(1)
            result["park_secs"] = round(time.monotonic() - started, 1)
            result["parked"] = None if parked is None else int(parked)
            if parked is None or parked < want:
                progress(f"N = {servers}: {'an unknown number (no answer to /metrics)' if parked is None else parked}"
                         f" of {want} listens parked after {result['park_secs']:g} s; measuring what there is")
            time.sleep(2)
            rss_parked = memory_kib(worker)["VmRSS"]
            result["rss_parked_mib"] = round(rss_parked / 1024, 1)
            if parked:
                result["rss_per_listen_kib"] = round((rss_parked - rss_before) / max(1, parked - PROBE_LISTENS), 1)
        progress(f"N = {servers}: relay CPU over {self.args.idle_secs:g} s of idleness")
        sent0 = _idle_status(idle)[0] if idle else 0
        (user0, sys0), t0 = cpu_times(worker), time.monotonic()
        time.sleep(self.args.idle_secs)
        (user1, sys1), t1 = cpu_times(worker), time.monotonic()
        cpu0, cpu1 = user0 + sys0, user1 + sys1
        sent1 = _idle_status(idle)[0] if idle else 0
        result["idle_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 2)
        result["idle_cpu_sys_pct"] = round(100 * (sys1 - sys0) / (t1 - t0), 2)
        result["relistens_per_sec"] = round((sent1 - sent0) / (t1 - t0), 1)
        if sent1 > sent0:
            result["cpu_ms_per_relisten"] = round(1000 * (cpu1 - cpu0) / (sent1 - sent0), 3)
        progress(f"N = {servers}: {self.args.requests} requests to the probe")
        cpu0 = sum(cpu_times(worker))
        result["probe"] = _probe(port, self.args.requests)
        if result["probe"]["statuses"].get("200"):
            result["probe"]["relay_cpu_us_per_request"] = round(
                1e6 * (sum(cpu_times(worker)) - cpu0) / result["probe"]["requests"])
        if self.args.connections:
            progress(f"N = {servers}: {self.args.connections} idle connections")
            rss0, files0 = memory_kib(worker)["VmRSS"], _open_files(worker)
            socks = _open_connections(port, self.args.connections)
            time.sleep(CONNS_SETTLE_SECS)
            rss1, files1 = memory_kib(worker)["VmRSS"], _open_files(worker)
            for s in socks:
                s.close()
            result["connections_opened"] = len(socks)
            result["connections_accepted"] = files1 - files0  # by the relay: the rest wait in the kernel
            if files1 > files0:
                result["rss_per_connection_kib"] = round((rss1 - rss0) / (files1 - files0), 1)
        if idle is not None:
            _, answers, errors = _idle_status(idle)
            result["idle_answers"] = answers
            result["idle_errors"] = errors
        result["rss_end_mib"] = round(memory_kib(worker)["VmRSS"] / 1024, 1)
        result["relay_log_lines"] = len(relay.output().splitlines()) - log_lines_before
        result["relay_metrics"] = {k: v for k, v in _metrics(url).items()
                                   if k.startswith(("ptth_connections", "ptth_listeners", "ptth_servers_online",
                                                    "ptth_refused"))}
        progress(f"N = {servers}: {json.dumps(result)}")
        return result

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate(STOP_SECS)
        self.procs.clear()


def _table(results: list[dict[str, Any]]) -> str:
    rows = [
        ("listens parked (of N + 2 probe)",
         lambda r: "no answer from /metrics" if "parked" in r and r["parked"] is None else str(r.get("parked", 2))),
        ("time to park them, s", lambda r: f"{r['park_secs']:g}" if "park_secs" in r else "-"),
        ("relay RSS before / parked, MiB", lambda r: f"{r['rss_before_mib']:g} / {r.get('rss_parked_mib', '-')}"),
        ("RSS per parked listen, KiB", lambda r: f"{r['rss_per_listen_kib']:g}" if "rss_per_listen_kib" in r else "-"),
        ("RSS per open connection, KiB", lambda r: f"{r.get('rss_per_connection_kib') or '-'}"),
        ("connections the relay accepted, of those opened",
         lambda r: f"{r['connections_accepted']} of {r['connections_opened']}" if "connections_opened" in r else "-"),
        ("relay CPU while idle, % of a core (of it in the kernel)",
         lambda r: f"{r['idle_cpu_pct']:g} ({r['idle_cpu_sys_pct']:g})"),
        ("re-listens per second", lambda r: f"{r['relistens_per_sec']:g}"),
        ("relay CPU per re-listen, ms", lambda r: f"{r.get('cpu_ms_per_relisten', '-')}"),
        ("probe 1 KiB p50 / p99, ms", lambda r: f"{r['probe']['p50_ms']:g} / {r['probe']['p99_ms']:g}"),
        ("relay CPU per probe request, µs", lambda r: str(r["probe"].get("relay_cpu_us_per_request", "-"))),
        ("probe answers", lambda r: ", ".join(f"{k}: {v}" for k, v in r["probe"]["statuses"].items())),
        ("idle listens' answers", lambda r: ", ".join(f"{k}: {v}" for k, v in r.get("idle_answers", {}).items())
         + (f", errors: {r['idle_errors']}" if r.get("idle_errors") else "") or "-"),
        ("relay log lines", lambda r: str(r["relay_log_lines"])),
        ("relay's max_connections",
         lambda r: f"{r['relay_metrics']['ptth_connections_max']:,.0f}" if "ptth_connections_max" in r["relay_metrics"]
         else "-"),
    ]
    head = "| N idle servers | " + " | ".join(f"{r['servers']:,}" for r in results) + " |"
    out = [head, "|---|" + "---:|" * len(results)]
    for label, cell in rows:
        out.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="0,1000,5000,10000", help="comma-separated N, run in this order")
    parser.add_argument("--rev", help="git revision to measure (default: the working tree)")
    parser.add_argument("--requests", type=int, default=1000, help="GETs of the probe's file per N")
    parser.add_argument("--ramp-secs", type=float, default=30.0, help="spread the idle servers' first listens")
    parser.add_argument("--idle-secs", type=float, help="CPU window: a whole listen timeout (default 120; 30 with "
                        "--spec-002)")
    parser.add_argument("--connections", type=int, default=2000, help="idle connections for RSS per connection")
    parser.add_argument("--relay-extra", default="", help="TOML added to the relay config")
    parser.add_argument("--spec-002", action="store_true", help="idle servers announcing no PTTH feature")
    args = parser.parse_args()
    if args.idle_secs is None:
        args.idle_secs = 30.0 if args.spec_002 else 120.0
    counts = [int(n.replace("_", "")) for n in args.servers.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = []
    with tempfile.TemporaryDirectory(prefix="ptth-fleet-") as tmp:
        work = Path(tmp)
        code_info = snapshot_code(args.rev, work / "code")
        root = work / "root"
        root.mkdir()
        (root / PROBE_FILE).write_bytes(os.urandom(1024))
        for n in counts:
            run = FleetRun(work / "code", work, root, args)
            try:
                results.append(run.run(n))
            except (BenchError, ProcError) as e:
                print(f"bench/fleet.py: N = {n}: {e}", file=sys.stderr)
                return 1
            finally:
                run.stop()
    report = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "code": code_info,
              "machine": f"{os.cpu_count()} cores, {platform.platform()}", "nofile": hard, "args": vars(args),
              "results": results}
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{report['date']}, code {code_info['commit']} ({code_info['source']}"
          f"{', dirty' if code_info['dirty'] else ''}), {report['machine']}, open files {hard}\n")
    print(_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
