"""Two revisions of the tunnel side by side: CPU and time per small request.

    .venv/bin/python bench/compare.py --rev OLD [--rounds N] [--requests N]

Starts a relay (gunicorn, as deployed) and a ptth_server for the code of git
revision OLD and for the working tree, at once, on 127.0.0.1; then fetches a
1 KiB file through each, one request at a time, `--requests` per round,
alternating between them for `--rounds` rounds each (the order flips every
round). For each side it reports the medians over rounds of the relay
worker's and the server's CPU per request (from /proc/PID/stat) and of the
request time. Both sides share the machine at the same moments, so their
ratio means something even on a noisy machine; the absolute figures do not.

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
from pathlib import Path

from measure import cpu_seconds
from plan import REPO, BenchError
from targets import STOP_SECS, ProcError, procs, relay_config, snapshot_code

KEY = procs.new_key("alpha")


class Side:
    """A relay and a server running one revision's code."""

    def __init__(self, name: str, code: Path, work: Path, root: Path) -> None:
        self.name = name
        config = work / f"relay-{name}.toml"
        config.write_text(relay_config({"alpha": KEY}, code))
        relay, self.port = procs.start_relay(config, work / f"relay-{name}.log", cwd=code)
        self.procs = [relay]
        try:
            url = f"http://127.0.0.1:{self.port}"
            server_config = procs.write_server_config(work / f"server-{name}.toml", "alpha", KEY, url, root)
            server = procs.start_server(server_config, work / f"server-{name}.log", cwd=code)
            self.procs.append(server)
            procs.wait_for_server(url, "alpha", server)
            self.pids = (procs.gunicorn_worker(relay), server.pid)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def fetch(conn: http.client.HTTPConnection) -> int:
        conn.request("GET", "/frontend/servers/alpha/files/1k.bin")
        r = conn.getresponse()
        r.read()
        return r.status

    def round(self, requests: int) -> tuple[float, float, float]:
        """CPU ms per request of the relay worker and of the server, and the median request time in ms."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        before = [cpu_seconds(pid) for pid in self.pids]
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            assert self.fetch(conn) == 200
            times.append(time.perf_counter() - started)
        after = [cpu_seconds(pid) for pid in self.pids]
        conn.close()
        relay, server = ((a - b) / requests * 1000 for a, b in zip(after, before, strict=True))
        return relay, server, statistics.median(times) * 1000

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate(STOP_SECS)


def main() -> None:
    """Run both sides and print the table; a side that does not start is shown with its log."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the older revision (git), e.g. HEAD~3")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sides: list[Side] = []
        try:
            commit = snapshot_code(args.rev, work / "old")["commit"]
            root = work / "root"
            root.mkdir()
            (root / "1k.bin").write_bytes(os.urandom(1024))
            sides.append(Side("before", work / "old", work, root))
            sides.append(Side("after", REPO, work, root))
            for i in range(args.rounds):
                for side in sides if i % 2 == 0 else reversed(sides):
                    results[side.name].append(side.round(args.requests))
        except (BenchError, ProcError) as e:
            raise SystemExit(f"bench/compare.py: {e}") from None
        finally:
            for side in sides:
                side.stop()
    print(f"before = {args.rev} ({commit}), after = the working tree; {args.rounds} rounds of "
          f"{args.requests} requests each, alternating\n")
    print("| figure | before | after | change |\n|---|---:|---:|---:|")
    names = ("relay worker CPU per request, ms", "ptth_server CPU per request, ms", "median request time, ms")
    for i, name in enumerate(names):
        b = statistics.median(r[i] for r in results["before"])
        a = statistics.median(r[i] for r in results["after"])
        print(f"| {name} | {b:.2f} | {a:.2f} | {(a / b - 1) * 100:+.0f} % |")


if __name__ == "__main__":
    main()
