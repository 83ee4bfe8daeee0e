"""TCP port forwarding through the relay (spec 003), with real processes.

TCP end client (this test) -> ptth_client -> relay (gunicorn) -> ptth_server
-> TCP end server (tcp_peers.py, or ptth_file_server for curl).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import Cluster, Proc, Relay, new_key, refusing_socket, tripcode_of, wait_until
from tcp_peers import DigestServer, EchoServer, recv_all, recv_exactly, unused_port_socket

# Long enough for a busy 2-core machine; a stalled byte would never arrive at all.
SOCKET_TIMEOUT_SECS = 20.0


@dataclass
class Forwarding:
    relay: Relay
    server: Proc
    client: Proc
    ports: dict[str, int]  # forward name -> local port of ptth_client
    echo: EchoServer
    digest: DigestServer
    http_files: dict[str, bytes]
    cluster: Cluster


def client_config(name: str, key: str, allow: list[str]) -> str:
    quoted = ", ".join(f'"{a}"' for a in allow)
    return f'[[clients]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\nallow = [{quoted}]\n'




@pytest.fixture(scope="module")
def fwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forwarding]:
    tmp = tmp_path_factory.mktemp("forwarding")
    c = Cluster(tmp)
    echo, digest = EchoServer(), DigestServer()
    web_root = tmp / "web"
    web_root.mkdir()
    files = {"big.bin": os.urandom(5 * 1024 * 1024 + 3), "small.txt": b"through a forwarded port\n"}
    for name, data in files.items():
        (web_root / name).write_bytes(data)
    _, web_url = c.file_server(web_root)
    web_port = int(web_url.rsplit(":", 1)[1])
    server_key, client_key = new_key("alpha"), new_key("laptop")
    extra = client_config("laptop", client_key, ["alpha:echo", "alpha:digest", "alpha:web", "alpha:closed",
                                                 "alpha:nosuch"])
    relay = c.relay({"alpha": server_key}, extra=extra)
    root = tmp / "root"
    root.mkdir()
    closed = refusing_socket()
    ports_table = (f'[forwarded_ports]\necho = "127.0.0.1:{echo.port}"\ndigest = "127.0.0.1:{digest.port}"\n'
                   f'web = "127.0.0.1:{web_port}"\nclosed = "127.0.0.1:{closed.getsockname()[1]}"\n'
                   f'forbidden = "127.0.0.1:{echo.port}"\n')
    server = c.server(relay, "alpha", server_key, root, extra_config=ports_table)
    names = ["echo", "digest", "web", "closed", "nosuch", "forbidden"]
    client, ports = c.client(relay, client_key, [f"0:alpha:{n}" for n in names])
    yield Forwarding(relay, server.proc, client, dict(zip(names, ports, strict=True)), echo, digest, files, c)
    c.close()
    echo.close()
    digest.close()
    closed.close()


def connect(fwd: Forwarding, name: str) -> socket.socket:
    """A connection to the client proxy from a port no earlier one had: the logs name it by its port."""
    sock = unused_port_socket()
    try:
        sock.settimeout(SOCKET_TIMEOUT_SECS)
        sock.connect(("127.0.0.1", fwd.ports[name]))
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock




def test_single_bytes_cross_at_once(fwd: Forwarding) -> None:
    """A keystroke is echoed alone: no hop waits for a buffer to fill."""
    with connect(fwd, "echo") as sock:
        for i in range(50):
            byte = bytes([i])
            sock.sendall(byte)
            assert recv_exactly(sock, 1) == byte


def test_twenty_connections_random_sizes_byte_for_byte(fwd: Forwarding) -> None:
    sizes = [1, 2, 1023, 1025, 4 * 1024 * 1024] + [random.randint(1, 4 * 1024 * 1024) for _ in range(15)]
    errors: list[str] = []

    def one(i: int, size: int) -> None:
        data = os.urandom(size)
        try:
            with connect(fwd, "echo") as sock:
                # Send and receive at once, as a real protocol does; the tunnel's buffers are bounded.
                sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
                sender.start()
                got = recv_all(sock)
                sender.join()
            if got != data:
                errors.append(f"connection {i}: sent {size} bytes, got {len(got)} back, different")
        except OSError as e:
            errors.append(f"connection {i} ({size} bytes): {e}")

    threads = [threading.Thread(target=one, args=(i, size)) for i, size in enumerate(sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_half_close_reaches_the_server_which_still_answers(fwd: Forwarding) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    with connect(fwd, "digest") as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)
    assert answer == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


def test_curl_fetches_through_the_forward(fwd: Forwarding, tmp_path: Path) -> None:
    out = tmp_path / "big.bin"
    subprocess.run(["curl", "-sSf", "-o", str(out), f"http://127.0.0.1:{fwd.ports['web']}/files/big.bin"],
                   check=True, timeout=60)
    assert out.read_bytes() == fwd.http_files["big.bin"]
    small = subprocess.run(["curl", "-sSf", f"http://127.0.0.1:{fwd.ports['web']}/files/small.txt"],
                           check=True, timeout=60, capture_output=True).stdout
    assert small == fwd.http_files["small.txt"]


def refused(fwd: Forwarding, name: str) -> None:
    """The TCP connection is reset (or closed) without a byte; nothing else is affected.

    On a busy machine the reset can come before connect() returns: that is the refusal too.
    """
    try:
        with connect(fwd, name) as sock:
            assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def test_local_port_with_nothing_listening_is_refused(fwd: Forwarding) -> None:
    refused(fwd, "closed")
    fwd.client.wait_for_output(r"-> alpha:closed refused: 502 .*cannot connect to port closed")
    fwd.server.wait_for_output(r"refused: cannot connect to port closed")


def test_port_the_server_does_not_forward_is_refused(fwd: Forwarding) -> None:
    refused(fwd, "nosuch")
    fwd.client.wait_for_output(r"-> alpha:nosuch refused: 502 .*does not forward port 'nosuch'")


def test_client_may_not_reach_what_it_is_not_allowed(fwd: Forwarding) -> None:
    refused(fwd, "forbidden")
    fwd.client.wait_for_output(r"-> alpha:forbidden refused: 403 .*may not reach alpha:forbidden")
    assert "does not allow this client to reach alpha:forbidden" in fwd.client.output()  # warned at start


def test_connections_log_open_and_close(fwd: Forwarding) -> None:
    with connect(fwd, "echo") as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(b"thirteen byte")
        assert recv_exactly(sock, 13) == b"thirteen byte"
    conn = rf"connection (\S+) 127\.0\.0\.1:{local_port} -> alpha:echo"
    conn_id = fwd.client.wait_for_output(conn + " open").group(1)
    fwd.client.wait_for_output(rf"connection {conn_id} 127\.0\.0\.1:{local_port} -> alpha:echo closed: "
                               r"13 bytes up, 13 down")
    fwd.server.wait_for_output(rf"connection {conn_id} from client laptop to echo \(127\.0\.0\.1:\d+\) "
                               r"closed: 13 bytes in, 13 out")


def test_dev_server_refuses_forwarding_instead_of_stalling(tmp_path: Path) -> None:
    """gevent's own WSGI server cannot hand on small chunks at once: 501, never a stall."""
    key = new_key("laptop")
    config = tmp_path / "relay.toml"
    config.write_text(client_config("laptop", key, ["alpha:*"]))
    proc = Proc([sys.executable, "ptth_relay.py", "--config", str(config), "--bind", "127.0.0.1:0"],
                tmp_path / "relay.log")
    try:
        port = int(proc.wait_for_output(r"listening on http://127\.0\.0\.1:(\d+)/").group(1))
        r = requests.post(f"http://127.0.0.1:{port}/frontend/tcp/connect/alpha/ssh",
                          headers={"X-ApiKey": key}, timeout=10)
        assert r.status_code == 501 and "gunicorn" in r.text
        r = requests.post(f"http://127.0.0.1:{port}/frontend/tcp/check", headers={"X-ApiKey": key}, timeout=10)
        assert r.status_code == 200 and r.json() == {"client": "laptop", "allow": ["alpha:*"]}
    finally:
        proc.kill()


def test_a_client_added_to_the_config_works_without_a_restart(fwd: Forwarding, tmp_path: Path) -> None:
    """[[clients]] changes apply on the relay's config reload; open connections and processes stay."""
    key = new_key("tablet")
    with connect(fwd, "echo") as open_sock:
        open_sock.sendall(b"a")
        assert recv_exactly(open_sock, 1) == b"a"
        config = fwd.relay.config
        before = fwd.relay.proc.output().count("config reloaded from")
        saving = config.with_suffix(".saving")
        saving.write_text(config.read_text() + client_config("tablet", key, ["alpha:echo"]))
        os.replace(saving, config)
        wait_until(lambda: fwd.relay.logged_by_all("config reloaded from", before), "reload", fwd.relay.proc)
        tablet, (port,) = fwd.cluster.client(fwd.relay, key, ["0:alpha:echo"])
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECS) as sock:
            sock.sendall(b"new client")
            assert recv_exactly(sock, 10) == b"new client"
        tablet.stop()
        open_sock.sendall(b"b")  # the connection opened before the reload still works
        assert recv_exactly(open_sock, 1) == b"b"
