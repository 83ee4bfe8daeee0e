"""What a peer link costs: bulk bytes and small calls between two relay nodes (CLUSTER.md sections 3-4).

Two processes on loopback, each under gevent's monkey-patching as a relay
worker runs: `serve` runs a PeerServer, `open` a PeerPool that drives one
scenario against it.

- `bulk`: `--mib` (1 GiB) in 256 KiB pieces over one link: the opener sends,
  the server's handler reads every piece and answers with the count;
- `raw`: the same bytes over a plain loopback TCP connection (sendall /
  recv_into, no framing), measured in the same run for comparison;
- `small`: calls of a head, 1 KiB and an end, answered by a head and an end,
  from `--concurrency` greenlets (1 and 32), for `--seconds`; links come from
  the pool, so after the first call each greenlet reuses one. Each side
  writes its last frame with its end (`send(..., end=True)`,
  `send_head(..., end=True)`): three writes per call in all.

CPU is read from /proc/PID/stat for both processes over the measured window
only; the machine's other load over the same window is reported as noise.
Run: `python bench/peer_link.py` (prints a table; `--json FILE` keeps the
figures). Each scenario runs `--repeat` times (default 2): the machine is
shared, so compare the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Bulk pieces: the relay's PIECE_BYTES.
PIECE_BYTES = 256 * 1024
# A small call's body: a small response.
SMALL_BODY_BYTES = 1024
# Warm-up before the measured window of the small calls (links made, code paths hot).
WARMUP_SECS = 0.5
SECRET = b"bench secret"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("bulk", "raw", "small")


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


# ---- the roles: each runs in a process of its own, under gevent ------------------------------


def role_serve(args: argparse.Namespace) -> None:
    """The serving node: a PeerServer with a sink and a small handler, plus a raw TCP sink."""
    import gevent
    from gevent.server import StreamServer

    from ptth_lib.relay.cluster.peering import PeerLink, PeerServer

    def sink(head: dict[str, Any], link: PeerLink) -> None:
        got = sum(len(piece) for piece in link.pieces())
        link.send_head({"status": 200, "bytes": got})
        link.end()

    def small(head: dict[str, Any], link: PeerLink) -> None:
        for _ in link.pieces():
            pass
        link.send_head({"status": 200}, end=True)

    def raw_sink(sock: Any, _address: Any) -> None:
        buffer = memoryview(bytearray(PIECE_BYTES))
        got = 0
        while n := sock.recv_into(buffer):
            got += n
        sock.sendall(str(got).encode())
        sock.close()

    server = PeerServer("127.0.0.1:0", SECRET, {"sink": sink, "small": small})
    server.start()
    raw = StreamServer(("127.0.0.1", 0), raw_sink)
    raw.start()
    _say(ready=True, address=server.address, raw_port=raw.server_port)
    gevent.wait()


def role_open(args: argparse.Namespace) -> None:
    """The opening node: runs one scenario, saying `start` and `stop` around the measured window."""
    import gevent
    from gevent import socket

    from ptth_lib.relay.cluster.peering import PeerPool

    pool = PeerPool(SECRET, max_idle_per_peer=64)
    piece = os.urandom(PIECE_BYTES)
    pieces = args.mib * 1024 * 1024 // PIECE_BYTES

    if args.scenario == "bulk":
        with pool.open(args.address, {"kind": "sink"}) as link:  # the handshake stays out of the window
            _say(start=True)
            t0 = time.perf_counter()
            for _ in range(pieces):
                link.send(piece)
            link.end()
            answer = link.read_head()
            for _ in link.pieces():
                pass
            secs = time.perf_counter() - t0
        _say(stop=True)
        assert answer["bytes"] == pieces * PIECE_BYTES, answer
        _say(secs=secs, mib=args.mib)
    elif args.scenario == "raw":
        sock = socket.create_connection(("127.0.0.1", args.raw_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _say(start=True)
        t0 = time.perf_counter()
        for _ in range(pieces):
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(64)
        secs = time.perf_counter() - t0
        _say(stop=True)
        assert int(answer) == pieces * PIECE_BYTES, answer
        _say(secs=secs, mib=args.mib)
    else:
        body = b"x" * SMALL_BODY_BYTES
        calls = [0]
        measuring = [False]
        stop = [False]

        def caller() -> None:
            while not stop[0]:
                with pool.open(args.address, {"kind": "small", "path": "/some/request/id"}) as link:
                    link.send(body, end=True)
                    link.read_head()
                    for _ in link.pieces():
                        pass
                if measuring[0]:
                    calls[0] += 1

        callers = [gevent.spawn(caller) for _ in range(args.concurrency)]
        gevent.sleep(WARMUP_SECS)
        measuring[0] = True
        _say(start=True)
        t0 = time.perf_counter()
        gevent.sleep(args.seconds)
        measuring[0] = False
        secs = time.perf_counter() - t0
        _say(stop=True)
        stop[0] = True
        gevent.joinall(callers, raise_error=True)
        _say(secs=secs, calls=calls[0], links=pool.links_made)


# ---- the driver: no gevent, starts the roles and reads /proc ---------------------------------


def _cpu_secs(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _machine_busy_secs() -> float:
    """CPU seconds the whole machine spent busy so far (all cores)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / CLOCK_TICKS


def _spawn(args: argparse.Namespace, role: str, **extra: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--seconds", str(args.seconds),
           "--mib", str(args.mib)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"role {proc.args[2:4]} ended early (exit {proc.wait()})")  # type: ignore[index]
    result: dict[str, Any] = json.loads(line)
    return result


def run(args: argparse.Namespace, scenario: str, concurrency: int, server: subprocess.Popen[str],
        ready: dict[str, Any]) -> dict[str, Any]:
    opener = _spawn(args, "open", scenario=scenario, concurrency=concurrency, address=ready["address"],
                    raw_port=ready["raw_port"])
    assert _read(opener).get("start")
    pids = [opener.pid, server.pid]
    before = [_cpu_secs(p) for p in pids]
    busy0, t0 = _machine_busy_secs(), time.monotonic()
    assert _read(opener).get("stop")
    after = [_cpu_secs(p) for p in pids]
    busy1, t1 = _machine_busy_secs(), time.monotonic()
    r = _read(opener)
    opener.wait()
    cpu_open, cpu_serve = (a - b for a, b in zip(after, before, strict=True))
    noise = max(0.0, (busy1 - busy0 - cpu_open - cpu_serve) / (t1 - t0))
    if scenario in ("bulk", "raw"):
        mib = r["mib"]
        return {"scenario": f"{scenario} {mib} MiB", "mib_per_s": mib / r["secs"],
                "cpu_ms_per_mib_open": 1e3 * cpu_open / mib, "cpu_ms_per_mib_serve": 1e3 * cpu_serve / mib,
                "cpu_ms_per_mib_total": 1e3 * (cpu_open + cpu_serve) / mib, "noise_cores": noise}
    calls = r["calls"]
    return {"scenario": f"small c{concurrency}", "calls_per_s": calls / r["secs"], "links": r["links"],
            "cpu_us_per_call_open": 1e6 * cpu_open / calls, "cpu_us_per_call_serve": 1e6 * cpu_serve / calls,
            "cpu_us_per_call_total": 1e6 * (cpu_open + cpu_serve) / calls, "noise_cores": noise}


def _show(res: dict[str, Any]) -> None:
    if "mib_per_s" in res:
        print(f"  {res['scenario']:<16} {res['mib_per_s']:8.0f} MiB/s   CPU {res['cpu_ms_per_mib_total']:.3f} ms/MiB "
              f"(opener {res['cpu_ms_per_mib_open']:.3f} + server {res['cpu_ms_per_mib_serve']:.3f})   "
              f"noise {res['noise_cores']:.2f} cores", flush=True)
    else:
        print(f"  {res['scenario']:<16} {res['calls_per_s']:8.0f} calls/s  CPU {res['cpu_us_per_call_total']:.0f} µs/call "
              f"(opener {res['cpu_us_per_call_open']:.0f} + server {res['cpu_us_per_call_serve']:.0f}), "
              f"{res['links']} links   noise {res['noise_cores']:.2f} cores", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measured window per small-call scenario")
    ap.add_argument("--mib", type=int, default=1024, help="bulk transfer size")
    ap.add_argument("--concurrency", default="1,32", help="small-call greenlets, comma-separated")
    ap.add_argument("--only", default="", help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--raw-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        from gevent import monkey

        monkey.patch_all()
        args.concurrency = int(args.concurrency.split(",")[0])
        {"serve": role_serve, "open": role_open}[args.role](args)
        return

    only = [s for s in SCENARIOS if s in set(filter(None, args.only.split(",")))] or list(SCENARIOS)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"peer links on loopback: Python {platform.python_version()}, gevent {metadata.version('gevent')}, "
          f"msgpack {metadata.version('msgpack')}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    results = []
    server = _spawn(args, "serve")
    try:
        ready = _read(server)
        for rep in range(args.repeat):
            print(f"run {rep + 1}", flush=True)
            for scenario in only:
                for concurrency in levels if scenario == "small" else [1]:
                    res = run(args, scenario, concurrency, server, ready)
                    res["run"] = rep + 1
                    results.append(res)
                    _show(res)
    finally:
        server.kill()
        server.wait()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
