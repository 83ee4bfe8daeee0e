"""What Redis costs the relay: hand-offs between workers, and bulk bytes (CLUSTER.md).

Measures, on a redis-server already running on a loopback port, with every
Redis client under gevent monkey-patching as the relay's workers run:

- `command`: one plain command (INCR) and one small Lua script (EVALSHA, the
  shape of the cluster's "offer" script) per round trip, from one process;
- `list`, `pubsub`, `stream`, `tcp`: a hand-off ping-pong between two
  processes A and B, each with one dispatcher greenlet reading its inbox
  (BLMPOP on a list; a SUBSCRIBE connection; XREADGROUP + XACK on a stream;
  for comparison, a plain loopback TCP connection per greenlet, as a peer
  link between two workers would be). A round trip is two hand-offs;
- `bulk-list`, `bulk-tcp`: 1 GiB in 256 KiB pieces from one process to
  another, through a Redis list (4 pieces in flight at most, with credits
  for backpressure) or through one loopback TCP connection.

CPU is read from /proc/PID/stat for every process involved, redis-server
included, over the measured window only; the machine's other load over the
same window is reported as noise. Run: `python bench/redis_probe.py --port
6391` (prints a table; `--json FILE` keeps the figures). Each scenario runs
`--repeat` times (default 2): the machine is shared, so compare the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

# Size of a small hand-off message: a typical request head in its envelope.
SMALL_MESSAGE_BYTES = 1024
# Bulk pieces: the relay's PIECE_BYTES / RELAY_CHUNK_BYTES.
PIECE_BYTES = 256 * 1024
# Pieces in flight through Redis at once in `bulk-list`: the relay's BODY_QUEUE_CHUNKS.
BULK_CREDITS = 4
# Warm-up before the measured window (connections made, code paths hot).
WARMUP_SECS = 0.5
# A dispatcher takes up to this many messages per blocking call.
DRAIN_COUNT = 128

HANDOFFS = ("list", "pubsub", "stream", "tcp")
BULKS = ("bulk-list", "bulk-tcp")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The cluster's "offer" in miniature: check the server is online, take a fair
# share, pop a parked listen and push the head to its node's inbox, or queue it.
OFFER_SCRIPT = """
local online = redis.call('EXISTS', KEYS[1])
local held = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if held > 16 then redis.call('HINCRBY', KEYS[2], ARGV[1], -1) return {'wait'} end
local node = redis.call('LPOP', KEYS[3])
if node then
  redis.call('RPUSH', 'probe:inbox:' .. node, ARGV[2])
  redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
  return {'handed', node}
end
redis.call('RPUSH', KEYS[4], ARGV[2])
redis.call('LTRIM', KEYS[4], -256, -1)
redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
return {'queued'}
"""


# ---- the roles: each runs in a process of its own, under gevent ------------------------------


def _client(url: str, parser: str):  # type: ignore[no-untyped-def]
    import redis
    from redis.connection import _HiredisParser, _RESP2Parser

    cls = _HiredisParser if parser == "hiredis" else _RESP2Parser
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=256, parser_class=cls)
    return redis.Redis(connection_pool=pool)


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def role_echo(args: argparse.Namespace) -> None:
    """B: answer every message from A the same way it came."""
    import gevent

    r = _client(args.url, args.parser)
    if args.mode == "tcp":
        from gevent.server import StreamServer

        def echo(sock, _addr):  # type: ignore[no-untyped-def]
            while True:
                msg = _recv_exact(sock, SMALL_MESSAGE_BYTES)
                if msg is None:
                    return
                sock.sendall(msg)

        server = StreamServer(("127.0.0.1", 0), echo)
        server.start()
        _say(ready=True, port=server.server_port)
        gevent.wait()
    elif args.mode == "list":
        _say(ready=True)
        while True:
            got = r.blmpop(1, 1, "probe:inbox:B", direction="LEFT", count=DRAIN_COUNT)
            if got:
                r.rpush("probe:inbox:A", *got[1])
    elif args.mode == "pubsub":
        ps = r.pubsub(ignore_subscribe_messages=True)
        ps.subscribe("probe:ch:B")
        _say(ready=True)
        for m in ps.listen():
            r.publish("probe:ch:A", m["data"])
    elif args.mode == "stream":
        for s in ("probe:s:A", "probe:s:B"):
            r.delete(s)
            r.xgroup_create(s, "g", id="$", mkstream=True)
        _say(ready=True)
        while True:
            got = r.xreadgroup("g", "B", {"probe:s:B": ">"}, count=DRAIN_COUNT, block=1000)
            for _stream, entries in got or []:
                pipe = r.pipeline(transaction=False)
                for _entry_id, fields in entries:
                    pipe.xadd("probe:s:A", fields, maxlen=10000, approximate=True)
                pipe.xack("probe:s:B", "g", *[e[0] for e in entries])
                pipe.execute()


def role_ping(args: argparse.Namespace) -> None:
    """A: `concurrency` greenlets each send a message to B and wait for its echo, for `seconds`."""
    import gevent
    import gevent.event
    from gevent import socket

    r = _client(args.url, args.parser)
    waiters: dict[bytes, gevent.event.AsyncResult] = {}
    payload = b"x" * (SMALL_MESSAGE_BYTES - 16)

    def wake(msg: bytes) -> None:
        w = waiters.pop(msg[:16], None)
        if w is not None:
            w.set()

    def dispatch() -> None:
        if args.mode == "list":
            while True:
                got = r.blmpop(1, 1, "probe:inbox:A", direction="LEFT", count=DRAIN_COUNT)
                for msg in (got[1] if got else []):
                    wake(msg)
        elif args.mode == "pubsub":
            ps = r.pubsub(ignore_subscribe_messages=True)
            ps.subscribe("probe:ch:A")
            for m in ps.listen():
                wake(m["data"])
        elif args.mode == "stream":
            while True:
                got = r.xreadgroup("g", "A", {"probe:s:A": ">"}, count=DRAIN_COUNT, block=1000)
                for _stream, entries in got or []:
                    r.xack("probe:s:A", "g", *[e[0] for e in entries])
                    for _id, fields in entries:
                        wake(fields[b"m"])

    def send(msg: bytes) -> None:
        if args.mode == "list":
            r.rpush("probe:inbox:B", msg)
        elif args.mode == "pubsub":
            r.publish("probe:ch:B", msg)
        elif args.mode == "stream":
            r.xadd("probe:s:B", {"m": msg}, maxlen=10000, approximate=True)

    counts = [0]
    rtts: list[float] = []
    measuring = [False]
    stop = [False]

    def pinger(i: int) -> None:
        sock = socket.create_connection(("127.0.0.1", args.peer_port)) if args.mode == "tcp" else None
        seq = 0
        while not stop[0]:
            seq += 1
            tag = b"%06d%010d" % (i, seq % 10**10)
            msg = tag + payload
            t0 = time.perf_counter()
            if sock is not None:
                sock.sendall(msg)
                _recv_exact(sock, SMALL_MESSAGE_BYTES)
            else:
                w = gevent.event.AsyncResult()
                waiters[tag] = w
                send(msg)
                w.get(timeout=10)
            if measuring[0]:
                counts[0] += 1
                if len(rtts) < 200_000:
                    rtts.append(time.perf_counter() - t0)

    if args.mode != "tcp":
        gevent.spawn(dispatch)
        gevent.sleep(0.2)
    gs = [gevent.spawn(pinger, i) for i in range(args.concurrency)]
    elapsed = _measured_window(args.seconds, measuring, stop, gs)
    rtts.sort()
    _say(round_trips=counts[0], secs=elapsed, p50_ms=1000 * rtts[len(rtts) // 2] if rtts else None,
         p99_ms=1000 * rtts[int(len(rtts) * 0.99)] if rtts else None)


def _measured_window(seconds: float, measuring: list[bool], stop: list[bool], greenlets: list[Any]) -> float:
    """Warm up, tell the parent the window starts, count for `seconds`, tell it the window ended, stop."""
    import gevent

    gevent.sleep(WARMUP_SECS)
    _say(start=True)
    measuring[0] = True
    t0 = time.perf_counter()
    gevent.sleep(seconds)
    measuring[0] = False
    elapsed = time.perf_counter() - t0
    _say(stop=True)
    stop[0] = True
    gevent.joinall(greenlets, timeout=2)
    return elapsed


def role_command(args: argparse.Namespace) -> None:
    """One process, `concurrency` greenlets: INCR, or the offer script, for `seconds` each."""
    import gevent

    r = _client(args.url, args.parser)
    sha = r.script_load(OFFER_SCRIPT)
    r.delete("probe:online", "probe:shares", "probe:parked", "probe:queue")
    r.set("probe:online", 1)
    counts = [0]
    measuring = [False]
    stop = [False]

    def worker(i: int) -> None:
        head = b"h" * SMALL_MESSAGE_BYTES
        while not stop[0]:
            if args.mode == "incr":
                r.incr("probe:counter")
            else:
                r.evalsha(sha, 4, "probe:online", "probe:shares", "probe:parked", "probe:queue",
                          f"10.0.0.{i}", head)
            if measuring[0]:
                counts[0] += 1

    gs = [gevent.spawn(worker, i) for i in range(args.concurrency)]
    elapsed = _measured_window(args.seconds, measuring, stop, gs)
    _say(round_trips=counts[0], secs=elapsed)


def role_bulk_sink(args: argparse.Namespace) -> None:
    """The receiving worker of a bulk transfer: reads `mib` MiB and says when done."""
    from gevent.server import StreamServer

    r = _client(args.url, args.parser)
    total = args.mib * 1024 * 1024
    if args.mode == "bulk-tcp":
        import gevent.event

        done = gevent.event.Event()

        def sink(sock, _addr):  # type: ignore[no-untyped-def]
            got = 0
            buf = bytearray(PIECE_BYTES)
            while got < total:
                n = sock.recv_into(buf)
                if not n:
                    break
                got += n
            sock.sendall(b"k")
            done.set()

        server = StreamServer(("127.0.0.1", 0), sink)
        server.start()
        _say(ready=True, port=server.server_port)
        done.wait()
    else:
        r.delete("probe:bulk", "probe:credits")
        r.rpush("probe:credits", *([b"c"] * BULK_CREDITS))
        _say(ready=True)
        got = 0
        while got < total:
            _key, piece = r.blpop("probe:bulk", timeout=10)
            got += len(piece)
            r.rpush("probe:credits", b"c")
        r.rpush("probe:done", b"k")


def role_bulk_source(args: argparse.Namespace) -> None:
    """The sending worker: `mib` MiB in 256 KiB pieces, to the sink."""
    from gevent import socket

    r = _client(args.url, args.parser)
    pieces = args.mib * 1024 * 1024 // PIECE_BYTES
    piece = os.urandom(PIECE_BYTES)
    _say(start=True)
    t0 = time.perf_counter()
    if args.mode == "bulk-tcp":
        sock = socket.create_connection(("127.0.0.1", args.peer_port))
        for _ in range(pieces):
            sock.sendall(piece)
        sock.recv(1)
    else:
        r.delete("probe:done")
        for _ in range(pieces):
            r.blpop("probe:credits", timeout=10)
            r.rpush("probe:bulk", piece)
        r.blpop("probe:done", timeout=30)
    elapsed = time.perf_counter() - t0
    _say(stop=True)
    _say(mib=args.mib, secs=elapsed)


def _recv_exact(sock, n: int) -> bytes | None:  # type: ignore[no-untyped-def]
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


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


def _spawn(args: argparse.Namespace, role: str, mode: str, **extra: object) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--mode", mode, "--url", args.url,
           "--parser", args.parser, "--seconds", str(args.seconds), "--mib", str(args.mib)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _read(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"role {proc.args[3:6]} ended early (exit {proc.wait()})")
    return json.loads(line)


def _measure(args: argparse.Namespace, driver: subprocess.Popen, others: list[subprocess.Popen],
             redis_pid: int) -> dict:
    """Wait for the driver's start and stop lines; CPU of every process in between."""
    pids = [driver.pid] + [p.pid for p in others] + [redis_pid]
    assert _read(driver).get("start")
    before = [_cpu_secs(p) for p in pids]
    busy0, t0 = _machine_busy_secs(), time.monotonic()
    assert _read(driver).get("stop")
    after = [_cpu_secs(p) for p in pids]
    busy1, t1 = _machine_busy_secs(), time.monotonic()
    result = _read(driver)
    cpu = [a - b for a, b in zip(after, before, strict=True)]
    result.update(cpu_driver=cpu[0], cpu_others=sum(cpu[1:-1]), cpu_redis=cpu[-1],
                  noise_cores=max(0.0, (busy1 - busy0 - sum(cpu)) / (t1 - t0)))
    return result


def run_handoff(args: argparse.Namespace, mode: str, concurrency: int, redis_pid: int) -> dict:
    echo = _spawn(args, "echo", mode)
    try:
        port = _read(echo).get("port", 0)
        ping = _spawn(args, "ping", mode, concurrency=concurrency, peer_port=port)
        r = _measure(args, ping, [echo], redis_pid)
        ping.wait()
    finally:
        echo.kill()
        echo.wait()
    handoffs = 2 * r["round_trips"]
    clients = r["cpu_driver"] + r["cpu_others"]
    return {"scenario": f"{mode} c{concurrency}", "handoffs_per_s": handoffs / r["secs"],
            "rtt_p50_ms": r["p50_ms"], "rtt_p99_ms": r["p99_ms"],
            "cpu_us_per_handoff_clients": 1e6 * clients / handoffs,
            "cpu_us_per_handoff_redis": 1e6 * r["cpu_redis"] / handoffs,
            "cpu_us_per_handoff_total": 1e6 * (clients + r["cpu_redis"]) / handoffs,
            "noise_cores": r["noise_cores"]}


def run_command(args: argparse.Namespace, mode: str, concurrency: int, redis_pid: int) -> dict:
    proc = _spawn(args, "command", mode, concurrency=concurrency)
    r = _measure(args, proc, [], redis_pid)
    proc.wait()
    n = r["round_trips"]
    return {"scenario": f"{mode} c{concurrency}", "ops_per_s": n / r["secs"],
            "cpu_us_per_op_client": 1e6 * r["cpu_driver"] / n, "cpu_us_per_op_redis": 1e6 * r["cpu_redis"] / n,
            "cpu_us_per_op_total": 1e6 * (r["cpu_driver"] + r["cpu_redis"]) / n, "noise_cores": r["noise_cores"]}


def run_bulk(args: argparse.Namespace, mode: str, redis_pid: int) -> dict:
    sink = _spawn(args, "bulk-sink", mode)
    try:
        port = _read(sink).get("port", 0)
        source = _spawn(args, "bulk-source", mode, peer_port=port)
        r = _measure(args, source, [sink], redis_pid)
        source.wait()
        sink.wait(timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
    mib = r["mib"]
    return {"scenario": f"{mode} {mib} MiB", "mib_per_s": mib / r["secs"],
            "cpu_ms_per_mib_source": 1e3 * r["cpu_driver"] / mib, "cpu_ms_per_mib_sink": 1e3 * r["cpu_others"] / mib,
            "cpu_ms_per_mib_redis": 1e3 * r["cpu_redis"] / mib,
            "cpu_ms_per_mib_total": 1e3 * (r["cpu_driver"] + r["cpu_others"] + r["cpu_redis"]) / mib,
            "noise_cores": r["noise_cores"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=6379, help="redis-server on 127.0.0.1:PORT")
    ap.add_argument("--url", help="or a full redis:// URL")
    ap.add_argument("--parser", choices=("python", "hiredis"), default="python",
                    help="redis-py's reply parser (hiredis must be installed)")
    ap.add_argument("--seconds", type=float, default=4.0, help="measured window per small scenario")
    ap.add_argument("--mib", type=int, default=1024, help="bulk transfer size")
    ap.add_argument("--concurrency", default="1,32", help="greenlets per scenario, comma-separated")
    ap.add_argument("--only", default="", help="comma-separated: command, " + ", ".join(HANDOFFS + BULKS))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--peer-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.url = args.url or f"redis://127.0.0.1:{args.port}/0"
    if args.role:
        from gevent import monkey

        monkey.patch_all()
        args.concurrency = int(args.concurrency.split(",")[0])
        {"echo": role_echo, "ping": role_ping, "command": role_command, "bulk-sink": role_bulk_sink,
         "bulk-source": role_bulk_source}[args.role](args)
        return

    try:
        import redis
    except ImportError:
        sys.exit("redis_probe: needs the redis client, not yet a PTTH dependency: "
                 ".venv/bin/pip install redis==8.2.0 (the version CLUSTER.md's figures used)")
    try:
        info = redis.Redis.from_url(args.url).info("server")
    except redis.RedisError as e:
        sys.exit(f"redis_probe: no redis-server at {args.url}: {e} (start one: redis-server --port "
                 f"{args.port} --save '' --daemonize yes)")
    redis_pid = int(info["process_id"])
    only = set(filter(None, args.only.split(","))) or {"command", *HANDOFFS, *BULKS}
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    print(f"redis-server {info['redis_version']} pid {redis_pid}, redis-py {redis.__version__}, "
          f"parser {args.parser}, {os.cpu_count()} cores", flush=True)
    for rep in range(args.repeat):
        plan: list[tuple[str, object]] = []
        if "command" in only:
            plan += [("command", (m, c)) for m in ("incr", "offer") for c in levels]
        plan += [("handoff", (m, c)) for m in HANDOFFS if m in only for c in levels]
        plan += [("bulk", m) for m in BULKS if m in only]
        for kind, what in plan:
            if kind == "command":
                res = run_command(args, *what, redis_pid=redis_pid)  # type: ignore[misc]
            elif kind == "handoff":
                res = run_handoff(args, *what, redis_pid=redis_pid)  # type: ignore[misc]
            else:
                res = run_bulk(args, what, redis_pid)  # type: ignore[arg-type]
            res.update(run=rep + 1, parser=args.parser)
            results.append(res)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"redis_version": info["redis_version"], "redis_py": redis.__version__,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
