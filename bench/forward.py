"""TCP port forwarding benchmark: through the forward against a direct connection, on loopback.

    .venv/bin/python bench/forward.py [--quick] [--bytes 1G] [--round-trips 2000] [--runs 3]

Starts on 127.0.0.1 the relay as deployed (gunicorn, gevent worker,
conf/gunicorn.conf.py), ptth_server forwarding two ports, ptth_client with a
local port for each, and the TCP end servers in a process of their own (so
this script's GIL cannot slow them): `echo`, and `bulk`, which reads a header
(bytes up, bytes down), then discards what it receives while it sends a fixed
pattern, and answers the client's EOF with the count it received. The same
client code measures through ptth_client's port (TCP -> ptth_client -> relay
-> ptth_server -> end server) and straight to the end server (the baseline):

  round trip  1 byte back and forth on one TCP_NODELAY connection, N times after
              a warm-up: p50/p90/p99/max ms (and the first, which sets the forward up)
  upload      client -> server into the sink; download: server -> client; MiB/s
  both        upload and download at once on one connection, MiB/s each way
  parallel    8 downloads at once (bytes/8 each), aggregate MiB/s

A transfer's clock starts once the end server has its header and stops at its
last byte (an upload's count). Each transfer runs --runs times, forward and
direct alternating, and the median run is kept. Meanwhile VmRSS of the relay
worker (the gunicorn master's child), ptth_server and ptth_client is sampled
every 50 ms (and VmHWM read after a reset), and every process's CPU seconds
(utime + stime, all threads; the kernel part in the JSON) are taken, so the
busiest hop shows. "others" is CPU taken by processes not ours (a shared
machine's noise). Prints a table, writes bench/forward-results.json. --quick
(128 MiB, 1 run, 1,000 round trips) is a smoke test, not figures. Targets:
p99 under 20 ms, and at least 100 MiB/s each way, through the forward.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MIB = 1024 * 1024
PATTERN = bytes(range(256)) * 4096  # 1 MiB: what the source sends and the client uploads
HEADER = struct.Struct("!QQ")  # upload bytes, download bytes
COUNT = struct.Struct("!Q")
BUF_BYTES = 1 * MIB
SOCKET_TIMEOUT_SECS = 60.0
STARTUP_SECS = 30.0
SAMPLE_SECS = 0.05
TICKS = os.sysconf("SC_CLK_TCK")
TARGET_P99_MS, TARGET_MIBS = 20.0, 100.0
STARTED = time.monotonic()


# ---- the TCP end servers, in a process of their own ------------------------------------


def _serve(listener: socket.socket, handle: Any) -> None:
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_run_handler, args=(handle, sock), daemon=True).start()


def _run_handler(handle: Any, sock: socket.socket) -> None:
    with contextlib.suppress(OSError), sock:
        handle(sock)


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def _bulk(sock: socket.socket) -> None:
    _, down = HEADER.unpack(recv_exactly(sock, HEADER.size))
    got = [0]

    def sink() -> None:
        buf = bytearray(BUF_BYTES)
        while n := sock.recv_into(buf):
            got[0] += n

    reader = threading.Thread(target=sink, daemon=True)
    reader.start()
    sock.sendall(b"R")  # ready: the client's clock starts now
    send_pattern(sock, down)
    reader.join()
    sock.sendall(COUNT.pack(got[0]))


def end_servers(conn: Any) -> None:
    """The child process: listen, report the ports, serve until killed."""
    ports = {}
    for name, handle in (("echo", _echo), ("bulk", _bulk)):
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        ports[name] = listener.getsockname()[1]
        threading.Thread(target=_serve, args=(listener, handle), daemon=True).start()
    conn.send(ports)
    threading.Event().wait()


# ---- the client side of each measurement ----------------------------------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        data = sock.recv(n)
        if not data:
            raise ConnectionError(f"connection ended with {n} bytes still expected")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def send_pattern(sock: socket.socket, n: int) -> None:
    view = memoryview(PATTERN)
    while n:
        step = min(n, len(view))
        sock.sendall(view[:step])
        n -= step


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trips(port: int, n: int, warmup: int) -> dict[str, Any]:
    """1-byte ping-pong on one connection: percentiles in ms of n round trips after `warmup`."""
    times = []
    with connect(port) as sock:
        for i in range(warmup + n):
            start = time.perf_counter_ns()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise ConnectionError("the echo server sent something else")
            times.append((time.perf_counter_ns() - start) / 1e6)
            if i == 0:
                first = times[0]
    ms = sorted(times[warmup:])
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"round_trips": n, "first_ms": round(first, 2), "p50_ms": round(q[49], 3),
            "p90_ms": round(q[89], 3), "p99_ms": round(q[98], 3), "max_ms": round(ms[-1], 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def transfer(port: int, up: int, down: int) -> float:
    """Upload `up` and download `down` bytes at once on one connection; seconds taken."""
    with connect(port) as sock:
        sock.sendall(HEADER.pack(up, down))
        if recv_exactly(sock, 1) != b"R":
            raise ConnectionError("the bulk server did not answer the header")
        start = time.perf_counter()

        def upload() -> None:
            send_pattern(sock, up)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        buf, got, tail = bytearray(BUF_BYTES), 0, b""
        while n := sock.recv_into(buf):
            got += n
            tail = (tail + bytes(buf[max(0, n - COUNT.size):n]))[-COUNT.size:]
        elapsed = time.perf_counter() - start
        sender.join()
    if got != down + COUNT.size or COUNT.unpack(tail)[0] != up:
        counted = COUNT.unpack(tail)[0] if len(tail) == COUNT.size else "?"
        raise ConnectionError(f"wanted {down} bytes down and {up} up; "
                              f"got {got - COUNT.size} down and {counted} up")
    return elapsed


def parallel_downloads(port: int, total: int, count: int) -> float:
    """`count` downloads of total/count bytes at once; seconds from first start to last end."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            transfer(port, 0, total // count)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


# ---- processes and what they use -------------------------------------------------------


class Proc:
    """A child in its own process group, output to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def wait_for(self, pattern: str) -> re.Match[str]:
        end = time.monotonic() + STARTUP_SECS
        while time.monotonic() < end and self.popen.poll() is None:
            if m := re.search(pattern, self.log.read_text(errors="replace")):
                return m
            time.sleep(0.05)
        raise RuntimeError(f"{pattern!r} not seen in {self.log}:\n"
                           f"{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def status_kib(pid: int, key: str) -> int:
    m = re.search(rf"^{key}:\s*(\d+)", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def machine_busy_secs() -> float:
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICKS


class Watch:
    """CPU seconds of each process, and peak RSS of the tunnel's, over one measurement."""

    def __init__(self, pids: dict[str, int], rss_of: tuple[str, ...]) -> None:
        self.pids, self.rss_of = pids, rss_of

    def __enter__(self) -> Self:
        for who in self.rss_of:  # VmHWM starts again from the current RSS
            with contextlib.suppress(OSError):
                Path(f"/proc/{self.pids[who]}/clear_refs").write_text("5")
        self.peak = {who: status_kib(self.pids[who], "VmRSS") for who in self.rss_of}
        self.cpu = {who: cpu_times(pid) for who, pid in self.pids.items()}
        self.busy, self.wall = machine_busy_secs(), time.perf_counter()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECS):
            for who in self.rss_of:
                self.peak[who] = max(self.peak[who], status_kib(self.pids[who], "VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._sampler.join()
        wall = time.perf_counter() - self.wall
        now = {who: cpu_times(pid) for who, pid in self.pids.items()}
        sys_secs = {who: round(now[who][1] - self.cpu[who][1], 2) for who in now}
        cpu = {who: round(sum(now[who]) - sum(self.cpu[who]), 2) for who in now}
        cpu["others"] = round(max(0.0, machine_busy_secs() - self.busy - sum(cpu.values())), 2)
        for who in self.rss_of:
            self.peak[who] = max(self.peak[who], status_kib(self.pids[who], "VmHWM"))
        self.result = {"wall_secs": round(wall, 2), "cpu_secs": cpu, "cpu_sys_secs": sys_secs,
                       "peak_rss_mib": {w: round(k / 1024, 1) for w, k in self.peak.items()}}


def start_tunnel(work: Path, ends: dict[str, int],
                 procs: list[Proc]) -> tuple[dict[str, int], dict[str, int]]:
    """Start relay, ptth_server and ptth_client (added to `procs`); return pids and local ports."""
    import blake3

    def key(name: str) -> tuple[str, str]:
        k = f"bench-key-{name}-" + os.urandom(18).hex()
        return k, base64.b64encode(blake3.blake3(k.encode()).digest()).decode()

    (server_key, server_trip), (client_key, client_trip) = key("server"), key("client")
    (work / "relay.toml").write_text(
        f'[[servers]]\nname = "bench"\ntripcode = "{server_trip}"\n\n'
        f'[[clients]]\nname = "bench-client"\ntripcode = "{client_trip}"\nallow = ["bench:*"]\n')
    procs.append(Proc([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "--bind",
                       "127.0.0.1:0", "ptth_relay:app"], work / "relay.log",
                      env={"PTTH_RELAY_CONFIG": str(work / "relay.toml")}))
    port = procs[0].wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1)
    url = f"http://127.0.0.1:{port}"
    (work / "root").mkdir()
    ports_table = "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in ends.items())
    server_config = work / "server.toml"
    server_config.write_text(f'name = "bench"\napi_key = "{server_key}"\nrelay_url = "{url}/"\n'
                             f'file_server_root = "{work / "root"}"\n'
                             f'[forwarded_ports]\n{ports_table}')
    server_config.chmod(0o600)
    procs.append(Proc([sys.executable, "ptth_server.py", "--config", str(server_config)],
                      work / "server.log"))
    (work / "client.key").write_text(client_key + "\n")
    (work / "client.key").chmod(0o600)
    args = [sys.executable, "ptth_client.py", "--relay-url", url,
            "--api-key-file", str(work / "client.key")]
    args += [a for n in ends for a in ("--forward", f"0:bench:{n}")]
    procs.append(Proc(args, work / "client.log"))
    ports = {n: int(procs[2].wait_for(rf"forwarding 127\.0\.0\.1:(\d+) to bench:{n}\b").group(1))
             for n in ends}
    deadline = time.monotonic() + STARTUP_SECS
    while True:  # until ptth_server listens for the ports at the relay
        try:
            with connect(ports["echo"]) as sock:
                sock.sendall(b"x")
                if sock.recv(1) == b"x":
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no round trip through the forward; logs in {work}")
        time.sleep(0.2)
    master = procs[0].popen.pid
    worker = int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])
    return {"relay": worker, "server": procs[1].popen.pid, "client": procs[2].popen.pid}, ports


# ---- the run ---------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 128M, 1048576)")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


def machine() -> dict[str, Any]:
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()

    product = ("ptth_lib", "ptth_relay.py", "ptth_server.py", "ptth_client.py", "conf")
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "uname": " ".join(filter(None, platform.uname())), "nproc": os.cpu_count(),
            "cpu_model": model.group(1).strip() if model else platform.processor(),
            "python": platform.python_version(), "git_commit": git("rev-parse", "HEAD")[:12],
            "git_dirty": bool(git("status", "--porcelain", "--", *product))}


def progress(message: str) -> None:
    print(f"[forward {time.monotonic() - STARTED:5.1f} s] {message}", file=sys.stderr, flush=True)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median MiB/s, with its CPU figures; peak RSS is the highest of all."""
    keep = sorted(runs, key=lambda r: r["mib_per_s"])[len(runs) // 2]
    peaks = {w: max(r["peak_rss_mib"][w] for r in runs) for w in keep["peak_rss_mib"]}
    return {**keep, "peak_rss_mib": peaks, "runs_mib_per_s": [r["mib_per_s"] for r in runs]}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    to_ends, from_ends = spawn.Pipe()
    ends_proc = spawn.Process(target=end_servers, args=(from_ends,), daemon=True)
    ends_proc.start()
    procs: list[Proc] = []
    try:
        if not to_ends.poll(STARTUP_SECS):
            raise RuntimeError("the end servers did not start")
        ends = to_ends.recv()
        pids, ports = start_tunnel(work, ends, procs)
        pids |= {"ends": ends_proc.pid or 0, "bench": os.getpid()}
        routes = {"forward": ports, "direct": ends}
        results: dict[str, Any] = {"round_trip": {}, "bulk": {}}
        for route in ("direct", "forward"):
            progress(f"{args.round_trips} round trips, {route}")
            results["round_trip"][route] = round_trips(routes[route]["echo"], args.round_trips,
                                                       args.warmup)
        size = args.bytes
        phases = {"upload": lambda p: transfer(p, size, 0),
                  "download": lambda p: transfer(p, 0, size)}
        if not args.no_extra:
            phases["both"] = lambda p: transfer(p, size, size)
            if args.parallel:
                phases["parallel"] = lambda p: parallel_downloads(p, size, args.parallel)
        transfer(ports["bulk"], 16 * MIB, 16 * MIB)  # warm-up
        runs: dict[str, dict[str, list[Any]]] = {p: {"forward": [], "direct": []} for p in phases}
        for i in range(args.runs):  # alternating, the order turning from run to run
            for phase, measure in phases.items():
                for route in ("forward", "direct")[::1 if i % 2 == 0 else -1]:
                    progress(f"run {i + 1}/{args.runs}: {phase}, {route}")
                    with Watch(pids, ("relay", "server", "client")) as watch:
                        secs = measure(routes[route]["bulk"])
                    moved = size - size % args.parallel if phase == "parallel" else size
                    mibs = round(moved / MIB / secs, 1)
                    runs[phase][route].append({"mib_per_s": mibs, **watch.result})
        results["bulk"] = {p: {rt: median_run(rs) for rt, rs in r.items()} for p, r in runs.items()}
        return results
    finally:
        for proc in reversed(procs):
            proc.stop()
        ends_proc.kill()


def report(results: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    rt, bulk = results["round_trip"], results["bulk"]
    lines = [f"Round trip, 1 byte, {args.round_trips} after {args.warmup} warm-up (ms)",
             f"  {'':10}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'mean':>9}{'first':>9}"]
    for route in ("forward", "direct"):
        keys = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "first_ms")
        lines.append(f"  {route:10}" + "".join(f"{rt[route][k]:9.3f}" for k in keys))
    runs = f"{args.runs} run{'s' * (args.runs > 1)}"
    lines += ["", f"Throughput, {args.bytes / MIB:g} MiB each, median of {runs}, MiB/s",
              f"  {'':34}{'forward':>9}{'direct':>9}{'ratio':>8}"]
    names = {"upload": "upload (client -> server)", "download": "download (server -> client)",
             "both": "both ways at once, each way",
             "parallel": f"{args.parallel} parallel downloads, total"}
    for phase, r in bulk.items():
        f, d = r["forward"]["mib_per_s"], r["direct"]["mib_per_s"]
        lines.append(f"  {names[phase]:34}{f:9,.0f}{d:9,.0f}{f / d:8.2f}")
    who = ("relay", "server", "client", "ends", "bench", "others")
    lines += ["", "CPU seconds during each transfer (in brackets: % of one core); peak RSS MiB",
              f"  {'':20}{'wall s':>7}" + "".join(f"{w:>12}" for w in who)
              + "   peak RSS relay/server/client"]
    for phase, r in bulk.items():
        for route in ("forward", "direct"):
            m = r[route]
            cpu = m["cpu_secs"]
            cells = "".join(f"{cpu[w]:6.2f} ({100 * cpu[w] / m['wall_secs']:3.0f})" for w in who)
            rss = "/".join(f"{m['peak_rss_mib'][w]:.0f}" for w in ("relay", "server", "client"))
            lines.append(f"  {phase + ', ' + route:20}{m['wall_secs']:7.2f}{cells}   {rss}")
    each_way = [bulk[p]["forward"]["mib_per_s"] for p in ("upload", "download")]
    targets = [
        {"target": f"round trip p99 through the forward < {TARGET_P99_MS:g} ms",
         "value": rt["forward"]["p99_ms"], "met": rt["forward"]["p99_ms"] < TARGET_P99_MS},
        {"target": f"bulk through the forward >= {TARGET_MIBS:g} MiB/s each way (the slower way)",
         "value": min(each_way), "met": min(each_way) >= TARGET_MIBS},
    ]
    lines += ["", "Targets"]
    lines += [f"  {t['target']}: {t['value']:,} -> {'met' if t['met'] else 'MISSED'}"
              for t in targets]
    return "\n".join(lines), targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="128 MiB per transfer, 1 run, 1,000 round trips")
    parser.add_argument("--bytes", type=parse_bytes, help="per transfer, e.g. 1G (default), 256M")
    parser.add_argument("--round-trips", type=int, help="measured round trips (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="round trips before measuring")
    parser.add_argument("--runs", type=int, help="runs of each transfer, median kept (default 3)")
    parser.add_argument("--parallel", type=int, default=8, help="parallel downloads (0: skip)")
    parser.add_argument("--no-extra", action="store_true", help="skip both-ways and parallel")
    parser.add_argument("--json", type=Path, default=BENCH / "forward-results.json")
    args = parser.parse_args(argv)
    args.bytes = args.bytes or (128 * MIB if args.quick else 1024 * MIB)
    args.round_trips = args.round_trips or (1000 if args.quick else 2000)
    args.runs = args.runs or (1 if args.quick else 3)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="ptth-bench-forward-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop what we started
    try:
        results = run(args, work)
    except (OSError, RuntimeError) as e:
        print(f"bench/forward.py: {type(e).__name__}: {e}\n(logs in {work})", file=sys.stderr)
        return 1
    table, targets = report(results, args)
    dirty = " (dirty)" if info["git_dirty"] else ""
    print(f"PTTH TCP forwarding, {info['date']}, {info['git_commit']}{dirty}, "
          f"{info['cpu_model']} x {info['nproc']}\n\n{table}")
    keys = ("quick", "bytes", "runs", "round_trips", "warmup", "parallel", "no_extra")
    settings = {k: getattr(args, k) for k in keys}
    args.json.write_text(json.dumps({**info, "duration_secs": round(time.monotonic() - STARTED),
                                     "settings": settings, "results": results, "targets": targets},
                                    indent=2) + "\n")
    print(f"\nwrote {args.json} (logs in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
