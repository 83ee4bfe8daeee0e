"""TCP port forwarding benchmark: over HTTP and over QUIC, against direct TCP, on loopback.

    .venv/bin/python bench/forward.py [--quick] [--bytes 1G] [--quic-bytes 64M]
        [--round-trips 2000] [--runs 3] [--no-quic | --only-quic] [--profile-quic DIR]
        [--quic-max-datagram-size 1350]

Starts on 127.0.0.1 the TCP end servers in a process of their own (so this
script's GIL cannot slow them): `echo`, and `bulk`, which reads a header
(bytes up, bytes down), then discards what it receives while it sends a fixed
pattern, and answers the client's EOF with the count it received. Then two
tunnels to them, each forwarding both ports:

  http   the relay as deployed (gunicorn, gevent worker, conf/gunicorn.conf.py),
         ptth_server and ptth_client: TCP -> ptth_client -> relay -> ptth_server
  quic   ptth_quic_relay (UDP), ptth_quic_end_server and ptth_quic_client:
         TCP -> client proxy -> QUIC relay -> server proxy, one QUIC stream a hop

The same client code measures through each tunnel's local port and straight
to the end server (direct, the baseline):

  round trip  1 byte back and forth on one TCP_NODELAY connection, N times after
              a warm-up: p50/p90/p99/max ms (and the first, which sets the forward up)
  upload      client -> server into the sink; download: server -> client; MiB/s
  both        upload and download at once on one connection, MiB/s each way
  parallel    8 downloads at once (bytes/8 each), aggregate MiB/s

QUIC transfers are smaller (--quic-bytes, 64 MiB; direct and http move
--bytes, 1 GiB): aioquic moved a few MiB/s. --quic-max-datagram-size sets the
largest QUIC packet at all three QUIC processes (their configs' max_datagram_size;
loopback carries up to 65,507 bytes). A transfer's
clock starts once the end server has its header and stops at its last byte
(an upload's count). Each transfer runs --runs times, the paths taking turns
(the order rotating from run to run), and the median run is kept. Meanwhile
VmRSS of every tunnel process (for http the relay worker, the gunicorn
master's child) is sampled every 50 ms (and VmHWM read after a reset), every
process's CPU seconds (utime + stime, all threads; the kernel part in the
JSON) are taken, so the busiest hop shows, and the machine's UDP datagrams
(/proc/net/snmp: on loopback every QUIC packet passes the QUIC relay) and UDP
receive-buffer drops are counted. "others" is CPU taken by processes not ours
(a shared machine's noise). Prints a table, writes bench/forward-results.json.
--quick (128 MiB, QUIC 16 MiB, 1 run, 1,000 round trips) is a smoke test,
not figures. --profile-quic DIR runs the three QUIC processes under cProfile
(DIR/quic_*.prof, and the top functions in DIR/quic_*.txt); its figures are
then the profiler's, not QUIC's. Targets: p99 under 20 ms through each
forward, and at least 100 MiB/s each way through the HTTP forward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import pstats
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

from measure import cpu_times
from plan import BENCH, REPO
from targets import Proc, ProcError, procs

MIB = 1024 * 1024
PATTERN = bytes(range(256)) * 4096  # 1 MiB: what the source sends and the client uploads
HEADER = struct.Struct("!QQ")  # upload bytes, download bytes
COUNT = struct.Struct("!Q")
BUF_BYTES = 1 * MIB
SOCKET_TIMEOUT_SECS = 60.0
STARTUP_SECS = 30.0
SAMPLE_SECS = 0.05
# SIGTERM, then SIGKILL after this long; under cProfile the QUIC processes write their profiles.
STOP_SECS = 15.0
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


# ---- what the processes use ----------------------------------------------------------


def status_kib(pid: int, key: str) -> int:
    m = re.search(rf"^{key}:\s*(\d+)", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def udp_counters() -> dict[str, int]:
    """The machine's UDP counters (InDatagrams, OutDatagrams, RcvbufErrors, ...)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


def udp_drops(pids: dict[str, int]) -> dict[str, int]:
    """Datagrams dropped so far at each process's UDP sockets (a full receive buffer)."""
    drops = {}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        drops[fields[9]] = int(fields[12])  # by inode
    result = {}
    for who, pid in pids.items():
        inodes = []
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.append(link[8:-1])
        result[who] = sum(drops.get(i, 0) for i in inodes)
    return result


def machine_busy_secs() -> float:
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICKS


class Watch:
    """CPU seconds of each process, peak RSS of the tunnels', UDP datagrams, over one measurement."""

    def __init__(self, pids: dict[str, int], rss_of: tuple[str, ...]) -> None:
        self.pids, self.rss_of = pids, rss_of
        self.quic = {who: pid for who, pid in pids.items() if who.startswith("quic_")}

    def __enter__(self) -> Self:
        for who in self.rss_of:  # VmHWM starts again from the current RSS
            with contextlib.suppress(OSError):
                Path(f"/proc/{self.pids[who]}/clear_refs").write_text("5")
        self.peak = {who: status_kib(self.pids[who], "VmRSS") for who in self.rss_of}
        self.cpu = {who: cpu_times(pid) for who, pid in self.pids.items()}
        self.udp, self.drops = udp_counters(), udp_drops(self.quic)
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
        udp = {k: v - self.udp[k] for k, v in udp_counters().items()}
        drops = {k: v - self.drops.get(k, 0) for k, v in udp_drops(self.quic).items()}
        for who in self.rss_of:
            self.peak[who] = max(self.peak[who], status_kib(self.pids[who], "VmHWM"))
        self.result = {"wall_secs": round(wall, 2), "cpu_secs": cpu, "cpu_sys_secs": sys_secs,
                       "peak_rss_mib": {w: round(k / 1024, 1) for w, k in self.peak.items()},
                       "udp_datagrams": udp["OutDatagrams"],
                       "udp_rcvbuf_drops": udp["RcvbufErrors"], "udp_drops_by_process": drops}


PATHS = ("direct", "http", "quic")
HOPS = {"http": ("relay", "server", "client"),
        "quic": ("quic_relay", "quic_server", "quic_client")}


def wait_for_echo(port: int, what: str, work: Path) -> None:
    """Until a round trip through `port` works (the server side is connected to its relay)."""
    deadline = time.monotonic() + STARTUP_SECS
    while True:
        try:
            with connect(port) as sock:
                sock.sendall(b"x")
                if sock.recv(1) == b"x":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no round trip through the {what} forward; logs in {work}")
        time.sleep(0.2)


def _ports_table(ends: dict[str, int]) -> str:
    """ptth_server's [forwarded_ports]: each end server by name."""
    return "[forwarded_ports]\n" + "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in ends.items())


def start_http_tunnel(work: Path, ends: dict[str, int], keys: dict[str, str],
                      started: list[Proc]) -> tuple[dict[str, int], dict[str, int]]:
    """Start relay, ptth_server and ptth_client (added to `started`); return pids and local ports."""
    relay, port = procs.start_relay(work / "relay.toml", work / "relay.log", deadline=STARTUP_SECS)
    started.append(relay)
    url = f"http://127.0.0.1:{port}"
    server_config = procs.write_server_config(work / "server.toml", "bench", keys["server"], url,
                                              work / "root", _ports_table(ends))
    server = procs.start_server(server_config, work / "server.log")
    started.append(server)
    (work / "client.key").write_text(keys["client"] + "\n")
    (work / "client.key").chmod(0o600)
    args = [sys.executable, "ptth_client.py", "--relay-url", url,
            "--api-key-file", str(work / "client.key")]
    args += [a for n in ends for a in ("--forward", f"0:bench:{n}")]
    client = Proc(args, work / "client.log")
    started.append(client)
    ports = {n: int(client.wait_for_output(rf"forwarding 127\.0\.0\.1:(\d+) to bench:{n}\b",
                                           STARTUP_SECS).group(1))
             for n in ends}
    wait_for_echo(ports["echo"], "HTTP", work)
    return {"relay": procs.gunicorn_worker(relay), "server": server.pid, "client": client.pid}, ports


def start_quic_tunnel(work: Path, ends: dict[str, int], keys: dict[str, str],
                      started: list[Proc], profile: Path | None, max_datagram_size: int | None = None
                      ) -> tuple[dict[str, int], dict[str, int]]:
    """Start ptth_quic_relay, ptth_quic_end_server and ptth_quic_client; pids and local ports."""

    def python(who: str) -> list[str]:
        if profile is None:
            return [sys.executable]
        return [sys.executable, "-m", "cProfile", "-o", str(profile / f"{who}.prof")]

    relay = Proc([*python("quic_relay"), "ptth_quic_relay.py", "--config",
                  str(work / "relay.toml")], work / "quic-relay.log")
    started.append(relay)
    m = relay.wait_for_output(r"listening on udp://127\.0\.0\.1:(\d+), certificate fingerprint ([0-9a-fA-F:]+)",
                              STARTUP_SECS)
    port, fingerprint = m.group(1), m.group(2)
    server_config = procs.write_server_config(
        work / "quic-server.toml", "bench", keys["server"],
        "http://127.0.0.1:1",  # not used: QUIC only
        work / "root", _ports_table(ends) + f'[quic]\nrelay = "127.0.0.1:{port}"\n'
                                            f'relay_fingerprint = "{fingerprint}"\n'
                                            + (f"max_datagram_size = {max_datagram_size}\n"
                                               if max_datagram_size else ""))
    server = Proc([*python("quic_server"), "ptth_quic_end_server.py", "--config",
                   str(server_config)], work / "quic-server.log")
    started.append(server)
    args = [*python("quic_client"), "ptth_quic_client.py", "--relay", f"127.0.0.1:{port}",
            "--relay-fingerprint", fingerprint, "--name", "bench-client"]
    args += [a for n in ends for a in ("--forward", f"0:bench:{n}")]
    if max_datagram_size:
        (work / "quic-client.toml").write_text(f"max_datagram_size = {max_datagram_size}\n")
        args += ["--config", str(work / "quic-client.toml")]
    client = Proc(args, work / "quic-client.log", env={"PTTH_CLIENT_API_KEY": keys["client"]})
    started.append(client)
    ports = {n: int(client.wait_for_output(rf"forwarding 127\.0\.0\.1:(\d+) to bench:{n} over QUIC",
                                           STARTUP_SECS).group(1)) for n in ends}
    wait_for_echo(ports["echo"], "QUIC", work)
    return {"quic_relay": relay.pid, "quic_server": server.pid, "quic_client": client.pid}, ports


def summarize_profiles(profile: Path, top: int = 30) -> None:
    """Each DIR/quic_*.prof's top functions by tottime and by cumtime, as DIR/quic_*.txt."""
    for who in HOPS["quic"]:
        prof = profile / f"{who}.prof"
        if not prof.exists():
            progress(f"profile: no {prof} ({who} did not exit cleanly?)")
            continue
        with open(prof.with_suffix(".txt"), "w") as out:
            stats = pstats.Stats(str(prof), stream=out).strip_dirs()
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
        progress(f"profile: {prof.with_suffix('.txt')}")


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

    product = ("ptth_lib", "ptth_relay.py", "ptth_server.py", "ptth_client.py",
               "ptth_quic_relay.py", "ptth_quic_end_server.py", "ptth_quic_client.py", "conf")
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
    started: list[Proc] = []
    try:
        if not to_ends.poll(STARTUP_SECS):
            raise RuntimeError("the end servers did not start")
        ends = to_ends.recv()
        keys = {who: procs.new_key(who) for who in ("server", "client")}
        (work / "root").mkdir()
        (work / "relay.toml").write_text(  # read by both relays
            f'quic_bind = "127.0.0.1:0"\nquic_cert_file = "{work / "quic-relay.crt"}"\n'
            f'quic_key_file = "{work / "quic-relay.key"}"\n'
            + (f"quic_max_datagram_size = {args.quic_max_datagram_size}\n" if args.quic_max_datagram_size else "")
            + "\n"
            f'[[servers]]\nname = "bench"\ntripcode = "{procs.tripcode_of(keys["server"])}"\n\n'
            f'[[clients]]\nname = "bench-client"\ntripcode = "{procs.tripcode_of(keys["client"])}"\n'
            f'allow = ["bench:*"]\n')
        pids: dict[str, int] = {}
        routes: dict[str, dict[str, int]] = {"direct": ends}
        if "http" in args.paths:
            progress("starting the HTTP tunnel")
            got, routes["http"] = start_http_tunnel(work, ends, keys, started)
            pids |= got
        if "quic" in args.paths:
            progress("starting the QUIC tunnel" + " under cProfile" * bool(args.profile_quic))
            got, routes["quic"] = start_quic_tunnel(work, ends, keys, started, args.profile_quic,
                                                    args.quic_max_datagram_size)
            pids |= got
        tunnel_pids = tuple(pids)
        pids |= {"ends": ends_proc.pid or 0, "bench": os.getpid()}
        results: dict[str, Any] = {"round_trip": {}, "bulk": {}}
        for route in args.paths:
            progress(f"{args.round_trips} round trips, {route}")
            results["round_trip"][route] = round_trips(routes[route]["echo"], args.round_trips,
                                                       args.warmup)
        sizes = {"direct": args.bytes, "http": args.bytes, "quic": args.quic_bytes}
        phases: dict[str, Any] = {"upload": lambda p, n: transfer(p, n, 0),
                                  "download": lambda p, n: transfer(p, 0, n)}
        if not args.no_extra:
            phases["both"] = lambda p, n: transfer(p, n, n)
            if args.parallel:
                phases["parallel"] = lambda p, n: parallel_downloads(p, n, args.parallel)
        for route in args.paths[1:]:  # warm-up
            warm = min(16 * MIB, sizes[route] // 4)
            transfer(routes[route]["bulk"], warm, warm)
        runs: dict[str, dict[str, list[Any]]] = {p: {r: [] for r in args.paths} for p in phases}
        for i in range(args.runs):  # the paths taking turns, the order rotating from run to run
            order = args.paths[i % len(args.paths):] + args.paths[:i % len(args.paths)]
            for phase, measure in phases.items():
                for route in order:
                    size = sizes[route]
                    progress(f"run {i + 1}/{args.runs}: {phase}, {route}, {size / MIB:g} MiB")
                    with Watch(pids, tunnel_pids) as watch:
                        secs = measure(routes[route]["bulk"], size)
                    moved = size - size % args.parallel if phase == "parallel" else size
                    runs[phase][route].append({"bytes": moved, "mib_per_s": round(moved / MIB / secs, 1),
                                               **watch.result})
        results["bulk"] = {p: {rt: median_run(rs) for rt, rs in r.items()} for p, r in runs.items()}
        return results
    finally:
        for proc in reversed(started):
            proc.terminate(STOP_SECS)
        ends_proc.kill()
        if args.profile_quic:
            summarize_profiles(args.profile_quic)


NAMES = {"upload": "upload (client -> server)", "download": "download (server -> client)",
         "both": "both ways at once, each way", "parallel": "{n} parallel downloads, total"}


def report(results: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    rt, bulk, paths = results["round_trip"], results["bulk"], args.paths
    tunnels = [p for p in paths if p != "direct"]
    head = "".join(f"{p:>10}" for p in paths)
    lines = [f"Round trip, 1 byte, {args.round_trips} after {args.warmup} warm-up (ms)",
             f"  {'':30}{head}"]
    for key, name in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max"),
                      ("mean_ms", "mean"), ("first_ms", "first (sets the forward up)")):
        lines.append(f"  {name:30}" + "".join(f"{rt[p][key]:10.3f}" for p in paths))

    sizes = [f"{p} {(args.quic_bytes if p == 'quic' else args.bytes) / MIB:g} MiB" for p in paths]
    runs = f"{args.runs} run{'s' * (args.runs > 1)}"
    ratios = "".join(f"{t + '/direct':>13}" for t in tunnels)
    lines += ["", f"Throughput, MiB/s, median of {runs}; per transfer: {', '.join(sizes)}",
              f"  {'':30}{head}{ratios}"]
    for phase, r in bulk.items():
        name = NAMES[phase].format(n=args.parallel)
        lines.append(f"  {name:30}" + "".join(f"{r[p]['mib_per_s']:10,.1f}" for p in paths)
                     + "".join(f"{r[t]['mib_per_s'] / r['direct']['mib_per_s']:13.3f}"
                               for t in tunnels))

    cols = ("relay", "server", "client", "ends", "bench", "others")
    lines += ["", ("CPU seconds during each transfer (in brackets: % of one core); relay, server "
                   "and client are the path's own"), f"  {'':20}{'MiB':>6}{'wall s':>8}"
              + "".join(f"{c:>13}" for c in cols) + "   peak RSS MiB relay/server/client"]
    for phase, r in bulk.items():
        for route in paths:
            m = r[route]
            hops = HOPS.get(route, ())
            who = dict(zip(("relay", "server", "client"), hops, strict=True)) if hops else {}
            cells = ""
            for c in cols:
                if c in ("relay", "server", "client") and c not in who:
                    cells += f"{'-':>13}"
                    continue
                secs = m["cpu_secs"][who.get(c, c)]
                cells += f"{secs:7.2f} ({100 * secs / m['wall_secs']:3.0f})"
            rss = "/".join(f"{m['peak_rss_mib'][h]:.0f}" for h in hops) or "-"
            lines.append(f"  {phase + ', ' + route:20}{m['bytes'] / MIB:6g}{m['wall_secs']:8.2f}"
                         f"{cells}   {rss}")

    lines += ["", "Per MiB moved (both ways counted for 'both'): CPU ms of relay/server/client"
              + ("; UDP datagrams (each passes the QUIC relay),\n  and datagrams each QUIC process "
                 "dropped (its UDP receive buffer was full)" if "quic" in tunnels else ""),
              f"  {'':20}" + "".join(f"{t + ' CPU ms/MiB':>24}" for t in tunnels)
              + (f"{'datagrams/MiB':>15}{'datagrams/s':>13}{'drops relay/server/client':>27}"
                 if "quic" in tunnels else "")]
    for phase, r in bulk.items():
        mib = {t: r[t]["bytes"] / MIB * (2 if phase == "both" else 1) for t in tunnels}
        per_mib = {t: "/".join(f"{1000 * r[t]['cpu_secs'][h] / mib[t]:.{1 if t == 'http' else 0}f}"
                               for h in HOPS[t]) for t in tunnels}
        cells = "".join(f"{per_mib[t]:>24}" for t in tunnels)
        if "quic" in tunnels:
            q = r["quic"]
            cells += (f"{q['udp_datagrams'] / mib['quic']:15,.0f}"
                      f"{q['udp_datagrams'] / q['wall_secs']:13,.0f}"
                      f"{'/'.join(str(q['udp_drops_by_process'][h]) for h in HOPS['quic']):>27}")
        lines.append(f"  {phase:20}{cells}")

    targets = [{"target": f"round trip p99 through the {t} forward < {TARGET_P99_MS:g} ms",
                "value": rt[t]["p99_ms"], "met": rt[t]["p99_ms"] < TARGET_P99_MS} for t in tunnels]
    if "http" in tunnels:
        each_way = min(bulk[p]["http"]["mib_per_s"] for p in ("upload", "download"))
        targets.append({"target": f"bulk through the http forward >= {TARGET_MIBS:g} MiB/s each way "
                                  "(the slower way)", "value": each_way, "met": each_way >= TARGET_MIBS})
    lines += ["", "Targets"]
    lines += [f"  {t['target']}: {t['value']:,} -> {'met' if t['met'] else 'MISSED'}"
              for t in targets]
    if args.profile_quic:
        lines += ["", (f"(QUIC processes ran under cProfile: their figures are the profiler's; "
                       f"profiles in {args.profile_quic})")]
    return "\n".join(lines), targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="128 MiB per transfer (QUIC 16 MiB), 1 run, 1,000 round trips")
    parser.add_argument("--bytes", type=parse_bytes,
                        help="per transfer, direct and HTTP, e.g. 1G (default), 256M")
    parser.add_argument("--quic-bytes", type=parse_bytes,
                        help="per transfer through QUIC (default 64M; --quick 16M)")
    parser.add_argument("--round-trips", type=int, help="measured round trips (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="round trips before measuring")
    parser.add_argument("--runs", type=int, help="runs of each transfer, median kept (default 3)")
    parser.add_argument("--parallel", type=int, default=8, help="parallel downloads (0: skip)")
    parser.add_argument("--no-extra", action="store_true", help="skip both-ways and parallel")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-quic", action="store_true", help="direct and HTTP only")
    which.add_argument("--only-quic", action="store_true", help="direct and QUIC only")
    parser.add_argument("--profile-quic", type=Path, metavar="DIR",
                        help="run the QUIC relay and proxies under cProfile, profiles in DIR")
    parser.add_argument("--quic-max-datagram-size", type=int, metavar="BYTES",
                        help="the largest QUIC packet at the relay and both proxies (default: theirs)")
    parser.add_argument("--json", type=Path, default=BENCH / "forward-results.json")
    args = parser.parse_args(argv)
    args.bytes = args.bytes or (128 * MIB if args.quick else 1024 * MIB)
    args.quic_bytes = args.quic_bytes or (16 * MIB if args.quick else 64 * MIB)
    args.round_trips = args.round_trips or (1000 if args.quick else 2000)
    args.runs = args.runs or (1 if args.quick else 3)
    args.paths = [p for p in PATHS
                  if not (p == "quic" and args.no_quic or p == "http" and args.only_quic)]
    if args.profile_quic:
        if args.no_quic:
            parser.error("--profile-quic needs the QUIC path")
        args.profile_quic = args.profile_quic.resolve()
        args.profile_quic.mkdir(parents=True, exist_ok=True)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="ptth-bench-forward-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop what we started
    try:
        results = run(args, work)
    except (OSError, RuntimeError, ProcError) as e:
        print(f"bench/forward.py: {type(e).__name__}: {e}\n(logs in {work})", file=sys.stderr)
        return 1
    table, targets = report(results, args)
    dirty = " (dirty)" if info["git_dirty"] else ""
    print(f"PTTH TCP forwarding, {info['date']}, {info['git_commit']}{dirty}, "
          f"{info['cpu_model']} x {info['nproc']}\n\n{table}")
    keys = ("quick", "bytes", "quic_bytes", "runs", "round_trips", "warmup", "parallel", "no_extra",
            "paths", "quic_max_datagram_size")
    settings = {k: getattr(args, k) for k in keys}
    settings["profile_quic"] = str(args.profile_quic) if args.profile_quic else None
    args.json.write_text(json.dumps({**info, "duration_secs": round(time.monotonic() - STARTED),
                                     "settings": settings, "results": results, "targets": targets},
                                    indent=2) + "\n")
    print(f"\nwrote {args.json} (logs in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
