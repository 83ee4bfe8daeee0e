"""What a large request head costs the relay's one worker, side by side.

    .venv/bin/python bench/heads.py [--rounds N]

Starts the relay as deployed (gunicorn, gevent worker, conf/gunicorn.conf.py)
twice on 127.0.0.1: once with gunicorn's C parser (gunicorn_h1c, as
configured) and once with its pure Python one (`--http-parser python`). Then
sends heads of growing size to /frontend/relay_up_check on a fresh
connection each, alternating between the two relays, and reports the median
time from the head's first byte to the answer's first byte, for each parser
and as a ratio. The largest head is the worst the relay's limits accept
(limit_request_fields x limit_request_field_size); the README's nginx stops
anything over 128 KiB before it reaches the relay.

While one worker parses a head it serves nobody else, so 1 / time is how
many such heads a second one client needs to keep the relay busy.
"""

from __future__ import annotations

import argparse
import runpy
import socket
import statistics
import tempfile
import time
from pathlib import Path

from plan import REPO
from targets import STOP_SECS, Proc, ProcError, procs


def start_relay(parser: str, config: Path, log: Path) -> tuple[Proc, int]:
    """The relay with gunicorn's `parser` ("fast": C, "python"), once it answers."""
    try:
        return procs.start_relay(config, log, gunicorn_args=["--http-parser", parser])
    except ProcError as e:
        raise SystemExit(f"relay with the {parser} parser did not start: {e}") from None


def head(fields: int, size: int) -> bytes:
    lines = "".join(f"X-Pad-{i}: {'a' * size}\r\n" for i in range(fields))
    return f"GET /frontend/relay_up_check HTTP/1.1\r\nHost: relay\r\n{lines}\r\n".encode()


def one(port: int, data: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(data)
        first = sock.recv(64)
        elapsed = time.perf_counter() - started
    assert first.startswith(b"HTTP/1.1 200"), first
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    settings = runpy.run_path(str(REPO / "conf" / "gunicorn.conf.py"))
    fields, size = settings["limit_request_fields"] - 1, settings["limit_request_field_size"]  # (and Host)
    # ...up to the most the README's nginx lets through (128 KiB), then the most gunicorn accepts.
    shapes = [(1, 100), (10, 1024), (7, size - 64), (fields, size // 2), (fields, size - 64)]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "relay.toml"
        config.write_text("")
        relays: dict[str, tuple[Proc, int]] = {}
        try:
            for name in ("fast", "python"):
                relays[name] = start_relay(name, config, Path(tmp) / f"{name}.log")
            print("| head | bytes | C parser (ms) | Python parser (ms) | ratio |\n| --- | --- | --- | --- | --- |")
            for n, s in shapes:
                data = head(n, s)
                times: dict[str, list[float]] = {"fast": [], "python": []}
                for _ in range(args.rounds):
                    for name, (_, port) in relays.items():
                        times[name].append(one(port, data))
                fast, slow = statistics.median(times["fast"]), statistics.median(times["python"])
                print(f"| {n} x {s} B | {len(data):,} | {fast * 1000:.1f} | {slow * 1000:.1f} | "
                      f"{slow / fast:.1f}x |")
        finally:
            for proc, _ in relays.values():
                proc.terminate(STOP_SECS)


if __name__ == "__main__":
    main()
