"""The suite's scenarios, each run against every target in turn (bench/run.py --only).

  bulk      one 1 GiB file with curl: MiB/s and time to first byte
  small     a 1 KiB file with wrk, concurrency 1 and 32: requests/s, p50, p99
  medium    a 256 KiB file with wrk, concurrency 32: requests/s
  parallel  8 concurrent 128 MiB downloads (curl): aggregate MiB/s
  idle      1,000 idle servers parked at a fresh relay (bench/idle_servers.py):
            relay RSS, and `small` at concurrency 1 without and with them

Each returns its runs per target ({"runs": {target: [run, ...]}}); the
report adds the medians.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from load import curl, curl_parallel, wrk
from measure import alternate, cpu_seconds, memory_kib
from plan import FILES, IDLE_SERVERS, PARALLEL_DOWNLOADS, SERVER_NAME, Plan, progress
from targets import STOP_SECS, Endpoint, Proc, Targets, procs

# 1,000 idle servers ramp up over IDLE_RAMP_SECS; all must be parked by then.
IDLE_RAMP_SECS = 5.0
IDLE_PARK_DEADLINE_SECS = 60.0


def scenario_bulk(targets: Targets, plan: Plan, endpoints: list[Endpoint]) -> dict[str, Any]:
    name, size = FILES["bulk"]
    for e in endpoints:
        progress(f"bulk: warm-up, {e.name}")
        curl(e.url("parallel"), FILES["parallel"][1])
    runs = alternate("bulk 1 GiB", endpoints, plan.runs_curl, lambda e: curl(e.url("bulk"), size))
    return {"file": name, "bytes": size, "runs": runs}


def scenario_parallel(targets: Targets, plan: Plan, endpoints: list[Endpoint]) -> dict[str, Any]:
    name, size = FILES["parallel"]
    for e in endpoints:
        progress(f"parallel: warm-up, {e.name}")
        curl(e.url("parallel"), size)
    runs = alternate(f"parallel {PARALLEL_DOWNLOADS} x 128 MiB", endpoints, plan.runs_curl,
                     lambda e: curl_parallel(e.url("parallel"), size, PARALLEL_DOWNLOADS))
    return {"file": name, "bytes": size, "downloads": PARALLEL_DOWNLOADS, "runs": runs}


def wrk_scenario(plan: Plan, endpoints: list[Endpoint], what: str, connections: int) -> dict[str, Any]:
    """wrk on the file `what` at `connections`: a warm-up per endpoint, then plan.runs_wrk rounds alternating."""
    label = f"{what} c{connections}"
    for e in endpoints:
        progress(f"{label}: warm-up, {e.name}")
        wrk(e.url(what), connections, plan.warmup_secs)
    runs = alternate(label, endpoints, plan.runs_wrk, lambda e: wrk(e.url(what), connections, plan.wrk_secs))
    return {"file": FILES[what][0], "connections": connections, "secs": plan.wrk_secs, "runs": runs}


def scenario_small(targets: Targets, plan: Plan, endpoints: list[Endpoint]) -> dict[str, Any]:
    return {"c1": wrk_scenario(plan, endpoints, "small", 1),
            "c32": wrk_scenario(plan, endpoints, "small", 32)}


def scenario_medium(targets: Targets, plan: Plan, endpoints: list[Endpoint]) -> dict[str, Any]:
    return {"c32": wrk_scenario(plan, endpoints, "medium", 32)}


def _listeners_waiting(relay_url: str) -> int:
    try:
        with urllib.request.urlopen(relay_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1
    m = re.search(r"^ptth_listeners_waiting (\S+)$", text, re.MULTILINE)
    return int(float(m.group(1))) if m else -1


def scenario_idle(targets: Targets, plan: Plan, endpoints: list[Endpoint]) -> dict[str, Any]:
    """A fresh relay with 1,000 more servers registered: small c1 without them parked, then with.

    Runs against that fresh tunnel and the direct endpoint of `endpoints`.
    """
    direct = next(e for e in endpoints if e.name == "direct")
    idle_keys = {f"idle-{i:04d}": procs.new_key(f"idle-{i:04d}") for i in range(IDLE_SERVERS)}
    progress(f"idle: starting a relay with {IDLE_SERVERS + 1} servers registered")
    tunnel = targets.start_tunnel(idle_keys)
    idle_client: Proc | None = None
    try:
        endpoint = Endpoint("tunnel", f"{tunnel.url}/frontend/servers/{SERVER_NAME}/files/",
                            lambda: {"relay": tunnel.worker_pid(), "server": tunnel.server.pid})
        pair = [endpoint, direct]
        progress("idle: warm-up")
        wrk(endpoint.url("small"), 1, plan.warmup_secs)
        rss_before = memory_kib(tunnel.worker_pid())["VmRSS"]
        without = alternate("idle: small c1 without idle servers", pair, plan.runs_wrk,
                            lambda e: wrk(e.url("small"), 1, plan.wrk_secs))

        keys_file = targets.work / "idle-keys.json"
        keys_file.write_text(json.dumps(idle_keys))
        progress(f"idle: parking {IDLE_SERVERS} idle servers' listens (bench/idle_servers.py)")
        duration = 120 + plan.runs_wrk * 2 * (plan.wrk_secs + 5)
        idle_client = targets.start_idle_servers(tunnel.url, keys_file, IDLE_RAMP_SECS, duration)
        parked_at = time.monotonic()
        procs.wait_until(lambda: _listeners_waiting(tunnel.url) >= IDLE_SERVERS, f"{IDLE_SERVERS} parked listens",
                         idle_client, deadline=IDLE_PARK_DEADLINE_SECS)
        park_secs = time.monotonic() - parked_at
        time.sleep(2)
        worker = tunnel.worker_pid()
        rss_parked = memory_kib(worker)["VmRSS"]
        cpu0, t0 = cpu_seconds(worker), time.monotonic()
        time.sleep(5)
        idle_cpu_pct = 100 * (cpu_seconds(worker) - cpu0) / (time.monotonic() - t0)
        parked_count = _listeners_waiting(tunnel.url)
        with_idle = alternate(f"idle: small c1 with {IDLE_SERVERS} idle servers", pair,
                              plan.runs_wrk, lambda e: wrk(e.url("small"), 1, plan.wrk_secs))
        parked_after = _listeners_waiting(tunnel.url)
        idle_client.check_alive()
        rss_end = memory_kib(worker)
        return {
            "servers": IDLE_SERVERS,
            "park_secs": round(park_secs, 1),
            "listeners_waiting": {"before_runs": parked_count, "after_runs": parked_after},
            "relay_rss_mib": {"before": round(rss_before / 1024, 1), "parked": round(rss_parked / 1024, 1),
                              "after_runs": round(rss_end["VmRSS"] / 1024, 1),
                              "peak_since_start": round(rss_end["VmHWM"] / 1024, 1)},
            "relay_cpu_pct_while_idle": round(idle_cpu_pct, 1),
            "without": without,
            "with": with_idle,
        }
    finally:
        if idle_client is not None:
            idle_client.terminate(STOP_SECS)
        tunnel.stop()


# By name, as --only takes them.
SCENARIO_RUNS: dict[str, Callable[[Targets, Plan, list[Endpoint]], dict[str, Any]]] = {
    "bulk": scenario_bulk,
    "small": scenario_small,
    "medium": scenario_medium,
    "parallel": scenario_parallel,
    "idle": scenario_idle,
}
