"""Keep many idle servers' listens parked at a relay (benchmark helper).

    python bench/idle_servers.py --relay http://127.0.0.1:PORT --keys KEYS.json
        [--ramp-secs 5] [--duration-secs 900] [--spec-002]

KEYS.json maps server names to API keys. Each name gets one greenlet that
loops `GET /7ZSFUKGV/http_listen/NAME` with its X-ApiKey on one kept-alive
connection, as an idle ptth_server's listen loop does (one listen parked,
announcing PTTH's features, so the relay parks it for its
listen_timeout_secs), but on raw gevent sockets: a thousand greenlets cost
this process a few MiB, and it is the relay's memory that the benchmark
measures. --spec-002 announces nothing, as a spec 002 server (the relay then
parks each listen at most 30 s). The first listens are spread over
--ramp-secs, so the re-polls that follow each listen timeout are spread as
well, as those of real servers would be. A refused listen (a full relay's
503) waits as ptth_server does: its Retry-After, with jitter. Stops by
itself after --duration-secs.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections import Counter
from urllib.parse import quote, urlsplit

import gevent
from gevent import socket

# Above the relay's listen_timeout_secs (at most 300 s), as in ptth_server.
READ_TIMEOUT_SECS = 330.0
# Wait after a refused or failed listen, so a broken relay is not hammered.
RETRY_SECS = 1.0
# Headers bigger than this are a broken peer, not a relay.
MAX_HEAD_BYTES = 64 * 1024
STATUS_EVERY_SECS = 5.0


class _Stats:
    def __init__(self) -> None:
        self.connects = 0
        self.sent = 0
        self.errors = 0
        self.answers: Counter[int] = Counter()


def _read_response(reader) -> tuple[int, dict[str, str]]:  # type: ignore[no-untyped-def]
    """Read one HTTP/1.1 response (its body is dropped); return status and headers."""
    status_line = reader.readline(MAX_HEAD_BYTES)
    if not status_line:
        raise ConnectionError("relay closed the connection")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(MAX_HEAD_BYTES)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int(reader.readline(MAX_HEAD_BYTES).split(b";")[0], 16)
            reader.read(size + 2)
            if size == 0:
                break
    elif status not in (204, 304):
        reader.read(int(headers.get("content-length", "0")))
    return status, headers


def _listen_forever(host: str, port: int, name: str, key: str, start_in: float, stop_at: float,
                    stats: _Stats, features: str) -> None:
    request = (f"GET /7ZSFUKGV/http_listen/{quote(name, safe='')} HTTP/1.1\r\n"
               f"Host: {host}:{port}\r\nX-ApiKey: {key}\r\nUser-Agent: ptth-bench-idle\r\n{features}\r\n").encode()
    gevent.sleep(start_in)
    sock = reader = None
    while time.monotonic() < stop_at:
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=READ_TIMEOUT_SECS)
                reader = sock.makefile("rb")
                stats.connects += 1
            sock.sendall(request)
            stats.sent += 1
            status, headers = _read_response(reader)
            stats.answers[status] += 1
            if headers.get("connection", "").lower() == "close":
                sock.close()
                sock = None
            if status == 403:
                print(f"idle_servers: relay refused {name}: is it in the relay config?", file=sys.stderr)
                return
            if status not in (200, 204):
                asked = headers.get("retry-after", "")
                gevent.sleep(random.uniform(0.5, 1.0) * (int(asked) if asked.isdigit() else RETRY_SECS))
        except (OSError, ValueError, IndexError):
            stats.errors += 1
            if sock is not None:
                sock.close()
            sock = None
            gevent.sleep(RETRY_SECS)
    if sock is not None:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relay", required=True, help="relay base URL, http://127.0.0.1:PORT")
    parser.add_argument("--keys", required=True, help="JSON file mapping server names to API keys")
    parser.add_argument("--ramp-secs", type=float, default=5.0, help="spread the first listens over this")
    parser.add_argument("--duration-secs", type=float, default=900.0, help="stop after this long")
    parser.add_argument("--spec-002", action="store_true", help="announce no PTTH features, as a spec 002 server")
    args = parser.parse_args(argv)
    features = "" if args.spec_002 else "X-PTTH-Features: ack\r\n"

    # One socket per server, plus a few: raise the soft open-file limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    url = urlsplit(args.relay)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    with open(args.keys, encoding="utf-8") as f:
        keys: dict[str, str] = json.load(f)
    stats = _Stats()
    stop_at = time.monotonic() + args.duration_secs
    greenlets = [
        gevent.spawn(_listen_forever, host, port, name, key, random.uniform(0, args.ramp_secs), stop_at, stats,
                     features)
        for name, key in keys.items()
    ]
    print(f"idle_servers: {len(greenlets)} servers listening at {args.relay}", file=sys.stderr, flush=True)
    while time.monotonic() < stop_at and any(not g.dead for g in greenlets):
        gevent.sleep(STATUS_EVERY_SECS)
        print(f"idle_servers: {stats.connects} connects, {stats.sent} listens sent, "
              f"answers {dict(stats.answers)}, {stats.errors} errors", file=sys.stderr, flush=True)
    gevent.killall(greenlets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
