"""PTTH's programs as real processes on loopback, for the end-to-end tests and bench/ alike.

Every process runs in its own process group (stopping it stops its children,
such as gunicorn's worker) with its output in a log file, which every failure
quotes; every wait has a deadline. Programs bind port 0 and report the port
the OS gave them in their log, so nothing races for a port. The relay runs as
deployed (gunicorn, gevent worker, conf/gunicorn.conf.py).

Keys and tripcodes are made here independently of ptth_lib, so that a bug
there cannot hide itself. Standard library and blake3 only (no pytest, no
requests): tests/e2e/conftest.py builds its fixtures on this module, and the
benchmarks in bench/ import it too, with this folder on their sys.path.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import blake3

REPO = Path(__file__).resolve().parents[2]
# A wait that should take well under a second, with room for a busy 2-core machine.
STARTUP_DEADLINE_SECS = 20.0
# How much of a log a failure quotes: the last lines, where the reason usually is.
LOG_TAIL_CHARS = 3000

# Loopback only: never through a proxy from the environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProcError(AssertionError):
    """A process did not do what was waited for; the message quotes its log.

    An AssertionError, so that a test shows it as a failed check.
    """


def free_port() -> int:
    """A loopback port nobody listens on (nothing else binds it in the next moment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refusing_socket() -> socket.socket:
    """A socket bound to a loopback port without listening: connections to the port are refused.

    While it stays open, no test running in parallel can be handed the port and start answering
    on it, as can happen to a port `free_port` merely picked. Close it when done.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs."""
    with refusing_socket() as s:
        yield int(s.getsockname()[1])


def new_key(name: str) -> str:
    """A fresh random API key for `name`."""
    return f"test-key-for-{name}-" + base64.urlsafe_b64encode(os.urandom(18)).decode()


def tripcode_of(key: str) -> str:
    """Independent of ptth_lib on purpose: base64 of BLAKE3 of the UTF-8 key."""
    return base64.b64encode(blake3.blake3(key.encode()).digest()).decode()


def relay_config(servers: dict[str, str], extra: str = "") -> str:
    """A relay config: the `extra` TOML settings, then `servers` (name -> API key) by tripcode."""
    return extra + "\n" + "".join(f'[[servers]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\n'
                                  for name, key in servers.items())


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET (its body read and dropped), or None if no answer came."""
    try:
        with _LOOPBACK.open(url, timeout=timeout) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The child processes of `pid` (none once it is gone)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


class Proc:
    """A child process in its own process group, its stdout and stderr in a log file."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO, inherit_env: bool = True) -> None:
        """`env` is added to ours, or (inherit_env=False) to PATH and HOME alone."""
        self.args = list(args)
        self.log = log
        base = os.environ if inherit_env else {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
        full_env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                          start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _failure(self, what: str) -> ProcError:
        return ProcError(f"{what} (log {self.log}):\n{self.output()[-LOG_TAIL_CHARS:]}")

    def wait_for_output(self, pattern: str, deadline: float = STARTUP_DEADLINE_SECS) -> re.Match[str]:
        """The first match of `pattern` in the log, once it is there; fails if the process exits first."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise self._failure(f"{pattern!r} not seen in the output of {' '.join(self.args)}")

    def check_alive(self) -> None:
        """Raise ProcError, quoting the log, if the process has exited."""
        if self.popen.poll() is not None:
            raise self._failure(f"{' '.join(self.args)} exited with {self.popen.returncode}")

    def send_signal(self, sig: int) -> None:
        """`sig` to the whole group, while the process runs."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send `sig` and return the exit code; after `timeout` s, SIGKILL and raise ProcError."""
        self.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.popen.wait(5)
            raise self._failure(f"{' '.join(self.args)} did not stop on signal {sig}") from None

    def terminate(self, timeout: float = 15) -> None:
        """SIGTERM, SIGKILL after `timeout` s; never fails, so that a teardown goes on to the next."""
        with contextlib.suppress(ProcError):
            self.stop(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL to the whole group (children that outlived the process too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)


def wait_until(check: Callable[[], object], what: str, proc: Proc | None = None,
               deadline: float = STARTUP_DEADLINE_SECS) -> None:
    """Poll `check` until it is true; fail after `deadline` s, or as soon as `proc` exits."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        if proc is not None:
            proc.check_alive()
        time.sleep(0.05)
    message = f"timed out after {deadline:g} s waiting for {what}"
    raise proc._failure(message) if proc is not None else ProcError(message)


def start_relay(config: Path, log: Path, port: int = 0, env: dict[str, str] | None = None,
                cwd: Path = REPO, gunicorn_args: Sequence[str] = (),
                deadline: float = STARTUP_DEADLINE_SECS) -> tuple[Proc, int]:
    """Start the relay under gunicorn on 127.0.0.1:`port` (0: any) with `config`.

    Returns it and its port once it answers /frontend/relay_up_check; if it
    does not, kills it (a fixture failing here never reaches its teardown).
    `cwd` holds the code to run (ptth_relay.py, ptth_lib, conf).
    """
    proc = Proc([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py",
                 "--bind", f"127.0.0.1:{port}", *gunicorn_args, "ptth_relay:app"],
                log, env={"PTTH_RELAY_CONFIG": str(config), **(env or {})}, cwd=cwd)
    try:
        port = int(proc.wait_for_output(r"Listening at: http://127\.0\.0\.1:(\d+)", deadline).group(1))
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/frontend/relay_up_check") == 200,
                   "relay up", proc, deadline)
    except BaseException:
        proc.kill()
        raise
    return proc, port


def gunicorn_worker(relay: Proc) -> int:
    """The relay's gunicorn worker (the master's one child), where its state and its work are."""
    workers = children(relay.pid)
    if len(workers) != 1:
        raise relay._failure(f"expected one gunicorn worker, found {workers}")
    return workers[0]


def write_server_config(path: Path, name: str, key: str, relay_url: str, root: Path | None,
                        extra: str = "") -> Path:
    """ptth_server's config (mode 0600: it holds a key), serving `root` (if any); `extra` TOML appended."""
    served = f'file_server_root = "{root}"\n' if root is not None else ""
    path.write_text(f'name = "{name}"\napi_key = "{key}"\nrelay_url = "{relay_url}/"\n{served}{extra}\n')
    path.chmod(0o600)
    return path


def start_server(config: Path, log: Path, args: Sequence[str] = (), cwd: Path = REPO) -> Proc:
    """Start ptth_server with `config`; see wait_for_server for when it is online."""
    return Proc([sys.executable, "ptth_server.py", "--config", str(config), *args], log, cwd=cwd)


def wait_for_server(relay_url: str, name: str, proc: Proc | None = None,
                    deadline: float = STARTUP_DEADLINE_SECS) -> None:
    """Wait until the relay has server `name` online (its root answers 200)."""
    wait_until(lambda: http_status(f"{relay_url}/frontend/servers/{name}/") == 200,
               f"server {name} online", proc, deadline)


def start_web_app(log: Path, port: int = 0, cwd: Path = REPO,
                  deadline: float = STARTUP_DEADLINE_SECS) -> tuple[Proc, str]:
    """Start tests/e2e/web_test_app.py (werkzeug, threaded); returns it and its base URL once it listens."""
    return _start_listening([sys.executable, "tests/e2e/web_test_app.py", "--port", str(port)], log, cwd,
                            deadline)


def start_file_server(root: Path, log: Path, cwd: Path = REPO,
                      deadline: float = STARTUP_DEADLINE_SECS) -> tuple[Proc, str]:
    """Start ptth_file_server on `root`; returns it and its base URL once it listens."""
    return _start_listening([sys.executable, "ptth_file_server.py", "--root", str(root), "--bind", "127.0.0.1:0"],
                            log, cwd, deadline)


def _start_listening(args: list[str], log: Path, cwd: Path, deadline: float) -> tuple[Proc, str]:
    """Start a program that logs "listening on URL"; returns it and the URL once it does (else kills it)."""
    proc = Proc(args, log, cwd=cwd)
    try:
        url = proc.wait_for_output(r"listening on (http://127\.0\.0\.1:\d+)", deadline).group(1)
    except BaseException:
        proc.kill()
        raise
    return proc, url


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def relay_samples(relay_url: str) -> Samples:
    """Every sample of the relay's /metrics, keyed by (sample name, sorted labels).

    A cluster shows each node's series with a `node` label; they are summed
    here, as `sum without (node)` would, so tests read the whole relay the
    same way whether it runs as one process or many (tests/e2e/relay_modes.py).
    """
    from prometheus_client.parser import text_string_to_metric_families

    with _LOOPBACK.open(relay_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "node")))
            samples[key] = samples.get(key, 0.0) + s.value
    return samples


def unlabelled(samples: Samples) -> dict[str, float]:
    """The samples without labels (beyond a cluster's `node`), by name."""
    return {name: value for (name, labels), value in samples.items() if not labels}

