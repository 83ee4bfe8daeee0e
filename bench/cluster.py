"""The relay as a cluster (CLUSTER.md section 8): CPU per request, throughput, bulk across hosts.

    .venv/bin/python bench/cluster.py [--quick] [--runs N] [--only small,bulk]
        [--rev REVISION] [--profile | --profile-only] [--noise-budget SECS]

Starts, on 127.0.0.1, side by side and all at once (each with its own
ptth_server serving the suite's test files):

  single     the relay as today: no redis_url, gunicorn -w 1
  cluster-1  redis_url set, gunicorn -w 1, its own redis-server
  cluster-2  the same with -w 2
  cluster-4  the same with -w 4
  hosts      two gunicorns (two "hosts", -w 1 each, two ports) sharing one
             redis-server; the server connects to host A, the client
             downloads from host B, so every byte crosses a peer link

Each redis-server is Debian's, run as CLUSTER.md says (`--save ''
--appendonly no`). Then, alternating between setups (the order rotating
from run to run, at least twice each, after waiting for a quiet machine as
bench/run.py does; measure.py):

  small  the 1 KiB file with wrk at concurrency 32 on single and cluster-1,
         -2, -4: requests/s, and CPU per request summed over every relay
         process (gunicorn master and workers) and redis-server, from
         /proc/PID/stat over the measured window only; the ptth_server's
         CPU per request apart (it is the same work in every setup)
  bulk   the 1 GiB file with curl, single against hosts: MiB/s, CPU per MiB;
         the server's log then shows that every request of the hosts setup
         was owned by host B's node while the server listened at host A

and prints the table, the issue's targets (cluster CPU per request <= 1.5x
single; bulk across hosts >= 50 % of single) and the projection to an
N-core host: requests/s ~ N / (relay CPU per request), capped by
redis-server's one thread at 1 / (redis-server CPU per request). Every run
goes to bench/cluster-results.json. With --profile (py-spy, not a project
requirement), it then samples the workers of single, cluster-2 and cluster-4
under the small load and both hosts under bulk: bench/profile-cluster-*.txt.

Shares the suite's parts: targets.py (the processes, on a copy of the code),
scenarios.py and load.py (wrk, curl), measure.py (CPU, noise, alternation),
report.py (medians, the machine), profiling.py (py-spy summaries).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import measure
from load import curl, wrk
from plan import BENCH, FILES, MIB, QUICK_PLAN, SERVER_NAME, STARTED, BenchError, Plan, progress
from profiling import PROFILE_DIR, PROFILE_RATE_HZ, _py_spy, summarize_profile
from report import add_medians, machine_info
from scenarios import scenario_bulk, wrk_scenario
from targets import (
    STARTUP_DEADLINE_SECS,
    Endpoint,
    Proc,
    Targets,
    Tunnel,
    ensure_tools,
    prepare_data,
    procs,
    run_command,
    snapshot_code,
)

# Workers of the cluster setups of `small` (gunicorn -w N).
CLUSTER_WORKERS = (1, 2, 4)
# The cluster setups --profile samples (cluster-1 has no crossing to show).
PROFILED_WORKERS = (2, 4)
# Concurrency of `small`: the figure CLUSTER.md's budget is written for.
CONNECTIONS = 32
# Where the bench's relay nodes listen for each other; each takes the first free
# port. Apart from the tests' ranges (42000-) and the example config's (41000-).
PEER_BIND = "127.0.0.1:44000-44199"
# A run of `small` with more non-2xx answers than this (or any timeout) failed: its figures
# are shown, but left out of the medians.
MAX_ERROR_SHARE = 0.01
# Before each run, a setup gets this long to answer a request again (after a failed run).
RECOVERY_SECS = 60.0
# The targets.
CPU_RATIO_TARGET = 1.5
BULK_SHARE_TARGET = 0.50
# The window over which the setups' CPU without load is measured (their fixed cost).
IDLE_SECS = 10.0
# Host sizes the projection is shown for.
PROJECTED_CORES = (2, 4, 8, 16, 32, 64)
# Runs per setup and scenario by default (each is 10 s of wrk or 1 GiB): alternating, medians.
DEFAULT_RUNS = 2
# A node's start in its relay's log: its pid and its id, with which the ids of the
# requests it owns start (CLUSTER.md decision 1).
NODE_UP = re.compile(r"relay node \S+?/(\d+)/(\w+) up")


@dataclass
class Setup:
    """One way the relay runs: its gunicorns, its redis-server (if any) and its ptth_server."""

    name: str
    relays: list[Tunnel]  # host A first; the server listens there
    redis: Proc | None
    client_url: str  # where the client connects: the last relay (host B for `hosts`)

    def pids(self) -> dict[str, int]:
        """Every process doing the work, by name: relay-* (masters, workers), redis, server."""
        out: dict[str, int] = {}
        for i, tunnel in enumerate(self.relays):
            prefix = "relay-" if len(self.relays) == 1 else f"relay-{'ab'[i]}-"
            out.update(tunnel.relay_pids(prefix))
        if self.redis is not None:
            out["redis"] = self.redis.pid
        out["server"] = self.relays[0].server.pid
        return out

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, f"{self.client_url}/frontend/servers/{SERVER_NAME}/files/", self.ready_pids)

    def ready_pids(self) -> dict[str, int]:
        """pids(), once the setup answers a request (measure.py calls it just before each run).

        A run that failed (the server offline to the cluster) must not spill
        into the next: wait for the setup to serve the small file again.
        """
        url = f"{self.client_url}/frontend/servers/{SERVER_NAME}/files/{FILES['small'][0]}"
        started = time.monotonic()
        while procs.http_status(url, timeout=5) != 200:
            if time.monotonic() - started > RECOVERY_SECS:
                progress(f"warning: {self.name} still does not answer after {RECOVERY_SECS:.0f} s; measuring anyway")
                break
            time.sleep(0.5)
        else:
            if time.monotonic() - started > 1:
                progress(f"{self.name}: answered again after {time.monotonic() - started:.0f} s")
        return self.pids()


def start_redis(targets: Targets) -> tuple[Proc, str]:
    """Debian's redis-server on a free loopback port, without persistence (CLUSTER.md section 6); its URL."""
    targets.counter += 1
    folder = targets.work / f"redis-{targets.counter}"
    folder.mkdir()
    port = procs.free_port()
    proc = targets.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(folder)], "redis")
    proc.wait_for_output(r"Ready to accept connections", STARTUP_DEADLINE_SECS)
    return proc, f"redis://127.0.0.1:{port}/0"


def cluster_config(redis_url: str) -> str:
    return f'redis_url = "{redis_url}"\npeer_bind = "{PEER_BIND}"\n'


def wait_for_nodes(relay: Proc, workers: int) -> None:
    """Until each of the relay's `workers` has said it is up as a cluster node."""
    relay.wait_for_output(r"(?s)(relay node \S+ up.*){" + str(workers) + "}", STARTUP_DEADLINE_SECS)


def start_single(targets: Targets) -> Setup:
    tunnel = targets.start_tunnel({})
    return Setup("single", [tunnel], None, tunnel.url)


def start_cluster(targets: Targets, workers: int) -> Setup:
    """gunicorn -w `workers` on its own redis-server, with its ptth_server."""
    redis, redis_url = start_redis(targets)
    key = procs.new_key(SERVER_NAME)
    relay, url = targets.start_relay({SERVER_NAME: key}, cluster_config(redis_url), ["-w", str(workers)])
    wait_for_nodes(relay, workers)
    server = targets.start_server(url, key)
    return Setup(f"cluster-{workers}", [Tunnel(relay, server, url)], redis, url)


def start_hosts(targets: Targets) -> Setup:
    """Two gunicorns (-w 1 each) on one redis-server; the server at A; the client will use B."""
    redis, redis_url = start_redis(targets)
    key = procs.new_key(SERVER_NAME)
    started = [targets.start_relay({SERVER_NAME: key}, cluster_config(redis_url), ["-w", "1"]) for _ in "ab"]
    for relay, _url in started:
        wait_for_nodes(relay, 1)
    (relay_a, url_a), (relay_b, url_b) = started
    server = targets.start_server(url_a, key)
    procs.wait_for_server(url_b, SERVER_NAME, server, STARTUP_DEADLINE_SECS)  # B sees it through Redis
    return Setup("hosts", [Tunnel(relay_a, server, url_a), Tunnel(relay_b, server, url_b)], redis, url_b)


def idle_cpu(setups: dict[str, Setup], secs: float) -> dict[str, dict[str, float]]:
    """% of a core each setup's relay processes, redis-server and server take with no load.

    The cluster's fixed cost (heartbeats, the dispatcher's blocking reads, the
    ticks), measured for every setup over one window.
    """
    measure.wait_for_quiet("idle")
    pids = {name: s.pids() for name, s in setups.items()}
    before = {name: {k: measure.cpu_seconds(pid) for k, pid in p.items()} for name, p in pids.items()}
    started = time.monotonic()
    time.sleep(secs)
    wall = time.monotonic() - started
    out = {}
    for name, p in pids.items():
        used = {k: measure.cpu_seconds(pid) - before[name][k] for k, pid in p.items()}
        out[name] = {kind: round(100 * sum(v for k, v in used.items() if k.startswith(kind)) / wall, 2)
                     for kind in ("relay", "redis", "server")}
    return out


def posts_reached(setup: Setup) -> dict[str, int]:
    """The setup's response POSTs so far by where they landed (ptth_response_posts_total, all nodes):
    at the worker holding the client ("owner") or carried to it over a peer link ("carried")."""
    with urllib.request.urlopen(setup.client_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    posts = {"owner": 0, "carried": 0}
    for reached, value in re.findall(r'^ptth_response_posts_total\{[^}]*reached="(\w+)"[^}]*\} (\S+)$', text, re.MULTILINE):
        posts[reached] = posts.get(reached, 0) + int(float(value))
    return posts


def crossing_check(setup: Setup) -> dict[str, Any]:
    """How many of the server's bulk requests were owned by host B's node while it listened at A."""
    b_nodes = [m.group(2) for m in NODE_UP.finditer(setup.relays[1].relay.output())]
    a_nodes = [m.group(2) for m in NODE_UP.finditer(setup.relays[0].relay.output())]
    ids = re.findall(r"request (\S+) from \S+: GET /files/" + re.escape(FILES["bulk"][0]),
                     setup.relays[0].server.output())
    owned_by_b = sum(1 for i in ids if any(i.startswith(n) for n in b_nodes))
    return {"host_a_nodes": a_nodes, "host_b_nodes": b_nodes, "bulk_requests": len(ids),
            "owned_by_host_b": owned_by_b}


# ---- figures ------------------------------------------------------------------------------


def _keys(run: dict[str, Any], kind: str) -> list[str]:
    return [k for k in run["cpu_pct"] if k.startswith(kind)]


def cpu_secs(run: dict[str, Any], kind: str) -> float:
    """CPU seconds over the measured window of the processes whose names start with `kind`."""
    return float(sum(run["cpu_pct"][k] for k in _keys(run, kind)) / 100 * run["wall_secs"])


def small_figures(run: dict[str, Any]) -> dict[str, Any]:
    """Answers (2xx) per second and CPU per answer in ms: relay processes, redis-server, both, ptth_server.

    Only 2xx answers count: an error answered at once (502 "offline") costs
    the relay little and would flatter its CPU per request. A run with more
    than MAX_ERROR_SHARE of errors, or any timeout, is marked failed.
    """
    errors = run.get("errors", {})
    answered = run["requests"] - errors.get("status", 0)
    share = errors.get("status", 0) / run["requests"] if run["requests"] else 1.0
    per = max(answered, 1)
    relay, redis, server = (1000 * cpu_secs(run, k) / per for k in ("relay", "redis", "server"))
    return {"rps": run["rps"] * answered / run["requests"] if run["requests"] else 0.0,
            "relay_ms": relay, "redis_ms": redis, "cluster_ms": relay + redis, "server_ms": server,
            "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"], "others_pct": run["machine_pct"]["others"],
            "error_share": share, "timeouts": errors.get("timeout", 0),
            "failed": share > MAX_ERROR_SHARE or errors.get("timeout", 0) > 0}


def bulk_figures(run: dict[str, Any], size: int) -> dict[str, Any]:
    """MiB/s and CPU per MiB in ms: relay processes, redis-server, both, and ptth_server (curl checked the size)."""
    mib = size / MIB
    relay, redis, server = (1000 * cpu_secs(run, k) / mib for k in ("relay", "redis", "server"))
    return {"mib_s": run["mib_s"], "relay_ms": relay, "redis_ms": redis, "cluster_ms": relay + redis,
            "server_ms": server, "others_pct": run["machine_pct"]["others"], "failed": False}


def per_setup(runs: dict[str, list[dict[str, Any]]],
              figures: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each setup: every run's figures, and their medians over the runs that did not fail.

    If every run failed, the medians are over all of them, and "all_failed" says so.
    """
    out = {}
    for name, rs in runs.items():
        each = [figures(r) for r in rs]
        kept = [f for f in each if not f["failed"]] or each
        numbers = [k for k, v in each[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
        out[name] = {"runs": each, "median": {k: statistics.median(f[k] for f in kept) for k in numbers},
                     "noisy_runs": sum(1 for r in rs if r.get("noisy")),
                     "failed_runs": sum(1 for f in each if f["failed"]),
                     "all_failed": all(f["failed"] for f in each)}
    return out


def projection(small: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """CLUSTER.md "Projection to N cores", from each cluster setup's medians of the same run."""
    out = {}
    for name, s in small.items():
        if not name.startswith("cluster-"):
            continue
        relay_ms, redis_ms = s["median"]["relay_ms"], s["median"]["redis_ms"]
        per_core = 1000 / relay_ms
        cap = 1000 / redis_ms if redis_ms > 0 else float("inf")
        out[name] = {"per_core_rps": per_core, "redis_cap_rps": cap, "cap_binds_above_cores": relay_ms / redis_ms,
                     "by_cores": {n: {"rps": min(n * per_core, cap),
                                      "binds": "redis-server" if n * per_core > cap else "relay cores"}
                                  for n in PROJECTED_CORES}}
    return out


def targets_met(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    small = results.get("small")
    if small and "single" in small:
        single = small["single"]["median"]["cluster_ms"]
        for n in CLUSTER_WORKERS:
            name = f"cluster-{n}"
            if name in small:
                ratio = small[name]["median"]["cluster_ms"] / single
                failed = small[name]["all_failed"] or small["single"]["all_failed"]
                out.append({"target": f"{name}: CPU per request (relay + redis-server) <= {CPU_RATIO_TARGET}x single",
                            "value": ratio, "met": None if failed else ratio <= CPU_RATIO_TARGET})
    bulk = results.get("bulk")
    if bulk:
        share = bulk["hosts"]["median"]["mib_s"] / bulk["single"]["median"]["mib_s"]
        out.append({"target": f"bulk across hosts >= {BULK_SHARE_TARGET:.0%} of single-process bulk",
                    "value": share, "met": share >= BULK_SHARE_TARGET})
    return out


# ---- the printed report ---------------------------------------------------------------------


def _both(s: dict[str, Any], key: str, digits: int) -> str:
    """The median, then every run in brackets: "1.23 (1.20 / 1.26)"."""
    runs = " / ".join(f"{r[key]:,.{digits}f}" for r in s["runs"])
    return f"{s['median'][key]:,.{digits}f} ({runs})"


def _failures(s: dict[str, Any]) -> str:
    """ "1 of 3 (45 %, 32)": runs failed, and each failed run's share of non-2xx and its timeouts."""
    bad = [f"{r['error_share']:.0%}, {r['timeouts']}" for r in s["runs"] if r["failed"]]
    if not bad:
        return "0"
    return f"{len(bad)} of {len(s['runs'])} ({'; '.join(bad)})" + (": medians over all" if s["all_failed"] else "")


def report(results: dict[str, Any]) -> str:
    lines = []
    small = results.get("small")
    if small:
        single = small["single"]["median"]
        base = small.get("cluster-1", {}).get("median")
        lines += [f"small 1 KiB, wrk concurrency {CONNECTIONS}: median (each run); CPU in ms per request", "",
                  ("| setup | requests/s | vs cluster-1 | relay CPU | redis-server CPU | relay + redis | "
                  "vs single | ptth_server CPU | p50 ms | noisy runs | failed runs (non-2xx, timeouts) |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, s in small.items():
            m = s["median"]
            vs1 = f"{m['rps'] / base['rps']:.2f}" if base else "-"
            lines.append(f"| {name} | {_both(s, 'rps', 0)} | {vs1} | {_both(s, 'relay_ms', 3)} | "
                         f"{_both(s, 'redis_ms', 3)} | {_both(s, 'cluster_ms', 3)} | "
                         f"{m['cluster_ms'] / single['cluster_ms']:.2f} | {_both(s, 'server_ms', 3)} | "
                         f"{m['p50_ms']:.1f} | {s['noisy_runs']} | {_failures(s)} |")
    reached = results.get("posts_reached")
    if reached:
        lines += ["", "response POSTs that landed on the worker holding their client (the rest were carried "
                  "over a peer link): " + "; ".join(
                      f"{name} {p['owner'] / max(1, p['owner'] + p['carried']):.0%} of {p['owner'] + p['carried']:,}"
                      for name, p in reached.items())]
    bulk = results.get("bulk")
    if bulk:
        single = bulk["single"]["median"]
        lines += ["", "bulk 1 GiB, curl: median (each run); CPU in ms per MiB", "",
                  "| setup | MiB/s | vs single | relay CPU | redis-server CPU | ptth_server CPU | noisy runs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in bulk.items():
            if name == "crossing":
                continue
            lines.append(f"| {name} | {_both(s, 'mib_s', 0)} | {s['median']['mib_s'] / single['mib_s']:.2f} | "
                         f"{_both(s, 'relay_ms', 2)} | {_both(s, 'redis_ms', 3)} | {_both(s, 'server_ms', 2)} | "
                         f"{s['noisy_runs']} |")
        c = bulk["crossing"]
        lines.append(f"\nhosts: {c['owned_by_host_b']} of {c['bulk_requests']} bulk requests at the server were "
                     f"owned by host B's node {c['host_b_nodes']} (the server listened at host A, "
                     f"{c['host_a_nodes']})")
    proj = results.get("projection")
    if proj:
        lines += ["", ("projection to an N-core host: requests/s ~ N / relay CPU per request, "
                  "capped at 1 / redis-server CPU per request"), "",
                  "| from | per core | redis-server cap | cap binds above | "
                  + " | ".join(f"{n} cores" for n in PROJECTED_CORES) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(PROJECTED_CORES)]
        for name, p in proj.items():
            cells = [f"{c['rps']:,.0f}{' (redis)' if c['binds'] == 'redis-server' else ''}"
                     for c in p["by_cores"].values()]
            lines.append(f"| {name} | {p['per_core_rps']:,.0f} | {p['redis_cap_rps']:,.0f} | "
                         f"{p['cap_binds_above_cores']:.0f} cores | " + " | ".join(cells) + " |")
    idle = results.get("idle_cpu_pct")
    if idle:
        lines += ["", "without load, % of one core: "
                  + "; ".join(f"{name} relay {v['relay']:.1f}, redis {v['redis']:.1f}, server {v['server']:.1f}"
                              for name, v in idle.items())]
    lines += ["", "| target | value | |", "|---|---:|---|"]
    for t in results["targets"]:
        shown = f"{t['value']:.0%}" if "bulk" in t["target"] else f"{t['value']:.2f}x"
        verdict = "every run failed: not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
        lines.append(f"| {t['target']} | {shown} | {verdict} |")
    bg = results["noise"]
    lines.append(f"\nother processes: median {bg['median']:.0f} %, max {bg['max']:.0f} % of a core during "
                 f"the {bg['runs']} runs kept; {bg['noisy_kept']} kept above {measure.NOISY_OTHERS_PCT:.0f} %; "
                 f"{bg['secs_waited_or_repeated']:.0f} s spent waiting for quiet or repeating")
    return "\n".join(lines)


def noise(raw: dict[str, Any]) -> dict[str, Any]:
    runs = [r for scenario in raw.values() for rs in scenario.values() for r in rs]
    others = [r["machine_pct"]["others"] for r in runs] or [0.0]
    return {"runs": len(runs), "median": statistics.median(others), "max": max(others),
            "noisy_kept": sum(1 for r in runs if r.get("noisy")),
            "secs_waited_or_repeated": measure.NoiseBudget.spent}


# ---- profiles (py-spy) ---------------------------------------------------------------------


def profile(plan: Plan, setups: dict[str, Setup], code: Path) -> dict[str, str]:
    """py-spy on every relay worker of single, cluster-2 and cluster-4 under `small`, and of hosts under bulk."""
    py_spy = _py_spy()
    PROFILE_DIR.mkdir(exist_ok=True)
    secs = plan.profile_secs
    jobs: list[tuple[str, Setup, Callable[[Endpoint], dict[str, Any]]]] = []
    for name in ("single", *(f"cluster-{n}" for n in PROFILED_WORKERS)):
        if name in setups:
            jobs.append((f"small-c32-{name}", setups[name],
                         lambda e: wrk(e.url("small"), CONNECTIONS, secs + 1)))
    if "hosts" in setups:
        def bulk(e: Endpoint) -> dict[str, Any]:
            end = time.monotonic() + secs + 1
            speeds = []
            while time.monotonic() < end:
                speeds.append(curl(e.url("bulk"), FILES["bulk"][1])["mib_s"])
            return {"mib_s": statistics.median(speeds)}
        jobs.append(("bulk-hosts", setups["hosts"], bulk))
    written = {}
    for label, setup, load in jobs:
        endpoint = setup.endpoint()
        progress(f"profile: {label}, py-spy on every relay worker for {secs} s")
        workers = {k: pid for k, pid in setup.pids().items() if "worker" in k}
        raws = {k: PROFILE_DIR / f"profile-cluster-{label}-{k}.raw.txt" for k in workers}

        def sampled(load: Callable[[Endpoint], dict[str, Any]] = load, endpoint: Endpoint = endpoint,
                    workers: dict[str, int] = workers, raws: dict[str, Path] = raws) -> dict[str, Any]:
            spies = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(secs), "--rate",
                                       str(PROFILE_RATE_HZ), "--format", "raw", "--nonblocking", "-o", str(raws[k])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for k, pid in workers.items()]
            time.sleep(0.5)  # let py-spy attach
            figures = load(endpoint)
            for spy in spies:
                _, err = spy.communicate(timeout=60)
                if spy.returncode != 0:
                    raise BenchError(f"py-spy failed: {err[-1000:]}")
            return figures

        m = measure.measure(endpoint, sampled, f"profile {label}")
        together = PROFILE_DIR / f"profile-cluster-{label}-workers.raw.txt"
        together.write_text("".join(r.read_text() for r in raws.values()))
        cpu = sum(v for k, v in m["cpu_pct"].items() if k in workers)
        sys_cpu = sum(v for k, v in m["sys_pct"].items() if k in workers)
        cpu_line = ", ".join(f"{k} {v:.0f} %" for k, v in m["cpu_pct"].items())
        if label.startswith("bulk"):
            figure = f"{m['mib_s']:,.0f} MiB/s"
        else:
            non_2xx = m["errors"].get("status", 0)
            figure = f"{m['rps']:,.0f} requests/s, {non_2xx} of {m['requests']} not 2xx"
        text = [(f"# py-spy profile: {label}, {figure} while sampled; every relay worker ({len(workers)}), "
                "samples summed"),
                f"# {secs} s at {PROFILE_RATE_HZ} Hz per worker, --nonblocking; idle samples left out.",
                f"# CPU, 100 = one core: {cpu_line}; whole machine {m['machine_pct']['busy']:.0f} % of 200", ""]
        text += summarize_profile(together, "relay workers", cpu, sys_cpu, code)
        out = BENCH / f"profile-cluster-{label}.txt"
        out.write_text("\n".join(text) + "\n")
        written[label] = str(out)
    return written


# ---- the run -------------------------------------------------------------------------------


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], check=False, capture_output=True, text=True)
    m = re.search(r"v=(\S+)", out.stdout)
    return m.group(1) if m else out.stdout.strip()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start every setup, run the scenarios (and profiles) asked for, stop everything; the results."""
    global CONNECTIONS
    CONNECTIONS = args.connections
    plan = QUICK_PLAN if args.quick else Plan(runs_curl=args.runs, runs_wrk=args.runs)
    ensure_tools(need_nginx=False)
    if shutil.which("redis-server") is None:
        raise BenchError("the cluster benchmark needs Debian's redis-server: `sudo apt-get install redis-server`")
    measure.NOISE_BUDGET_SECS = args.noise_budget
    data = Path(args.data_dir)
    prepare_data(data)
    work = Path(tempfile.mkdtemp(prefix="ptth-bench-cluster-"))
    progress(f"logs and configs in {work}")
    targets = Targets(work, data, work / "code")
    machine = machine_info()
    machine["redis_server"] = redis_version()
    machine["versions"]["redis"] = metadata.version("redis")
    results: dict[str, Any] = {"machine": machine, "plan": {**plan.__dict__, "connections": CONNECTIONS}}
    raw: dict[str, Any] = {}
    ok = False
    try:
        code = results["code"] = snapshot_code(args.rev, targets.code)
        progress(f"code under test: {code['source']}, {code['commit']} {code['subject']!r}"
                 + (" plus uncommitted changes" if code["dirty"] else ""))
        if args.profile_only:
            args.profile, args.only = True, []
        wanted = [f"cluster-{n}" for n in CLUSTER_WORKERS if "small" in args.only
                  or (args.profile and n in PROFILED_WORKERS)]
        if "bulk" in args.only or args.profile:
            wanted.append("hosts")
        setups = {"single": start_single(targets)}
        for name in wanted:
            progress(f"starting {name}: " + ("two gunicorns (-w 1) on one redis-server" if name == "hosts"
                                             else f"gunicorn -w {name[8:]} on its own redis-server"))
            setups[name] = start_hosts(targets) if name == "hosts" else start_cluster(targets, int(name[8:]))
        progress(f"idle: every setup's CPU over {IDLE_SECS} s without load")
        results["idle_cpu_pct"] = idle_cpu(setups, IDLE_SECS)
        if "small" in args.only:
            endpoints = [setups[k].endpoint() for k in ("single", *(f"cluster-{n}" for n in CLUSTER_WORKERS))]
            raw["small"] = wrk_scenario(plan, endpoints, "small", CONNECTIONS)["runs"]
            results["small"] = per_setup(raw["small"], small_figures)
            # (one process counts none: every POST is at its client's worker)
            results["posts_reached"] = {name: posts_reached(setups[name]) for name in setups
                                        if name.startswith("cluster-")}
        if "bulk" in args.only:
            endpoints = [setups["single"].endpoint(), setups["hosts"].endpoint()]
            raw["bulk"] = scenario_bulk(targets, plan, endpoints)["runs"]
            results["bulk"] = per_setup(raw["bulk"], lambda r: bulk_figures(r, FILES["bulk"][1]))
            results["bulk"]["crossing"] = crossing_check(setups["hosts"])
        if args.profile:
            results["profiles"] = profile(plan, setups, targets.code)
        ok = True
    finally:
        targets.close()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            progress(f"logs kept in {work}")
    if "small" in results and "single" in results["small"]:
        results["projection"] = projection(results["small"])
    results["targets"] = targets_met(results)
    results["noise"] = noise(raw)
    results["raw_runs"] = add_medians({k: {"runs": v} for k, v in raw.items()})
    results["elapsed_secs"] = round(time.monotonic() - STARTED, 1)
    return results


def _parse_only(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(x not in ("small", "bulk") for x in names):
        raise argparse.ArgumentTypeError("choose from small, bulk")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/cluster.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run per setup: a smoke test, not figures")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per setup and scenario (>= 2)")
    parser.add_argument("--only", type=_parse_only, default=["small", "bulk"], metavar="small,bulk")
    parser.add_argument("--connections", type=int, default=CONNECTIONS,
                        help=f"wrk's concurrency for the small requests (default {CONNECTIONS}, the target's)")
    parser.add_argument("--profile", action="store_true", help="then sample the relay workers with py-spy")
    parser.add_argument("--profile-only", action="store_true", help="run no scenario, only the profiles")
    parser.add_argument("--rev", metavar="REVISION", help="benchmark this git revision instead of the working tree")
    parser.add_argument("--noise-budget", type=float, default=measure.NOISE_BUDGET_SECS, metavar="SECS",
                        help="at most this long in all waiting for a quiet machine and repeating noisy runs")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ptth-bench-data"),
                        help="where the random test files are written once and reused")
    parser.add_argument("--output", help="results file (JSON); default bench/cluster-results.json, "
                        "none with --profile-only")
    parser.add_argument("--keep", action="store_true", help="keep the logs and configs of the processes")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    code, results = run_command("bench/cluster.py", lambda: run(args))
    if results is None:
        return code
    output = args.output or (None if args.profile_only else str(BENCH / "cluster-results.json"))
    if output:
        Path(output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    m, c = results["machine"], results["code"]
    print(f"\nPTTH cluster benchmark, {m['date']}, {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, "
          f"redis-server {m['redis_server']}, redis-py {m['versions']['redis']}; code {c['commit']}"
          f"{' plus uncommitted changes' if c['dirty'] else ''}{' (QUICK: not figures)' if args.quick else ''}\n")
    print(report(results))
    print(f"\n{f'written {output}; ' if output else ''}{results['elapsed_secs']:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
