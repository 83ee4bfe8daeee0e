"""Real processes for TCP port forwarding over QUIC (spec 004), all on 127.0.0.1.

TCP end client (a test) -> ptth_quic_client.py -> ptth_quic_relay.py (UDP)
-> ptth_quic_end_server.py, or ptth_server.py with a [quic] table -> TCP end
server (tcp_peers.py / fault_peers.py).

`QuicForwarding` starts and restarts each proxy and the relay. A restarted
relay binds the same UDP port and reuses its certificate files, so the
fingerprints the proxies pinned stay valid. Every process logs to its own file
(a new one per start), which helpers read and failures show.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, Proc, new_key, tripcode_of
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from tcp_peers import EchoServer, TcpServer, recv_all, unused_port_socket

from ptth_lib.forward.quic import cert, driver
from ptth_lib.forward.quic.driver import QuicPeer
from ptth_lib.forward.quic.streams import read_tip
from ptth_lib.wire import tip

# A wait that should take well under a second, with room for a busy 2-core machine.
STARTUP_SECS = 20.0
SOCKET_TIMEOUT_SECS = 20.0
# Proxies reconnect to the relay with backoff (up to 30 s between attempts).
RECOVER_SECS = 45.0

END_SERVER = "ptth_quic_end_server"
PTTH_SERVER = "ptth_server"

# An unrelated, well-formed fingerprint: what a proxy pins when it has the wrong one.
WRONG_FINGERPRINT = "ab" * 32


def count_matches(proc: Proc, pattern: str) -> int:
    return len(re.findall(pattern, proc.output()))


def wait_count(proc: Proc, pattern: str, count: int, deadline: float = STARTUP_SECS) -> None:
    """Wait until `pattern` occurs at least `count` times in the log of `proc`."""
    end = time.monotonic() + deadline
    while count_matches(proc, pattern) < count:
        if time.monotonic() > end or proc.popen.poll() is not None:
            raise AssertionError(f"{pattern!r} not seen {count} times in the output of {proc.args} "
                                 f"(exit code {proc.popen.poll()}):\n{proc.output()[-3000:]}")
        time.sleep(0.05)


def wait_exit(proc: Proc, timeout: float = STARTUP_SECS) -> int:
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.args} is still running after {timeout:.0f} s:\n"
                             f"{proc.output()[-3000:]}") from None


@dataclass
class QuicForwarding:
    """A QUIC relay, a server proxy named alpha and a client proxy named laptop.

    `targets` is the server's [forwarded_ports] (port name -> TCP end server
    port); `allow` is laptop's allow list at the relay; `forwards` are the port
    names of alpha the client proxy forwards (each on a free local port).
    """

    tmp: Path
    targets: dict[str, int]
    allow: list[str]
    forwards: list[str]
    server_kind: str = END_SERVER
    server_key: str = field(default_factory=lambda: new_key("alpha"))
    client_key: str = field(default_factory=lambda: new_key("laptop"))
    # A second registered client, for the tests that must show its key never reached the relay.
    other_client_key: str = field(default_factory=lambda: new_key("mallory"))
    relay: Proc | None = None
    relay_port: int = 0
    fingerprint: str = ""
    server: Proc | None = None
    client: Proc | None = None
    ports: dict[str, int] = field(default_factory=dict)  # port name -> the client proxy's local port
    procs: list[Proc] = field(default_factory=list)
    counter: int = 0

    def _log(self, what: str) -> Path:
        self.counter += 1
        return self.tmp / f"{self.counter:02d}-{what}.log"

    def _start(self, args: list[str], what: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc([sys.executable, *args], self._log(what), env=env)
        self.procs.append(proc)
        return proc

    # ---- the relay -----------------------------------------------------------

    @property
    def relay_config(self) -> Path:
        return self.tmp / "relay.toml"

    def start_relay(self) -> Proc:
        """Start the relay; a restart binds the same UDP port and keeps the same certificate."""
        if not self.relay_config.exists():
            allow = ", ".join(f'"{a}"' for a in self.allow)
            self.relay_config.write_text(
                'quic_bind = "127.0.0.1:0"\n'
                f'quic_cert_file = "{self.tmp / "relay.crt"}"\n'
                f'quic_key_file = "{self.tmp / "relay.key"}"\n'
                f'[[servers]]\nname = "alpha"\ntripcode = "{tripcode_of(self.server_key)}"\n'
                f'[[clients]]\nname = "laptop"\ntripcode = "{tripcode_of(self.client_key)}"\n'
                f'allow = [{allow}]\n'
                f'[[clients]]\nname = "mallory"\ntripcode = "{tripcode_of(self.other_client_key)}"\n'
                'allow = ["alpha:*"]\n')
        args = ["ptth_quic_relay.py", "--config", str(self.relay_config)]
        if self.relay_port:
            args += ["--bind", f"127.0.0.1:{self.relay_port}"]
        proc = self._start(args, "relay")
        m = proc.wait_for_output(r"listening on udp://127\.0\.0\.1:(\d+), certificate fingerprint ([0-9a-f]{64})")
        port, fingerprint = int(m.group(1)), m.group(2)
        if self.relay_port:
            assert (port, fingerprint) == (self.relay_port, self.fingerprint), m.group(0)
        self.relay_port, self.fingerprint = port, fingerprint
        self.relay = proc
        return proc

    # ---- the server proxy ------------------------------------------------------

    def start_server(self, kind: str | None = None, fingerprint: str | None = None,
                     wait: bool = True) -> Proc:
        """Start alpha's server proxy; unless wait=False, wait until it is connected to the relay."""
        kind = kind or self.server_kind
        root = self.tmp / "root"
        root.mkdir(exist_ok=True)
        config = self.tmp / f"server-{self.counter}.toml"
        table = "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in self.targets.items())
        # relay_url: ptth_server's HTTP side, which no relay answers here (it retries, and we
        # only use its QUIC side); ptth_quic_end_server reads the same file and ignores it.
        config.write_text(f'name = "alpha"\napi_key = "{self.server_key}"\n'
                          f'relay_url = "http://127.0.0.1:1/"\nfile_server_root = "{root}"\n'
                          f'[forwarded_ports]\n{table}'
                          f'[quic]\nrelay = "127.0.0.1:{self.relay_port}"\n'
                          f'relay_fingerprint = "{fingerprint or self.fingerprint}"\n')
        config.chmod(0o600)
        script = "ptth_server.py" if kind == PTTH_SERVER else "ptth_quic_end_server.py"
        proc = self._start([script, "--config", str(config)], kind)
        if wait:  # alpha's server proxy from now on; wait=False starts one on the side
            self.server = proc
            self.wait_server_connected(1)
        return proc

    def wait_server_connected(self, times: int, deadline: float = STARTUP_SECS) -> None:
        """Wait until the server proxy's log says it connected to the relay `times` times."""
        wait_count(self.server_proc, r"quic end server: connected to the QUIC relay", times, deadline)

    # ---- the client proxy --------------------------------------------------------

    def start_client(self, name: str = "laptop", key: str | None = None, fingerprint: str | None = None,
                     forwards: list[str] | None = None, wait: bool = True) -> Proc:
        """Start a client proxy; unless wait=False, wait for its forwards and note their ports."""
        forwards = self.forwards if forwards is None else forwards
        args = ["ptth_quic_client.py", "--relay", f"127.0.0.1:{self.relay_port}",
                "--relay-fingerprint", fingerprint or self.fingerprint, "--name", name]
        for port_name in forwards:
            args += ["--forward", f"0:alpha:{port_name}"]
        proc = self._start(args, f"client-{name}", env={"PTTH_CLIENT_API_KEY": key or self.client_key})
        if not wait:
            return proc
        self.client = proc
        for port_name in forwards:
            m = proc.wait_for_output(rf"forwarding 127\.0\.0\.1:(\d+) to alpha:{re.escape(port_name)} over QUIC")
            self.ports[port_name] = int(m.group(1))
        return proc

    # ---- the processes --------------------------------------------------------------

    @property
    def relay_proc(self) -> Proc:
        assert self.relay is not None
        return self.relay

    @property
    def server_proc(self) -> Proc:
        assert self.server is not None
        return self.server

    @property
    def client_proc(self) -> Proc:
        assert self.client is not None
        return self.client

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> int:
        return proc.stop(sig, timeout=STARTUP_SECS)

    def assert_up(self, *procs: Proc) -> None:
        for proc in procs:
            assert proc.popen.poll() is None, f"{proc.args} exited:\n{proc.output()[-3000:]}"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()

    def logs(self) -> str:
        return "\n".join(f"==== {p.log.name}\n{p.output()[-2500:]}" for p in self.procs)

    # ---- the end client ------------------------------------------------------------------

    def connect(self, name: str = "echo") -> socket.socket:
        sock = unused_port_socket()
        try:
            sock.settimeout(SOCKET_TIMEOUT_SECS)
            sock.connect(("127.0.0.1", self.ports[name]))
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def works(self, name: str = "echo", size: int = 100_000) -> bool:
        """True if a new connection to an echo port echoes `size` random bytes; False if refused or cut."""
        data = os.urandom(size)
        try:
            with self.connect(name) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                return recv_all(sock) == data
        except (ConnectionError, TimeoutError):
            return False
        except OSError as e:  # reset so early that even shutdown() finds the socket gone
            if e.errno == errno.ENOTCONN:
                return False
            raise

    def wait_works(self, name: str = "echo", deadline: float = RECOVER_SECS) -> float:
        """Poll until a new connection works; returns how long that took."""
        start = time.monotonic()
        while not self.works(name):
            if time.monotonic() - start > deadline:
                raise AssertionError(f"no connection worked within {deadline:.0f} s:\n{self.logs()}")
            time.sleep(0.3)
        return time.monotonic() - start


class GreetingServer(TcpServer):
    """Speaks first (as an SSH server does), then echoes; half-closes when the client does."""

    GREETING = b"SSH-2.0-not-really greets you first\r\n"

    def handle(self, sock: socket.socket) -> None:
        sock.sendall(self.GREETING)
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class EchoServerAt(EchoServer):
    """An EchoServer on a given port: a TCP end server restarted where it was."""

    def __init__(self, port: int) -> None:  # TcpServer.__init__, with the port
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = port
        self.connections = []
        self._closed = False
        threading.Thread(target=self._accept_forever, daemon=True).start()




# ---- hostile QUIC peers ------------------------------------------------------------------
# The test process plays them with ptth_lib's own QUIC driver (valid QUIC and TLS, the
# relay's certificate pinned), except the Initial flood, which runs in a process of its own
# (`python tests/e2e/quic_cluster.py flood ...`) so that it does not slow the test's own peers.

def pinned_configuration(fingerprint: str) -> QuicConfiguration:
    return driver.configure(cert.client_configuration(driver.ALPN, fingerprint, None))


def open_quic(port: int, fingerprint: str, timeout: float = SOCKET_TIMEOUT_SECS) -> QuicPeer:
    """A QUIC connection to the relay on 127.0.0.1 (handshake done), nothing sent on it yet."""
    return driver.connect("127.0.0.1", port, pinned_configuration(fingerprint), timeout)


def say_hello(peer: QuicPeer, hello: tip.PeerHello, timeout: float = SOCKET_TIMEOUT_SECS) -> tip.TipMessage:
    """Send a hello on a new stream; the relay's answer. Accepted, the peer opens its control stream, as a proxy does."""
    stream = peer.open_stream()
    stream.write(tip.encode(hello))
    answer, _ = read_tip(stream, timeout)
    if isinstance(answer, tip.HelloAnswer) and answer.ok:
        peer.open_control()
    return answer


def honest_hello_secs(port: int, fingerprint: str, hello: tip.PeerHello,
                      timeout: float = SOCKET_TIMEOUT_SECS) -> float:
    """Seconds from the first packet to an accepted hello, as a proxy connects; the connection is closed."""
    start = time.monotonic()
    peer = open_quic(port, fingerprint, timeout)
    try:
        answer = say_hello(peer, hello, timeout)
        assert isinstance(answer, tip.HelloAnswer) and answer.ok, answer
        return time.monotonic() - start
    finally:
        peer.close()


def first_initials(port: int) -> Iterator[bytes]:
    """Endless first datagrams of new connections: real Initials, each a new ClientHello."""
    config = pinned_configuration(WRONG_FINGERPRINT)
    while True:
        quic = QuicConnection(configuration=config)
        quic.connect(("127.0.0.1", port), now=time.monotonic())
        yield quic.datagrams_to_send(now=time.monotonic())[0][0]


def flood(port: int, rate: float, seconds: float) -> int:
    """Send `rate` new-connection Initials a second to 127.0.0.1:port for `seconds`; how many were sent.

    Like a flood from a spoofed address, it never reads an answer.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    sent = 0
    for datagram in first_initials(port):
        now = time.monotonic()
        if now - start >= seconds:
            break
        ahead = start + sent / rate - now
        if ahead > 0:
            time.sleep(ahead)
        try:
            sock.sendto(datagram, ("127.0.0.1", port))
        except OSError:  # e.g. ICMP "unreachable" from an earlier datagram
            pass
        sent += 1
    sock.close()
    return sent


class InitialFlood:
    """`flood` in a process of its own; `sent()` waits for it to end."""

    def __init__(self, tmp: Path, port: int, rate: float, seconds: float) -> None:
        # Run as a script (its folder, tests/e2e, first on sys.path), ptth_lib from the checkout.
        self.proc = Proc([sys.executable, str(Path(__file__).resolve()), "flood", str(port), str(rate),
                          str(seconds)], tmp / f"flood-{port}-{time.monotonic_ns()}.log",
                         env={"PYTHONPATH": str(REPO)})

    def sent(self, timeout: float = 60.0) -> int:
        wait_exit(self.proc, timeout)
        return int(self.proc.wait_for_output(r"sent (\d+) Initials").group(1))

    def kill(self) -> None:
        self.proc.kill()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        print(f"sent {flood(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))} Initials", flush=True)
