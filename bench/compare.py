"""Two revisions of the tunnel side by side, and direct serving: CPU and time per small request.

    .venv/bin/python bench/compare.py --rev OLD [--rounds N] [--requests N] [--wrk-secs S]

Starts a relay (gunicorn, as deployed) and a ptth_server for the code of git
revision OLD and for the working tree, at once, on 127.0.0.1, and a
ptth_file_server (the working tree's) serving the same folder directly. Then,
for `--rounds` rounds, each round in a new order, each of the three:
- fetches a 1 KiB file one request at a time, `--requests` of them
  (concurrency 1): the request time, and CPU per request of each process;
- runs wrk with 32 connections for `--wrk-secs` (concurrency 32):
  requests/s, and CPU per request of each process;
- downloads a file of `--bulk-mib` MiB with curl (0: not): MiB/s.
It reports the medians over rounds. The three share the machine at the same
moments, so their ratios mean something even on a noisy machine; the
absolute figures less. "Added" is the tunnel's median request time minus
direct serving's, at concurrency 1.

The relays run with `requests_per_address = 10000` where the code knows it:
one client, the suite's, is not what that policy is about.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from load import curl, wrk
from measure import cpu_seconds, machine_busy_pct, machine_ticks
from plan import MIB, REPO, BenchError
from targets import (
    STOP_SECS,
    ProcError,
    ensure_tools,
    procs,
    raise_nofile,
    relay_config,
    snapshot_code,
)

KEY = procs.new_key("alpha")
WRK_CONNECTIONS = 32
# A figure per round: name -> value.
Round = dict[str, float]


class Side:
    """What serves the 1 KiB file: a relay and a server running one revision's code, or the file server alone."""

    def __init__(self, name: str, code: Path, work: Path, root: Path, direct: bool = False) -> None:
        self.name = name
        self.procs: list[procs.Proc] = []
        try:
            if direct:
                server, base = procs.start_file_server(root, work / "file-server.log", cwd=code)
                self.procs.append(server)
                self.url = f"{base}/files/1k.bin"
                self.pids = {"server": server.pid}
                return
            config = work / f"relay-{name}.toml"
            config.write_text(relay_config({"alpha": KEY}, code))
            relay, port = procs.start_relay(config, work / f"relay-{name}.log", cwd=code)
            self.procs.append(relay)
            relay_url = f"http://127.0.0.1:{port}"
            server_config = procs.write_server_config(work / f"server-{name}.toml", "alpha", KEY, relay_url, root)
            server = procs.start_server(server_config, work / f"server-{name}.log", cwd=code)
            self.procs.append(server)
            procs.wait_for_server(relay_url, "alpha", server)
            self.url = f"{relay_url}/frontend/servers/alpha/files/1k.bin"
            self.pids = {"relay": procs.gunicorn_worker(relay), "server": server.pid}
        except BaseException:
            self.stop()
            raise

    def round(self, requests: int, wrk_secs: int, bulk_bytes: int) -> Round:
        """One round at concurrency 1, then one at concurrency 32, then the bulk download."""
        figures: Round = {}
        times: list[float] = []

        def one_at_a_time() -> int:
            host_port, path = self.url.removeprefix("http://").split("/", 1)
            conn = http.client.HTTPConnection(host_port, timeout=30)
            for _ in range(requests):
                started = time.perf_counter()
                conn.request("GET", "/" + path)
                r = conn.getresponse()
                if r.status != 200 or len(r.read()) != 1024:
                    raise BenchError(f"{self.name}: GET {self.url} answered {r.status}")
                times.append(time.perf_counter() - started)
            conn.close()
            return requests

        self._measure(figures, "c1", one_at_a_time)
        figures["c1 ms"] = statistics.median(times) * 1000
        self._measure(figures, "c32", lambda: int(wrk(self.url, WRK_CONNECTIONS, wrk_secs)["requests"]),
                      wrk_secs)
        if bulk_bytes:
            figures["bulk MiB/s"] = curl(self.url.replace("1k.bin", "bulk.bin"), bulk_bytes)["mib_s"]
        return figures

    def _measure(self, figures: Round, label: str, run: Callable[[], int], secs: float = 0) -> None:
        before = {what: cpu_seconds(pid) for what, pid in self.pids.items()}
        started = time.monotonic()
        count = run()
        wall = time.monotonic() - started
        for what, pid in self.pids.items():
            figures[f"{label} {what} us"] = (cpu_seconds(pid) - before[what]) / count * 1e6
        if secs:
            figures[f"{label} rps"] = count / wall

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate(STOP_SECS)


def _our_cpu(sides: list[Side]) -> float:
    """CPU seconds so far of the sides' processes, this script, and its finished children (curl, wrk)."""
    times = os.times()
    return (sum(cpu_seconds(pid) for side in sides for pid in side.pids.values())
            + times.user + times.system + times.children_user + times.children_system)


ROWS = (
    ("c32 rps", "1 KiB, concurrency 32, requests/s", "{:,.0f}"),
    ("c32 relay us", "relay CPU per request, c32, µs", "{:,.0f}"),
    ("c32 server us", "server CPU per request, c32, µs", "{:,.0f}"),
    ("c1 ms", "1 KiB, concurrency 1, median ms", "{:.2f}"),
    ("c1 relay us", "relay CPU per request, c1, µs", "{:,.0f}"),
    ("c1 server us", "server CPU per request, c1, µs", "{:,.0f}"),
    ("bulk MiB/s", "bulk download, MiB/s", "{:,.0f}"),
)


def main() -> None:
    """Run the three sides and print the table; a side that does not start is shown with its log."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the older revision (git), e.g. HEAD~3")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="requests per round at concurrency 1")
    parser.add_argument("--wrk-secs", type=int, default=5, help="seconds of wrk per round at concurrency 32")
    parser.add_argument("--bulk-mib", type=int, default=512, help="MiB of the bulk download (0: none)")
    args = parser.parse_args()
    results: dict[str, list[Round]] = {"before": [], "after": [], "direct": []}
    raise_nofile()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sides: list[Side] = []
        try:
            ensure_tools(need_nginx=False)
            commit = snapshot_code(args.rev, work / "old")["commit"]
            root = work / "root"
            root.mkdir()
            (root / "1k.bin").write_bytes(os.urandom(1024))
            with (root / "bulk.bin").open("wb") as f:
                for _ in range(args.bulk_mib):
                    f.write(os.urandom(MIB))
            sides.append(Side("before", work / "old", work, root))
            sides.append(Side("after", REPO, work, root))
            sides.append(Side("direct", REPO, work, root, direct=True))
            ours_before, ticks_before, started = _our_cpu(sides), machine_ticks(), time.monotonic()
            for i in range(args.rounds):
                for side in sides[i % 3:] + sides[:i % 3]:
                    results[side.name].append(side.round(args.requests, args.wrk_secs, args.bulk_mib * MIB))
            others = (machine_busy_pct(ticks_before, machine_ticks())
                      - 100 * (_our_cpu(sides) - ours_before) / (time.monotonic() - started))
        except (BenchError, ProcError) as e:
            raise SystemExit(f"bench/compare.py: {e}") from None
        finally:
            for side in sides:
                side.stop()
    medians = {name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
               for name, rounds in results.items()}
    before, after, direct = medians["before"], medians["after"], medians["direct"]
    print(f"before = {args.rev} ({commit}), after = the working tree, direct = ptth_file_server; "
          f"{args.rounds} rounds (concurrency 1: {args.requests} requests; 32: wrk for {args.wrk_secs} s), "
          f"medians; processes not ours took {others:.0f} % of a core on average\n")
    print("| figure | before | after | change | direct |\n|---|---:|---:|---:|---:|")
    for key, name, form in ROWS:
        if key not in after:
            continue
        shown = form.format(direct[key]) if key in direct else "-"
        print(f"| {name} | {form.format(before[key])} | {form.format(after[key])} | "
              f"{(after[key] / before[key] - 1) * 100:+.0f} % | {shown} |")
    for label, side in (("before", before), ("after", after)):
        bulk = f"; bulk {side['bulk MiB/s'] / direct['bulk MiB/s']:.2f}" if "bulk MiB/s" in side else ""
        print(f"\n{label}: tunnel / direct at c32 {side['c32 rps'] / direct['c32 rps']:.2f}; "
              f"added at c1 {side['c1 ms'] - direct['c1 ms']:+.2f} ms{bulk}")


if __name__ == "__main__":
    main()
