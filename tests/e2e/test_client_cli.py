"""ptth_client.py as people run it, and the config mistakes of port forwarding.

Every case runs the real program as a subprocess (ptth_client.py, and for
their [forwarded_ports] and [[clients]] tables ptth_server.py and the relay
under gunicorn) and checks the exit code, that a mistake is exactly one line
on stderr without a traceback, and that the API key is never printed.

Exit codes: 2 for a config or command-line mistake, 1 for a problem found at
start-up (relay unreachable, key unknown to the relay, local port busy), 0
for success and for a stop by signal.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, Cluster, Proc, Relay, free_port, new_key, tripcode_of
from redirect_peers import HostileRelay, Reply, Seen, Trap, redirect
from tcp_peers import EchoServer

from ptth_lib.config import parse_relay_config

pytestmark = pytest.mark.process

# Generous bounds for one short-lived command; each is far above what the
# command needs, so hitting one means it hung.
RUN_TIMEOUT_SECS = 30.0
GUNICORN_FAIL_SECS = 20.0
SOCKET_TIMEOUT_SECS = 20.0
# A stopped ptth_client must be gone well within this.
STOP_DEADLINE_SECS = 10.0
# Environment variables that would change which key a command sees.
KEY_ENVS = ("PTTH_CLIENT_API_KEY", "PTTH_API_KEY")

CLIENT = "ptth_client"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_SECS,
        stdin: str | None = None, umask: int = -1) -> Result:
    """Run a command in its own process group; kill the whole group if it overstays."""
    inherited = {k: v for k, v in os.environ.items() if k not in KEY_ENVS}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            text=True, start_new_session=True, umask=umask)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"{args} still running after {timeout} s:\n{out}\n{err}") from None
    return Result(proc.returncode, out, err)


def client(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
           umask: int = -1) -> Result:
    return run([sys.executable, "ptth_client.py", *args], env=env, stdin=stdin, umask=umask)


def assert_clean(text: str, key: str | None = None) -> None:
    assert "Traceback" not in text, text
    if key:
        assert key not in text, "the API key must never be printed"


def assert_one_line_error(result: Result, prog: str = CLIENT, code: int = 2, key: str | None = None) -> str:
    """Exit `code`, nothing on stdout, one `prog: ...` line on stderr; return it."""
    assert_clean(result.output, key)
    assert result.returncode == code, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line of error, got:\n{result.stderr}"
    assert lines[0].startswith(f"{prog}: "), lines[0]
    assert len(lines[0]) < 400, lines[0]
    return lines[0]




def write_key(path: Path, key: str) -> Path:
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def clients_table(name: str, key: str, allow: list[str]) -> str:
    quoted = ", ".join(f'"{a}"' for a in allow)
    return f'[[clients]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\nallow = [{quoted}]\n'


def echo_once(port: int, data: bytes) -> bytes:
    """Send `data` through a forwarded echo port, half-close, read all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECS) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        parts = []
        while chunk := sock.recv(65536):
            parts.append(chunk)
    return b"".join(parts)


@pytest.fixture
def key(tmp_path: Path) -> str:
    return new_key("laptop")


@pytest.fixture
def key_file(tmp_path: Path, key: str) -> Path:
    return write_key(tmp_path / "client.key", key)


# ---- a live relay, server and echo port, shared by the tests that need one ----


@dataclass
class Live:
    relay: Relay
    client_key: str
    key_file: Path
    echo: EchoServer
    cluster: Cluster
    tmp: Path

    def start(self, args: list[str], env: dict[str, str] | None = None) -> Proc:
        """A ptth_client in the background; the cluster kills it at the end."""
        self.cluster.counter += 1
        proc = Proc([sys.executable, "ptth_client.py", *args],
                    self.tmp / f"{self.cluster.counter:02d}-client.log", env=env)
        self.cluster.procs.append(proc)
        return proc


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("client-cli")
    c = Cluster(tmp)
    echo = EchoServer()
    server_key, client_key = new_key("alpha"), new_key("laptop")
    try:
        relay = c.relay({"alpha": server_key}, extra=clients_table("laptop", client_key, ["alpha:echo"]))
        root = tmp / "root"
        root.mkdir()
        c.server(relay, "alpha", server_key, root,
                 extra_config=f'[forwarded_ports]\necho = "127.0.0.1:{echo.port}"\n')
        yield Live(relay, client_key, write_key(tmp / "laptop.key", client_key), echo, c, tmp)
    finally:
        c.close()
        echo.close()


def forwarded_port(proc: Proc, server: str = "alpha", port: str = "echo") -> int:
    m = proc.wait_for_output(rf"forwarding 127\.0\.0\.1:(\d+) to {server}:{port}\b")
    return int(m.group(1))


# ---- command-line mistakes -----------------------------------------------------


def test_no_relay_url(key_file: Path) -> None:
    line = assert_one_line_error(client("--api-key-file", str(key_file), "--forward", "0:alpha:echo"))
    assert "relay URL" in line and "--relay-url" in line


def test_no_forward(key_file: Path) -> None:
    line = assert_one_line_error(client("--relay-url", f"http://127.0.0.1:{free_port()}",
                                        "--api-key-file", str(key_file)))
    assert "--forward" in line and "LOCALPORT:SERVER:PORTNAME" in line


# The whole table is tests/unit/test_client_config.py's, in-process; here, one of each through the program.
@pytest.mark.parametrize("spec", ["2200:alpha", "70000:alpha:echo"])
def test_malformed_forward(key_file: Path, spec: str) -> None:
    result = client("--relay-url", f"http://127.0.0.1:{free_port()}", "--api-key-file", str(key_file),
                    f"--forward={spec}")
    line = assert_one_line_error(result)
    assert repr(spec) in line, "the message names the bad entry"
    assert "LOCALPORT:SERVER:PORTNAME" in line


@pytest.mark.parametrize("specs", [["2200:alpha:echo", "02200:alpha:ssh"]])
def test_same_local_port_twice(key_file: Path, specs: list[str]) -> None:
    args = ["--relay-url", f"http://127.0.0.1:{free_port()}", "--api-key-file", str(key_file)]
    for spec in specs:
        args += ["--forward", spec]
    line = assert_one_line_error(client(*args))
    assert "twice" in line


def test_port_zero_twice_is_fine(key_file: Path) -> None:
    """0 means any free port, so it may appear more than once: the next problem is the relay."""
    port = free_port()
    result = client("--relay-url", f"http://127.0.0.1:{port}", "--api-key-file", str(key_file),
                    "--forward", "0:alpha:echo", "--forward", "0:alpha:ssh")
    line = assert_one_line_error(result, code=1)
    assert "cannot reach the relay" in line


def test_bad_relay_url(key_file: Path) -> None:
    line = assert_one_line_error(client("--relay-url", "127.0.0.1:4000", "--api-key-file", str(key_file),
                                        "--forward", "0:alpha:echo"))
    assert "relay_url" in line and "http://" in line


def test_relay_url_with_unclosed_bracket(key_file: Path) -> None:
    line = assert_one_line_error(client("--relay-url", "http://[::1:4000", "--api-key-file", str(key_file),
                                        "--forward", "0:alpha:echo"))
    assert "relay_url" in line


# ---- the key -----------------------------------------------------------------


def test_no_key() -> None:
    line = assert_one_line_error(client("--relay-url", f"http://127.0.0.1:{free_port()}",
                                        "--forward", "0:alpha:echo"))
    assert "no API key" in line and "--api-key-file" in line and "PTTH_CLIENT_API_KEY" in line
    assert "--new-key" in line


def test_empty_env_key_counts_as_none() -> None:
    result = client("--relay-url", f"http://127.0.0.1:{free_port()}", "--forward", "0:alpha:echo",
                    env={"PTTH_CLIENT_API_KEY": ""})
    assert "no API key" in assert_one_line_error(result)


def test_key_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    line = assert_one_line_error(client("--relay-url", f"http://127.0.0.1:{free_port()}",
                                        "--api-key-file", str(path), "--forward", "0:alpha:echo"))
    assert str(path) in line and "not found" in line and f"--new-key {path}" in line


@pytest.mark.parametrize("content", ["", "\n", "   \n\n",
                                     "first-line-of-a-key-0123456789\nsecond-line-0123456789\n",
                                     "abc\rdef-0123456789-0123456789\n"],
                         ids=["empty", "newline", "blank", "two-lines", "carriage-return"])
def test_key_file_not_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content, newline="")
    result = client("--relay-url", f"http://127.0.0.1:{free_port()}", "--api-key-file", str(path),
                    "--forward", "0:alpha:echo")
    line = assert_one_line_error(result)
    assert str(path) in line and "one line" in line
    for part in re.split(r"[\r\n]", content):
        if part.strip():
            assert part not in result.output, "no part of the key is printed"


def test_key_file_unreadable(tmp_path: Path) -> None:
    """A folder (root can read any file, so chmod 000 would prove nothing here)."""
    line = assert_one_line_error(client("--relay-url", f"http://127.0.0.1:{free_port()}",
                                        "--api-key-file", str(tmp_path), "--forward", "0:alpha:echo"))
    assert str(tmp_path) in line and "cannot read" in line


def test_key_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.key"
    path.write_bytes(b"\xff\xfe" + os.urandom(30))
    line = assert_one_line_error(client("--relay-url", f"http://127.0.0.1:{free_port()}",
                                        "--api-key-file", str(path), "--forward", "0:alpha:echo"))
    assert str(path) in line


def test_weak_key_in_file(tmp_path: Path) -> None:
    weak = "secretpassword"
    path = write_key(tmp_path / "weak.key", weak)
    result = client("--relay-url", f"http://127.0.0.1:{free_port()}", "--api-key-file", str(path),
                    "--forward", "0:alpha:echo")
    line = assert_one_line_error(result, key=weak)
    assert "weak" in line and "20" in line and "--new-key" in line


def test_weak_key_in_env() -> None:
    weak = "secretpassword"
    result = client("--relay-url", f"http://127.0.0.1:{free_port()}", "--forward", "0:alpha:echo",
                    env={"PTTH_CLIENT_API_KEY": weak})
    line = assert_one_line_error(result, key=weak)
    assert "weak" in line and "20" in line


def test_weak_key_refused_by_print_tripcode(tmp_path: Path) -> None:
    weak = "secretpassword"
    path = write_key(tmp_path / "weak.key", weak)
    line = assert_one_line_error(client("--print-tripcode", "--api-key-file", str(path)), key=weak)
    assert "weak" in line
    assert tripcode_of(weak) not in line, "no tripcode for a key that will be refused"


@pytest.mark.parametrize("env_key", [" pasted-with-a-space-0123456789abcdef",
                                     "pasted-with-a-newline-0123456789\n"],
                         ids=["leading-space", "trailing-newline"])
def test_env_key_with_whitespace_is_never_printed(env_key: str) -> None:
    result = client("--relay-url", f"http://127.0.0.1:{free_port()}", "--forward", "0:alpha:echo",
                    env={"PTTH_CLIENT_API_KEY": env_key})
    assert result.returncode != 0
    assert_clean(result.output, env_key.strip())
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_non_latin1_key_is_not_blamed_on_the_relay() -> None:
    odd_key = "key-with-a-euro-sign-\u20ac-0123456789"
    result = client("--relay-url", f"http://127.0.0.1:{free_port()}", "--forward", "0:alpha:echo",
                    env={"PTTH_CLIENT_API_KEY": odd_key})
    line = assert_one_line_error(result, code=result.returncode, key=odd_key)
    assert result.returncode != 0
    assert "does not look like a PTTH relay" not in line, line
    assert "key" in line or "cannot reach the relay" in line, line


# ---- config file mistakes --------------------------------------------------------


def test_config_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    line = assert_one_line_error(client("--config", str(path)))
    assert str(path) in line and "not found" in line


def test_config_file_unreadable(tmp_path: Path) -> None:
    """A folder (root can read any file, so chmod 000 would prove nothing here)."""
    line = assert_one_line_error(client("--config", str(tmp_path)))
    assert str(tmp_path) in line and "cannot read" in line


def test_config_file_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('relay_url = "http://127.0.0.1:4000\nforward = ["0:alpha:echo"]\n')
    line = assert_one_line_error(client("--config", str(path)))
    assert str(path) in line and "TOML" in line


def test_config_file_not_utf8(tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(f'relay_url = "http://127.0.0.1:4000"\napi_key_file = "{key_file}"\n'
                     '# caf\xe9\n'.encode("latin-1"))
    line = assert_one_line_error(client("--config", str(path), "--forward", "0:alpha:echo"))
    assert str(path) in line


# The whole table is tests/unit/test_client_config.py's, in-process; here, two through the program.
@pytest.mark.parametrize(("text", "words"), [
    ('relay_url = "http://127.0.0.1:4000"\nbnd = "127.0.0.1"\n', ["bnd", "unknown", "bind"]),
    ('relay_url = "http://127.0.0.1:4000"\napi_key = "do-not-put-keys-here-0123456789"\n',
     ["api_key", "unknown"]),
], ids=["typo", "api_key"])
def test_bad_config_file(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "client.toml"
    path.write_text(text)
    line = assert_one_line_error(client("--config", str(path)), key="do-not-put-keys-here-0123456789")
    assert str(path) in line
    for word in words:
        assert word in line, (word, line)


def test_misspelt_relay_url_is_named(tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text(f'relay_ulr = "http://127.0.0.1:4000"\napi_key_file = "{key_file}"\n'
                    'forward = ["0:alpha:echo"]\n')
    line = assert_one_line_error(client("--config", str(path)))
    assert "relay_ulr" in line and "unknown" in line


# ---- start-up problems: exit 1 --------------------------------------------------


def test_relay_unreachable(key_file: Path, key: str) -> None:
    port = free_port()
    line = assert_one_line_error(client("--relay-url", f"http://127.0.0.1:{port}", "--api-key-file",
                                        str(key_file), "--forward", "0:alpha:echo"), code=1, key=key)
    assert "cannot reach the relay" in line and f"127.0.0.1:{port}" in line
    assert "refused" in line.lower()
    assert "Max retries" not in line and "HTTPConnectionPool" not in line


def test_not_a_relay(key_file: Path, key: str) -> None:
    """A web server that is not a PTTH relay: its answer to the key check is named."""

    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"not here\r\n")

        def log_message(self, *args: object) -> None:
            pass

    web = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        result = client("--relay-url", f"http://127.0.0.1:{web.server_address[1]}", "--api-key-file",
                        str(key_file), "--forward", "0:alpha:echo")
    finally:
        web.shutdown()
        web.server_close()
    line = assert_one_line_error(result, code=1, key=key)
    assert "answered 404 Not Found (an answer without a Content-Type: is relay_url the PTTH relay's " \
           "base URL?) to the key check" in line
    assert "not here" not in line, "an answer that is not PTTH's is named, not pasted"


def test_wrong_relay_path_is_named_not_pasted(key_file: Path, key: str, cluster: Cluster) -> None:
    """relay_url with a path the relay does not have: its HTML 404 page stays out of the line."""
    relay = cluster.relay({})
    result = client("--relay-url", f"{relay.url}/wrong/", "--api-key-file", str(key_file),
                    "--forward", "0:alpha:echo")
    line = assert_one_line_error(result, code=1, key=key)
    assert line == (f"ptth_client: the relay at {relay.url}/wrong/ answered 404 Not Found (an HTML page: "
                    "is relay_url the PTTH relay's base URL?) to the key check")


@pytest.mark.parametrize("status", [302, 307])
def test_key_check_never_follows_a_redirect(key_file: Path, key: str, status: int) -> None:
    trap = Trap()
    relay = HostileRelay(lambda seen: redirect(status, f"{trap.url}/stolen"))
    try:
        result = client("--relay-url", relay.url, "--api-key-file", str(key_file), "--forward", "0:alpha:echo")
    finally:
        relay.close()
        trap.close()
    assert trap.seen == [], "a redirect was followed"
    line = assert_one_line_error(result, code=1, key=key)
    assert f"answered {status} " in line and f"a redirect to {trap.url}/stolen (not followed" in line


@pytest.mark.parametrize("status", [302, 307])
def test_connect_never_follows_a_redirect(tmp_path: Path, key_file: Path, key: str, status: int) -> None:
    """The key check passes; the connect is redirected: the TCP client is reset, the key stays."""
    trap = Trap()

    def answer(seen: Seen) -> Reply:
        if seen.path == "/frontend/tcp/check":
            return Reply(200, {"Content-Type": "application/json"}, b'{"client": "laptop", "allow": ["alpha:echo"]}')
        return redirect(status, f"{trap.url}{seen.path}")

    relay = HostileRelay(answer)
    proc = Proc([sys.executable, "ptth_client.py", "--relay-url", relay.url, "--api-key-file", str(key_file),
                 "--forward", "0:alpha:echo"], tmp_path / "client.log")
    try:
        port = forwarded_port(proc)
        try:
            # The reset ptth_client gives a refused connection may come before connect() returns:
            # with a timeout set, connect() polls, then reads SO_ERROR, which by then holds it.
            with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECS) as sock:
                assert sock.recv(100) == b"", "nothing comes through"
        except ConnectionResetError:
            pass
        refused = proc.wait_for_output(r"-> alpha:echo refused: (.*)")
    finally:
        proc.kill()
        relay.close()
        trap.close()
    assert trap.seen == [], "a redirect was followed"
    assert refused.group(1).startswith(f"{status} ")
    assert f"a redirect to {trap.url}/frontend/tcp/connect/alpha/echo (not followed" in refused.group(1)
    assert key not in proc.output()


def test_relay_does_not_know_the_key(live: Live, tmp_path: Path) -> None:
    stranger = new_key("stranger")
    path = write_key(tmp_path / "stranger.key", stranger)
    result = client("--relay-url", live.relay.url, "--api-key-file", str(path), "--forward", "0:alpha:echo")
    line = assert_one_line_error(result, code=1, key=stranger)
    assert f'tripcode = "{tripcode_of(stranger)}"' in line and "[[clients]]" in line
    assert stranger not in live.relay.proc.output()


def test_relay_does_not_know_the_env_key(live: Live) -> None:
    stranger = new_key("stranger-env")
    result = client("--relay-url", live.relay.url, "--forward", "0:alpha:echo",
                    env={"PTTH_CLIENT_API_KEY": stranger})
    line = assert_one_line_error(result, code=1, key=stranger)
    assert tripcode_of(stranger) in line


def test_local_port_in_use(live: Live) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = client("--relay-url", live.relay.url, "--api-key-file", str(live.key_file),
                        "--forward", "0:alpha:echo", "--forward", f"{port}:alpha:echo")
    line = assert_one_line_error(result, code=1, key=live.client_key)
    assert f"127.0.0.1:{port}" in line and "cannot listen" in line


# ---- --new-key and --print-tripcode ------------------------------------------


def test_new_key(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    result = client("--new-key", str(path), umask=0)  # a lax umask must not make the key readable
    assert result.returncode == 0, result
    assert_clean(result.output)
    assert result.stdout == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    made = text.strip()
    assert len(made) >= 40, "a generated key has 256 bits"
    assert made not in result.output, "the key is never printed"
    assert f'tripcode = "{tripcode_of(made)}"' in result.stderr
    assert str(path) in result.stderr
    # The snippet, pasted into the relay config as it is, is a valid [[clients]] table.
    snippet = result.stderr[result.stderr.index("[[clients]]"):]
    relay = parse_relay_config(tomllib.loads(snippet), "pasted")
    (entry,) = relay.clients.values()
    assert entry.tripcode == tripcode_of(made)
    # And the new file is a key ptth_client accepts.
    again = client("--print-tripcode", "--api-key-file", str(path))
    assert again.returncode == 0 and again.stdout == tripcode_of(made) + "\n", again


def test_new_keys_differ(tmp_path: Path) -> None:
    assert client("--new-key", str(tmp_path / "a.key")).returncode == 0
    assert client("--new-key", str(tmp_path / "b.key")).returncode == 0
    assert (tmp_path / "a.key").read_text() != (tmp_path / "b.key").read_text()


def test_new_key_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "existing.key"
    original = "the-key-already-in-use-0123456789\n"
    path.write_text(original)
    path.chmod(0o640)
    line = assert_one_line_error(client("--new-key", str(path)), key=original.strip())
    assert str(path) in line and "exists" in line
    assert path.read_text() == original
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_new_key_in_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "new.key"
    line = assert_one_line_error(client("--new-key", str(path)))
    assert str(path) in line
    assert not path.exists()


def test_print_tripcode_from_key_file(key_file: Path, key: str) -> None:
    result = client("--print-tripcode", "--api-key-file", str(key_file))
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    assert result.stderr == ""


def test_print_tripcode_from_config_file(tmp_path: Path, key_file: Path, key: str) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'relay_url = "http://127.0.0.1:4000"\napi_key_file = "{key_file}"\n'
                      'forward = ["2200:alpha:ssh"]\n')
    result = client("--print-tripcode", "--config", str(config))
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    assert result.stderr == ""


def test_print_tripcode_from_env(key: str) -> None:
    result = client("--print-tripcode", env={"PTTH_CLIENT_API_KEY": key})
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    assert result.stderr == ""


def test_print_tripcode_without_a_key() -> None:
    line = assert_one_line_error(client("--print-tripcode"))
    assert "no API key" in line


@pytest.mark.parametrize("value", ['["client.key"]', "0"], ids=["list", "zero"])
def test_print_tripcode_checks_api_key_file_type(tmp_path: Path, value: str) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'relay_url = "http://127.0.0.1:4000"\napi_key_file = {value}\n')
    result = client("--print-tripcode", "--config", str(config), stdin="a-key-from-stdin-0123456789\n")
    line = assert_one_line_error(result)
    assert "api_key_file" in line and "string" in line


# ---- running: a config file end to end, signals, secrets ------------------------


def test_config_file_end_to_end(live: Live) -> None:
    config = live.tmp / "e2e.toml"
    config.write_text(f'relay_url = "{live.relay.url}"\napi_key_file = "{live.key_file}"\nbind = "127.0.0.1"\n'
                      'forward = ["0:alpha:echo"]\n')
    proc = live.start(["--config", str(config)])
    try:
        port = forwarded_port(proc)
        data = os.urandom(100_000)
        assert echo_once(port, data) == data
        proc.wait_for_output(r"connected to relay .* as client 'laptop'")
        assert proc.stop(signal.SIGTERM, timeout=STOP_DEADLINE_SECS) == 0
    finally:
        proc.kill()
    assert_clean(proc.output(), live.client_key)


def test_flags_override_the_config_file(live: Live) -> None:
    config = live.tmp / "override.toml"
    config.write_text(f'relay_url = "http://127.0.0.1:{free_port()}"\n'
                      f'api_key_file = "{live.tmp / "no-such.key"}"\n'
                      'bind = "no-such-host.invalid"\n'
                      'forward = ["0:alpha:not-this-one", "0:alpha:nor-this"]\n')
    proc = live.start(["--config", str(config), "--relay-url", live.relay.url, "--api-key-file",
                       str(live.key_file), "--bind", "127.0.0.1", "--forward", "0:alpha:echo"])
    try:
        port = forwarded_port(proc)
        assert echo_once(port, b"overridden\n") == b"overridden\n"
        output = proc.output()
        assert "not-this-one" not in output and "nor-this" not in output, "--forward replaces the file's list"
        assert proc.stop(signal.SIGTERM, timeout=STOP_DEADLINE_SECS) == 0
    finally:
        proc.kill()
    assert_clean(proc.output(), live.client_key)


def argv_of(pid: int) -> str:
    """The command line as ps shows it to every user of the machine."""
    return subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True,
                          check=True, timeout=10).stdout


@pytest.mark.parametrize("via", ["file", "env"])
def test_key_never_in_argv_nor_logs(live: Live, via: str) -> None:
    args = ["--relay-url", live.relay.url, "--forward", "0:alpha:echo", "--log-level", "DEBUG"]
    env = None
    if via == "file":
        args += ["--api-key-file", str(live.key_file)]
    else:
        env = {"PTTH_CLIENT_API_KEY": live.client_key}
    proc = live.start(args, env=env)
    try:
        port = forwarded_port(proc)
        assert echo_once(port, b"secret-free\n") == b"secret-free\n"
        proc.wait_for_output(r"closed: 12 bytes up, 12 down")
        argv = argv_of(proc.pid)
        assert "ptth_client.py" in argv, argv  # it is the right process
        assert live.client_key not in argv
        if via == "file":
            assert str(live.key_file) in argv
        assert proc.stop(signal.SIGTERM, timeout=STOP_DEADLINE_SECS) == 0
    finally:
        proc.kill()
    output = proc.output()
    assert "DEBUG" in output, "the debug log was on"
    assert_clean(output, live.client_key)
    assert live.client_key not in live.relay.proc.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_a_running_client(live: Live, sig: int) -> None:
    proc = live.start(["--relay-url", live.relay.url, "--api-key-file", str(live.key_file),
                       "--forward", "0:alpha:echo"])
    try:
        port = forwarded_port(proc)
        # A forwarded connection in flight must not hold the stop up.
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECS) as sock:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            started = time.monotonic()
            assert proc.stop(sig, timeout=STOP_DEADLINE_SECS) == 0
            assert time.monotonic() - started < STOP_DEADLINE_SECS
            try:
                assert sock.recv(1) == b"", "the connection ends with the client"
            except ConnectionResetError:
                pass
    finally:
        proc.kill()
    assert_clean(proc.output(), live.client_key)


# ---- ptth_server: [forwarded_ports] ------------------------------------------


@pytest.mark.parametrize(("table", "words"), [
    ('[forwarded_ports]\nssh = "127.0.0.1"\n', ["'ssh'", "HOST:PORT", "'127.0.0.1'"]),
    ('[forwarded_ports]\nssh = "127.0.0.1:0"\n', ["'ssh'", "HOST:PORT"]),
    ('[forwarded_ports]\nssh = "127.0.0.1:65536"\n', ["'ssh'", "HOST:PORT"]),
    ('[forwarded_ports]\nssh = ":22"\n', ["'ssh'", "HOST:PORT"]),
    ('[forwarded_ports]\n"a b" = "127.0.0.1:22"\n', ["'a b'", "port name"]),
    ('[forwarded_ports]\n"a.b" = "127.0.0.1:22"\n', ["'a.b'", "port name"]),
    ('[forwarded_ports]\nssh = 22\n', ["'ssh'", "string"]),
    ('[forwarded_ports]\nssh = ["127.0.0.1:22"]\n', ["'ssh'", "string"]),
    ('forwarded_ports = "ssh=127.0.0.1:22"\n', ["forwarded_ports", "table"]),
], ids=["no-port", "port-0", "port-65536", "no-host", "name-space", "name-dot", "number", "list", "not-table"])
def test_server_bad_forwarded_ports(tmp_path: Path, table: str, words: list[str]) -> None:
    key = new_key("alpha")
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "server.toml"
    config.write_text(f'name = "alpha"\napi_key = "{key}"\nrelay_url = "http://127.0.0.1:{free_port()}/"\n'
                      f'file_server_root = "{root}"\n{table}')
    config.chmod(0o600)
    result = run([sys.executable, "ptth_server.py", "--config", str(config)])
    line = assert_one_line_error(result, "ptth_server", key=key)
    assert str(config) in line and "forwarded_ports" in line
    for word in words:
        assert word in line, (word, line)


# ---- the relay: [[clients]] ----------------------------------------------------

CODE_A = tripcode_of("client-a-key-0123456789abcdef")


@pytest.mark.parametrize(("table", "words"), [
    ('[[clients]]\nname = "laptop"\ntripcode = "{a}"\nallow = ["srv"]\n', ["[[clients]] #1", "'srv'"]),
    (('[[clients]]\nname = "laptop"\ntripcode = "{a}"\nallow = []\n'
      '[[clients]]\nname = "phone"\ntripcode = "{a}"\nallow = []\n'), ["'phone'", "tripcode"]),
], ids=["bad-allow", "same-tripcode"])
def test_relay_refuses_to_start_with_a_bad_clients_table(tmp_path: Path, table: str,
                                                         words: list[str]) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(table.replace("{a}", CODE_A))
    result = run([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "--bind", "127.0.0.1:0",
                  "ptth_relay:app"], env={"PTTH_RELAY_CONFIG": str(config)}, timeout=GUNICORN_FAIL_SECS)
    assert result.returncode != 0, result
    assert_clean(result.output)
    ours = [line for line in result.output.splitlines() if line.startswith("ptth_relay:")]
    assert len(ours) == 1, result.output
    assert str(config) in ours[0]
    for word in words:
        assert word in ours[0], (word, ours[0])
    assert "Listening at" not in result.output, "refused before binding"
