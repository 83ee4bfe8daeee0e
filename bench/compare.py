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
import base64
import http.client
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-compare-key-" + os.urandom(12).hex()


def tripcode(key: str) -> str:
    import blake3

    return base64.b64encode(blake3.blake3(key.encode()).digest()).decode()


def snapshot(rev: str, dest: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    data = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return commit[:12]


class Side:
    """A relay and a server running one revision's code."""

    def __init__(self, name: str, code: Path, work: Path, root: Path) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []
        knows_shares = "requests_per_address" in (code / "ptth_lib" / "config.py").read_text()
        config = work / f"relay-{name}.toml"
        config.write_text(("requests_per_address = 10000\n" if knows_shares else "")
                          + f'[[servers]]\nname = "alpha"\ntripcode = "{tripcode(KEY)}"\n')
        log = work / f"relay-{name}.log"
        relay = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "--bind",
                                  "127.0.0.1:0", "ptth_relay:app"], cwd=code, stdout=open(log, "wb"),  # noqa: SIM115
                                 stderr=subprocess.STDOUT, env={**os.environ, "PTTH_RELAY_CONFIG": str(config)})
        self.procs.append(relay)
        self.port = int(_wait_for(log, r"Listening at: http://127\.0\.0\.1:(\d+)"))
        server_config = work / f"server-{name}.toml"
        server_config.write_text(f'name = "alpha"\napi_key = "{KEY}"\nrelay_url = "http://127.0.0.1:{self.port}"\n'
                                 f'file_server_root = "{root}"\n')
        server_config.chmod(0o600)
        server = subprocess.Popen([sys.executable, "ptth_server.py", "--config", str(server_config)], cwd=code,
                                  stdout=open(work / f"server-{name}.log", "wb"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT)
        self.procs.append(server)
        deadline = time.monotonic() + 20
        while not self._ok():
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: the tunnel did not come up (logs in {work})")
            time.sleep(0.1)
        children = Path(f"/proc/{relay.pid}/task/{relay.pid}/children").read_text().split()
        self.pids = (int(children[0]), server.pid)

    def _ok(self) -> bool:
        try:
            return self.fetch(http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)) == 200
        except OSError:
            return False

    @staticmethod
    def fetch(conn: http.client.HTTPConnection) -> int:
        conn.request("GET", "/frontend/servers/alpha/files/1k.bin")
        r = conn.getresponse()
        r.read()
        return r.status

    def round(self, requests: int) -> tuple[float, float, float]:
        """CPU ms per request of the relay worker and of the server, and the median request time in ms."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        before = [_cpu_secs(pid) for pid in self.pids]
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            assert self.fetch(conn) == 200
            times.append(time.perf_counter() - started)
        after = [_cpu_secs(pid) for pid in self.pids]
        conn.close()
        relay, server = ((a - b) / requests * 1000 for a, b in zip(after, before, strict=True))
        return relay, server, statistics.median(times) * 1000

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(20)


def _cpu_secs(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for(log: Path, pattern: str) -> str:
    import re

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise SystemExit(f"not started:\n{log.read_text()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the older revision (git), e.g. HEAD~3")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "old").mkdir()
        commit = snapshot(args.rev, work / "old")
        root = work / "root"
        root.mkdir()
        (root / "1k.bin").write_bytes(os.urandom(1024))
        sides = [Side("before", work / "old", work, root), Side("after", REPO, work, root)]
        results: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
        try:
            for i in range(args.rounds):
                for side in sides if i % 2 == 0 else reversed(sides):
                    results[side.name].append(side.round(args.requests))
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
