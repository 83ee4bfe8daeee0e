"""Real-process fixtures: the relay under gunicorn, ptth_server, ptth_file_server.

Every process runs on 127.0.0.1 with a port chosen by the OS (port 0) and
reported in its log, in its own process group, with its output in a log file
that a failing test shows. Teardown kills the whole group.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE_SECS = 20.0


def tripcode_of(key: str) -> str:
    """Independent of ptth_lib on purpose: base64 of BLAKE3 of the UTF-8 key."""
    return base64.b64encode(blake3.blake3(key.encode()).digest()).decode()


def free_port() -> int:
    """A loopback port nobody listens on (nothing else binds it in the next moment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key(name: str) -> str:
    return f"test-key-for-{name}-" + base64.urlsafe_b64encode(os.urandom(18)).decode()


class Proc:
    """A child process in its own group, output to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO, inherit_env: bool = True) -> None:
        """`env` is added to ours, or (inherit_env=False) to PATH and HOME alone."""
        self.args = args
        self.log = log
        base = os.environ if inherit_env else {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
        full_env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                          cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, pattern: str, deadline: float = STARTUP_DEADLINE_SECS) -> re.Match[str]:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen in output of {self.args}:\n{self.output()[-3000:]}")

    def send_signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.popen.wait(5)
            raise AssertionError(f"{self.args} did not stop on signal {sig}:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


@dataclass
class Relay:
    proc: Proc
    port: int
    config: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pid(self) -> int:
        """The gunicorn worker (the child of the master), where the relay's state lives."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])


@dataclass
class Server:
    proc: Proc
    name: str
    key: str
    root: Path
    config: Path


@dataclass
class Cluster:
    """Starts relays and servers for one test and stops them all afterwards."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    counter: int = 0

    def _log(self, what: str) -> Path:
        self.counter += 1
        return self.tmp / f"{self.counter:02d}-{what}.log"

    def relay(self, servers: dict[str, str], port: int = 0, extra: str = "",
              env: dict[str, str] | None = None) -> Relay:
        """Start the relay under gunicorn; `servers` maps names to API keys."""
        config = self.tmp / f"relay-{self.counter}.toml"
        text = extra + "\n"
        for name, key in servers.items():
            text += f'[[servers]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\n'
        config.write_text(text)
        return self.start_relay(config, port, env)

    def start_relay(self, config: Path, port: int = 0, env: dict[str, str] | None = None) -> Relay:
        proc = Proc([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py",
                     "--bind", f"127.0.0.1:{port}", "ptth_relay:app"],
                    self._log("relay"), env={"PTTH_RELAY_CONFIG": str(config), **(env or {})})
        self.procs.append(proc)
        try:
            port = int(proc.wait_for_output(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
            relay = Relay(proc, port, config)
            wait_until(lambda: _get_ok(relay.url + "/frontend/relay_up_check"), "relay up", proc)
        except BaseException:
            proc.kill()  # a fixture that fails here never reaches its teardown
            raise
        return relay

    def server(self, relay: Relay, name: str, key: str, root: Path, wait: bool = True,
               extra_args: list[str] | None = None, extra_config: str = "") -> Server:
        """Start ptth_server and (unless wait=False) wait until the relay has it online."""
        config = self.tmp / f"server-{name}-{self.counter}.toml"
        config.write_text(f'name = "{name}"\napi_key = "{key}"\nrelay_url = "{relay.url}/"\n'
                          f'file_server_root = "{root}"\n{extra_config}\n')
        config.chmod(0o600)
        proc = Proc([sys.executable, "ptth_server.py", "--config", str(config), *(extra_args or [])],
                    self._log(f"server-{name}"))
        self.procs.append(proc)
        if wait:
            try:
                wait_for_online(relay, name, proc)
            except BaseException:
                self.close()  # a fixture that fails here never reaches its teardown
                raise
        return Server(proc, name, key, root, config)

    def client(self, relay: Relay, key: str, forwards: list[str], extra_args: list[str] | None = None,
               wait: bool = True) -> tuple[Proc, list[int]]:
        """Start ptth_client; returns it and the local port of each forward, in order.

        A forward "0:SERVER:PORT" binds any free port; the port is read from the log.
        """
        key_file = self.tmp / f"client-key-{self.counter}"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        args = [sys.executable, "ptth_client.py", "--relay-url", relay.url, "--api-key-file", str(key_file)]
        for f in forwards:
            args += ["--forward", f]
        proc = Proc(args + (extra_args or []), self._log("client"))
        self.procs.append(proc)
        if not wait:
            return proc, []
        ports = []
        for f in forwards:
            _, server, port = f.split(":")
            m = proc.wait_for_output(rf"forwarding 127\.0\.0\.1:(\d+) to {re.escape(server)}:{re.escape(port)}\b")
            ports.append(int(m.group(1)))
        return proc, ports

    def file_server(self, root: Path) -> tuple[Proc, str]:
        proc = Proc([sys.executable, "ptth_file_server.py", "--root", str(root), "--bind", "127.0.0.1:0"],
                    self._log("file-server"))
        self.procs.append(proc)
        url = proc.wait_for_output(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        return proc, url

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


def _get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_until(check, what: str, proc: Proc | None = None, deadline: float = STARTUP_DEADLINE_SECS) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.popen.returncode}:\n{proc.output()[-3000:]}")
        time.sleep(0.05)
    detail = f":\n{proc.output()[-3000:]}" if proc else ""
    raise AssertionError(f"timed out waiting for {what}{detail}")


def wait_for_online(relay: Relay, name: str, proc: Proc | None = None) -> None:
    wait_until(lambda: _get_ok(f"{relay.url}/frontend/servers/{name}/"), f"server {name} online", proc)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def make_tree(root: Path) -> dict[str, bytes]:
    """A small tree of test files; returns relative path -> content."""
    files = {
        "hello.txt": b"hello, tunnel\n",
        "empty.bin": b"",
        "random-3m.bin": os.urandom(3 * 1024 * 1024 + 17),
        "sub dir/nested #1?.txt": "caf\u00e9 \u2603\n".encode(),
        "sub dir/100% sure.txt": b"percent\n",
        "\u00fcn\u00efc\u00f6d\u00e9/\u65e5\u672c.txt": b"nihon\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@dataclass
class Tunnel:
    relay: Relay
    server: Server
    files: dict[str, bytes]
    cluster: Cluster

    @property
    def base(self) -> str:
        return f"{self.relay.url}/frontend/servers/{self.server.name}"


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnel]:
    """One relay and one server sharing a tree of test files, for a whole module."""
    tmp = tmp_path_factory.mktemp("tunnel")
    root = tmp / "root"
    root.mkdir()
    files = make_tree(root)
    c = Cluster(tmp)
    key = new_key("alpha")
    relay = c.relay({"alpha": key}, extra="request_timeout_secs = 10")
    server = c.server(relay, "alpha", key, root)
    yield Tunnel(relay, server, files, c)
    c.close()
