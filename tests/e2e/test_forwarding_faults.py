"""TCP port forwarding when things go wrong (spec 003's error handling, spec 004's
"sadder cases"), with real processes.

TCP end client (this test) -> ptth_client -> relay (gunicorn) -> ptth_server
-> TCP end server (fault_peers.py, or sshd).

Every party is killed in turn while a connection carries data: the others
must see a cut (a reset, never a clean end, wherever the kernel leaves the
proxies the choice) within seconds and stay up, and new connections must work
once the killed party is back. Waits are bounded by socket timeouts, so a hang
fails the test instead of hanging it; nothing asserts on exact timings.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from conftest import Cluster, Proc, Relay, Server, new_key, tripcode_of, wait_until
from fault_peers import (
    BLOCK_BYTES,
    FloodServer,
    HoldingServer,
    Peer,
    RecordingServer,
    pattern_block,
    reset_close,
    wait_cut,
    wait_reset_unread,
)
from sshd import Sshd, start_sshd
from tcp_peers import recv_all, recv_exactly

# How long a party may take to notice a cut: generous for a busy 2-core machine.
CUT_SECS = 15.0
# ptth_server re-listens with backoff after losing the relay.
RECOVER_SECS = 30.0
SOCKET_TIMEOUT_SECS = 20.0


@dataclass
class Forwarding:
    """A relay, ptth_server and ptth_client forwarding each of `targets` (name -> local TCP port)."""

    cluster: Cluster
    tmp: Path
    targets: dict[str, int]
    echo: RecordingServer
    relay_extra: str = ""
    server_key: str = field(default_factory=lambda: new_key("alpha"))
    client_key: str = field(default_factory=lambda: new_key("laptop"))
    relay: Relay | None = None
    server: Server | None = None
    client: Proc | None = None
    ports: dict[str, int] = field(default_factory=dict)  # name -> ptth_client's local port

    def start_relay(self, port: int = 0) -> Relay:
        if self.relay is not None:  # a restart: the same config, on `port`
            self.relay = self.cluster.start_relay(self.relay.config, port)
            return self.relay
        allow = ", ".join(f'"alpha:{name}"' for name in self.targets)
        extra = (f'{self.relay_extra}\n[[clients]]\nname = "laptop"\n'
                 f'tripcode = "{tripcode_of(self.client_key)}"\nallow = [{allow}]\n')
        self.relay = self.cluster.relay({"alpha": self.server_key}, port=port, extra=extra)
        return self.relay

    def start_server(self) -> Server:
        root = self.tmp / "root"
        root.mkdir(exist_ok=True)
        table = "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in self.targets.items())
        self.server = self.cluster.server(self.the_relay, "alpha", self.server_key, root,
                                          extra_config=f"[forwarded_ports]\n{table}")
        return self.server

    def start_client(self) -> Proc:
        names = list(self.targets)
        self.client, ports = self.cluster.client(self.the_relay, self.client_key, [f"0:alpha:{n}" for n in names])
        self.ports = dict(zip(names, ports, strict=True))
        return self.client

    @property
    def the_relay(self) -> Relay:
        assert self.relay is not None
        return self.relay

    @property
    def relay_proc(self) -> Proc:
        return self.the_relay.proc

    @property
    def server_proc(self) -> Proc:
        assert self.server is not None
        return self.server.proc

    @property
    def client_proc(self) -> Proc:
        assert self.client is not None
        return self.client

    def close(self) -> None:
        self.cluster.close()
        self.echo.close()

    def connect(self, name: str = "echo") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.ports[name]), timeout=SOCKET_TIMEOUT_SECS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def open_conversation(self) -> Conversation:
        """An echo connection that has carried a few round trips."""
        before = len(self.echo.peers)
        sock = self.connect()
        try:
            for i in range(5):
                message = f"round trip {i}\n".encode() * 100
                sock.sendall(message)
                assert recv_exactly(sock, len(message)) == message
            opened = self.client_proc.wait_for_output(
                rf"connection (\S+) 127\.0\.0\.1:{sock.getsockname()[1]} -> alpha:echo open")
            return Conversation(sock, self.echo.wait_peer(before + 1), opened.group(1))
        except BaseException:
            sock.close()
            raise

    def works(self) -> bool:
        """True if a new connection echoes 100 kB; False if it is refused or cut."""
        data = os.urandom(100_000)
        try:
            with self.connect() as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock) == data
        except (ConnectionError, AssertionError):
            return False

    def wait_works(self, deadline: float = RECOVER_SECS) -> None:
        end = time.monotonic() + deadline
        while not self.works():
            if time.monotonic() > end:
                raise AssertionError(f"no connection worked within {deadline:.0f} s; client log:\n"
                                     f"{self.client_proc.output()[-3000:]}")
            time.sleep(0.3)

    def assert_refused(self) -> None:
        """A new connection is cut (reset, or closed) at once, without a byte: not left hanging."""
        try:
            sock = self.connect()
        except ConnectionResetError:
            # Accepted and reset before connect() looked: with a timeout set, Python's connect()
            # polls and then reads SO_ERROR, which by then holds the reset.
            return
        with sock:
            try:
                sock.sendall(b"anyone there?\n")
            except ConnectionError:
                return
            _, got = wait_cut(sock, CUT_SECS)
            assert got == b"", f"a refused connection answered {got!r}"

    def assert_up(self, *procs: Proc) -> None:
        for proc in procs:
            assert proc.popen.poll() is None, f"{proc.args} exited:\n{proc.output()[-3000:]}"


@dataclass
class Conversation:
    sock: socket.socket  # the end client's side
    peer: Peer  # the end server's side
    id: str  # the connection id's last 8 characters, as the logs show it

    def closed_reason(self, proxy: Proc) -> str:
        """The reason in `proxy`'s "connection ID ... closed (REASON): ..." line; "" for a clean end."""
        m = proxy.wait_for_output(rf"connection {re.escape(self.id)} .* closed(?: \((.*)\))?: \d+ bytes")
        return m.group(1) or ""

    def relay_aborted(self, relay: Proc) -> str:
        """Why the relay aborted this connection."""
        return relay.wait_for_output(rf"connection {re.escape(self.id)} laptop -> alpha:echo aborted: (.*)").group(1)


# A proxy's reason when the relay cut the connection: its stream broke, or the relay refused a POST.
CUT_BY_RELAY = r"relay (stream: |answered )"
RESET_BY_PEER = "TCP peer: Connection reset by peer"






# ---- helpers for the tests that fill the tunnel

STREAM_BYTES = 256 * 1024 * 1024
RSS_GROWTH_LIMIT = 64 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class RssWatch:
    """Samples the RSS of some processes until stopped; keeps each one's peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: rss_bytes(pid) for name, pid in pids.items()}
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def stop(self) -> dict[str, int]:
        """Each process's growth over its RSS at the start."""
        self._stop.set()
        self._thread.join()
        return {name: self.peak[name] - self.start[name] for name in self.pids}


def send_pattern(sock: socket.socket, start: int, end: int) -> int:
    """Send bytes [start, end) of the pattern stream; return where it stopped (a send timed out)."""
    sent = start
    index, block = -1, b""
    while sent < end:
        if sent // BLOCK_BYTES != index:
            index = sent // BLOCK_BYTES
            block = pattern_block(index)
        offset = sent - index * BLOCK_BYTES
        try:
            # send, not sendall: every byte the tunnel took in is counted, timeout or not.
            sent += sock.send(memoryview(block)[offset:offset + end - sent])
        except TimeoutError:
            break
    return sent


def new_forwarding(tmp: Path, relay_extra: str = "", extra_targets: dict[str, int] | None = None,
                   server: bool = True, client: bool = True) -> Forwarding:
    tmp.mkdir(parents=True, exist_ok=True)
    echo = RecordingServer()
    fw = Forwarding(Cluster(tmp), tmp, {"echo": echo.port, **(extra_targets or {})}, echo, relay_extra)
    try:
        fw.start_relay()
        if server:
            fw.start_server()
        if client:
            fw.start_client()
    except BaseException:
        fw.close()
        raise
    return fw


@pytest.fixture
def make_forwarding(tmp_path: Path) -> Iterator[Callable[..., Forwarding]]:
    """new_forwarding for a cluster of the test's own, stopped afterwards."""
    made: list[Forwarding] = []

    def make(**kwargs: object) -> Forwarding:
        fw = new_forwarding(tmp_path / f"cluster-{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(fw)
        return fw

    yield make
    for fw in made:
        fw.close()


@pytest.fixture
def fresh(make_forwarding: Callable[..., Forwarding]) -> Forwarding:
    """A whole cluster of its own, for a test that kills parts of it."""
    return make_forwarding()


@pytest.fixture(scope="module")
def holding() -> Iterator[HoldingServer]:
    server = HoldingServer()
    yield server
    server.release.set()
    server.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, holding: HoldingServer) -> Iterator[Forwarding]:
    """One cluster for the tests that cut only TCP connections, never a process."""
    fw = new_forwarding(tmp_path_factory.mktemp("faults"), extra_targets={"hold": holding.port})
    yield fw
    fw.close()


# ---- each party gone in turn, mid-conversation ----------------------------------

def test_end_client_reset_cuts_the_end_server(shared: Forwarding) -> None:
    c = shared.open_conversation()
    reset_close(c.sock)
    assert c.peer.wait_ended(CUT_SECS) == "reset"  # not "eof": the end client never finished
    assert c.closed_reason(shared.client_proc) == RESET_BY_PEER
    assert re.match(CUT_BY_RELAY, c.closed_reason(shared.server_proc))
    shared.assert_up(shared.relay_proc, shared.server_proc, shared.client_proc)
    assert shared.works()


def test_end_server_closes_mid_connection(shared: Forwarding) -> None:
    c = shared.open_conversation()
    with c.sock:
        c.peer.sock.sendall(b"last words\n")
        c.peer.cut("close")
        # A FIN ends the server's direction cleanly: all it sent arrives, then the end.
        assert wait_cut(c.sock, CUT_SECS) == ("eof", b"last words\n")
    # The end client closing too ends the other direction: a clean end at both proxies.
    assert c.closed_reason(shared.client_proc) == ""
    assert c.closed_reason(shared.server_proc) == ""
    shared.assert_up(shared.relay_proc, shared.server_proc, shared.client_proc)
    assert shared.works()


def test_end_server_resets_mid_connection(shared: Forwarding) -> None:
    c = shared.open_conversation()
    with c.sock:
        c.peer.cut("reset")
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
    assert c.closed_reason(shared.server_proc) == RESET_BY_PEER
    assert re.match(CUT_BY_RELAY, c.closed_reason(shared.client_proc))
    shared.assert_up(shared.relay_proc, shared.server_proc, shared.client_proc)
    assert shared.works()


def test_ptth_client_killed(fresh: Forwarding) -> None:
    c = fresh.open_conversation()
    with c.sock:
        fresh.client_proc.kill()
        assert c.peer.wait_ended(CUT_SECS) == "reset"
        wait_cut(c.sock, CUT_SECS)  # the kernel closed it, with an end or a reset: either will do
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.server_proc))
    c.relay_aborted(fresh.relay_proc)
    fresh.assert_up(fresh.relay_proc, fresh.server_proc)
    fresh.start_client()
    assert fresh.works()


def test_relay_killed_then_restarted_on_the_same_port(fresh: Forwarding) -> None:
    c = fresh.open_conversation()
    with c.sock:
        fresh.relay_proc.kill()
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
        assert c.peer.wait_ended(CUT_SECS) == "reset"
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.client_proc))
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.server_proc))
    fresh.assert_refused()  # no relay: a reset at once, not a hang
    fresh.client_proc.wait_for_output(r"alpha:echo failed: cannot reach the relay")
    fresh.assert_up(fresh.server_proc, fresh.client_proc)
    fresh.start_relay(fresh.the_relay.port)
    fresh.wait_works()  # ptth_server came back by itself, and ptth_client never needed to
    fresh.assert_up(fresh.server_proc, fresh.client_proc)


def test_ptth_server_killed(fresh: Forwarding) -> None:
    c = fresh.open_conversation()
    with c.sock:
        fresh.server_proc.kill()
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
        c.peer.wait_ended(CUT_SECS)  # the kernel closed it, with an end or a reset
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.client_proc))
    c.relay_aborted(fresh.relay_proc)
    fresh.assert_up(fresh.relay_proc, fresh.client_proc)
    fresh.start_server()
    fresh.wait_works()


def test_relay_stopped_gracefully_cuts_open_connections(fresh: Forwarding) -> None:
    c = fresh.open_conversation()
    with c.sock:
        # Proc.stop fails the test if the relay takes longer: not gunicorn's 40 s graceful_timeout.
        fresh.relay_proc.stop(signal.SIGTERM, timeout=CUT_SECS)
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
        assert c.peer.wait_ended(CUT_SECS) == "reset"
    if not fresh.the_relay.cluster:  # in a cluster the first to see it may be another worker's stream
        assert c.relay_aborted(fresh.relay_proc) == "the relay is stopping"
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.client_proc))
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.server_proc))
    fresh.assert_up(fresh.server_proc, fresh.client_proc)


def test_relay_killed_while_both_ends_read_nothing(make_forwarding: Callable[..., Forwarding]) -> None:
    """The cut must reach an end that has stopped reading too, as a reset: it may never read again."""
    hold, flood = HoldingServer(), FloodServer()
    try:
        fw = make_forwarding(extra_targets={"hold": hold.port, "flood": flood.port})
        with fw.connect("flood") as stalled_client, fw.connect("hold") as sender:
            sender.settimeout(2.0)
            assert send_pattern(sender, 0, STREAM_BYTES) < STREAM_BYTES  # the tunnel is full both ways now
            stalled_server = hold.connections[0]
            fw.relay_proc.kill()
            wait_reset_unread(stalled_server, CUT_SECS)  # ptth_server's doing
            wait_reset_unread(stalled_client, CUT_SECS)  # ptth_client's doing
    finally:
        hold.release.set()
        hold.close()
        flood.close()


# ---- spec 004's order cases -------------------------------------------------------

def test_client_started_before_the_server(make_forwarding: Callable[..., Forwarding]) -> None:
    fw = make_forwarding(server=False)
    fw.assert_refused()
    fw.client_proc.wait_for_output(r"-> alpha:echo refused: 502 .*offline or does not forward port 'echo'")
    fw.start_server()
    fw.wait_works()  # the same ptth_client, never restarted


def test_server_restarted_with_a_connection_open(fresh: Forwarding) -> None:
    c = fresh.open_conversation()
    with c.sock:
        fresh.server_proc.stop(signal.SIGTERM, timeout=CUT_SECS)
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
        assert c.peer.wait_ended(CUT_SECS) == "reset"
    c.relay_aborted(fresh.relay_proc)
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.client_proc))
    fresh.start_server()
    fresh.wait_works()
    fresh.assert_up(fresh.relay_proc, fresh.client_proc)


def test_client_restarted_with_a_connection_open(fresh: Forwarding) -> None:
    c = fresh.open_conversation()
    with c.sock:
        fresh.client_proc.stop(signal.SIGTERM, timeout=CUT_SECS)
        assert wait_cut(c.sock, CUT_SECS) == ("reset", b"")
        assert c.peer.wait_ended(CUT_SECS) == "reset"
    c.relay_aborted(fresh.relay_proc)
    assert re.match(CUT_BY_RELAY, c.closed_reason(fresh.server_proc))
    fresh.start_client()
    assert fresh.works()
    fresh.assert_up(fresh.relay_proc, fresh.server_proc)


# ---- the relay's idle timeout -----------------------------------------------------

def test_relay_closes_idle_connections_and_only_those(make_forwarding: Callable[..., Forwarding]) -> None:
    fw = make_forwarding(relay_extra="tcp_idle_timeout_secs = 10")  # the least allowed
    idle = fw.open_conversation()
    up = fw.open_conversation()  # the end client sends a byte every 2 s (echoed)
    down = fw.open_conversation()  # only the end server sends, a byte every 2 s
    with idle.sock, up.sock, down.sock:
        start = time.monotonic()
        idle_cut = None
        # Until the idle one is cut, and 2 s past the 10 s the others would have had, idle.
        while idle_cut is None or time.monotonic() - start < 12:
            assert time.monotonic() - start < 30, "the idle connection is still open after 30 s"
            for c in (up, down):
                assert not c.peer.ended.is_set(), f"a connection in use was closed ({c.peer.how})"
            up.sock.sendall(b"u")
            assert recv_exactly(up.sock, 1) == b"u"
            down.peer.sock.sendall(b"d")
            assert recv_exactly(down.sock, 1) == b"d"
            if idle_cut is None and select.select([idle.sock], [], [], 0)[0]:
                idle_cut = wait_cut(idle.sock, CUT_SECS)
            time.sleep(2)
        assert idle_cut == ("reset", b"")
        assert idle.peer.wait_ended(CUT_SECS) == "reset"
        # Both others lived past 12 s, whichever way their bytes went.
        for c in (up, down):
            assert not c.peer.ended.is_set(), c.peer.how
            c.sock.sendall(b"still there?")
            assert recv_exactly(c.sock, 12) == b"still there?"
    assert idle.relay_aborted(fw.relay_proc) == "idle for 10 s (tcp_idle_timeout_secs)"
    assert fw.relay_proc.output().count("aborted: idle") == 1, fw.relay_proc.output()
    assert re.match(CUT_BY_RELAY, idle.closed_reason(fw.client_proc))
    assert re.match(CUT_BY_RELAY, idle.closed_reason(fw.server_proc))


# ---- backpressure -------------------------------------------------------------------

def test_a_reader_that_stops_stops_the_sender(shared: Forwarding, holding: HoldingServer) -> None:
    """256 MiB into a port whose server reads nothing: the sender blocks, and nobody holds it all."""
    assert shared.works()  # warm: the processes have served a connection before we measure
    watch = RssWatch({"relay worker": shared.the_relay.worker_pid(), "ptth_client": shared.client_proc.pid,
                      "ptth_server": shared.server_proc.pid})
    try:
        with shared.connect("hold") as sock:
            sock.settimeout(5.0)
            accepted = send_pattern(sock, 0, STREAM_BYTES)
            # Kernel socket buffers (up to tcp_rmem's 32 MiB each, on 4 TCP connections) hold some.
            assert accepted < STREAM_BYTES // 2, f"the tunnel took {accepted} bytes that nobody reads"
            # Now the end server reads: the rest goes through, and all of it arrives, in order.
            holding.release.set()
            sock.settimeout(SOCKET_TIMEOUT_SECS)
            assert send_pattern(sock, accepted, STREAM_BYTES) == STREAM_BYTES
            sock.shutdown(socket.SHUT_WR)
            answer = recv_all(sock)
    finally:
        growth = watch.stop()
    assert answer == f"{STREAM_BYTES} ok\n".encode()
    for name, grew in growth.items():
        assert grew < RSS_GROWTH_LIMIT, f"{name} grew by {grew / 2**20:.0f} MiB"
    print(f"accepted before blocking: {accepted / 2**20:.1f} MiB; RSS growth in MiB: "
          f"{ {name: round(grew / 2**20, 1) for name, grew in growth.items()} }")


# ---- a real interactive program: ssh ----------------------------------------------

@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    cluster = Cluster(tmp_path)
    try:
        yield start_sshd(cluster, tmp_path / "sshd")
    finally:
        cluster.close()


def read_line(stream: IO[bytes], timeout: float = SOCKET_TIMEOUT_SECS) -> bytes:
    """One line from a pipe, or AssertionError after `timeout`: a stalled byte fails, not hangs."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no answer within {timeout:.0f} s"
    return stream.readline()


def test_ssh_through_the_forward(make_forwarding: Callable[..., Forwarding], sshd: Sshd,
                                 tmp_path: Path) -> None:
    fw = make_forwarding(extra_targets={"ssh": sshd.port})
    port = fw.ports["ssh"]
    remote_file = tmp_path / "remote.bin"
    remote_file.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    digest = hashlib.sha256(remote_file.read_bytes()).hexdigest()

    # A command and a download.
    out = subprocess.run(sshd.ssh(port, f"echo hello; cat {shlex.quote(str(remote_file))} | sha256sum"),
                         capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout.decode() == f"hello\n{digest}  -\n"

    # An upload through ssh's stdin, and one with scp.
    upload = os.urandom(4 * 1024 * 1024 + 3)
    target = tmp_path / "uploaded.bin"
    subprocess.run(sshd.ssh(port, f"cat > {shlex.quote(str(target))}"), input=upload, capture_output=True,
                   timeout=60, check=True)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(upload).digest()
    scp_target = tmp_path / "scp-uploaded.bin"
    subprocess.run(sshd.scp(port, remote_file, str(scp_target)), capture_output=True, timeout=60, check=True)
    assert hashlib.sha256(scp_target.read_bytes()).hexdigest() == digest

    # An interactive session: each line is answered before the next is typed.
    with subprocess.Popen(sshd.ssh(port, 'while read -r line; do echo "got $line"; done'),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as session:
        assert session.stdin is not None and session.stdout is not None
        try:
            for i in range(20):
                session.stdin.write(f"line {i}\n".encode())
                session.stdin.flush()
                assert read_line(session.stdout) == f"got line {i}\n".encode()
            session.stdin.close()
            assert session.wait(SOCKET_TIMEOUT_SECS) == 0
        finally:
            session.kill()
    # Four ssh connections, each ended cleanly: a "closed" line without a "(reason)" at each proxy.
    for proc, closed in ((fw.client_proc, r"-> alpha:ssh closed"), (fw.server_proc, r"to ssh \(\S+\) closed")):
        wait_until(lambda proc=proc, closed=closed: len(re.findall(closed + ": ", proc.output())) == 4,
                   "four clean ends", proc)
        assert not re.search(closed + r" \(", proc.output()), proc.output()
