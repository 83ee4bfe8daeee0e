"""Run a relay and a server on this machine, ready to browse: `make demo`.

The demo keeps its state in ./demo/ (gitignored): sample files to serve, the
server's config with a generated API key (mode 0600, kept across runs), the
relay's config with that key's tripcode, and one log per process. It starts the
relay (gunicorn, gevent worker) and the server, waits until the server has
connected to the relay, prints where to look, and stops both on Ctrl+C or SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import tomlkit

from ptth_lib.wire import tripcode

REPO_ROOT = Path(__file__).resolve().parents[2]  # ptth_lib/tools/demo.py -> the repository
DEMO_DIR = REPO_ROOT / "demo"
FILES_DIR = DEMO_DIR / "files"
SERVER_CONFIG = DEMO_DIR / "ptth_server.toml"
RELAY_CONFIG = DEMO_DIR / "ptth_relay.toml"
SERVER_NAME = "demo"
BIG_FILE_NAME = "random-10MiB.bin"
BIG_FILE_BYTES = 10 * 1024 * 1024  # big enough that a download shows streaming
# gunicorn and the server start in a second or two; 20 s allows a slow, busy machine.
READY_DEADLINE_SECONDS = 20.0
POLL_INTERVAL_SECONDS = 0.2
# Above the relay's long-poll time would make Ctrl+C feel hung; 10 s then SIGKILL.
STOP_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 30
# Long enough to show long-polling, short enough that a parked poll never delays a stop much.
LISTEN_TIMEOUT_SECS = 5

README_TEXT = """\
PTTH demo
=========

These files live in demo/files/ on the machine running `make demo`. The server
(ptth_server.py) serves them by connecting *out* to the relay and long-polling
it for requests; the relay (ptth_relay, under gunicorn) forwards your browser's
requests to the server and streams the answers back. The server opens no port.

Try:
  - sub folder/ for a folder listing,
  - the file with spaces and non-ASCII characters in its name,
  - random-10MiB.bin for a big download (check it against random-10MiB.bin.sha256),
  - a Range request: curl -r 0-99 <url of a file>

Stop the demo with Ctrl+C; `make clean` deletes this folder and the venv.
"""

# Relative path under demo/files/ -> contents; created once, kept on later runs.
SMALL_FILES = {
    "README.txt": README_TEXT,
    "sub folder/hello.txt": "Hello from a sub folder.\n",
    "sub folder/numbers.csv": "n,square\n" + "".join(f"{n},{n * n}\n" for n in range(1, 11)),
    "naïve café – ünïcödé ✓.txt": "A file name with spaces and non-ASCII characters.\n",
}


class _Stop(Exception):
    """Raised in the main loop by the SIGTERM handler."""


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it may hold a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def _prepare_files() -> None:
    FILES_DIR.mkdir(parents=True, exist_ok=True)
    for rel, text in SMALL_FILES.items():
        path = FILES_DIR / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    big = FILES_DIR / BIG_FILE_NAME
    if not big.exists() or big.stat().st_size != BIG_FILE_BYTES:
        data = os.urandom(BIG_FILE_BYTES)
        big.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (FILES_DIR / f"{BIG_FILE_NAME}.sha256").write_text(f"{digest}  {BIG_FILE_NAME}\n")


def _prepare_configs(port: int) -> None:
    """Write both configs, keeping the API key of an existing server config."""
    api_key = None
    if SERVER_CONFIG.exists():
        with SERVER_CONFIG.open("rb") as f:
            api_key = tomllib.load(f).get("api_key")
    if not isinstance(api_key, str) or not tripcode.is_strong(api_key):
        api_key = tripcode.generate_key()
    server = {
        "name": SERVER_NAME,
        "api_key": api_key,
        "relay_url": f"http://127.0.0.1:{port}",
        "file_server_root": str(FILES_DIR),
    }
    _write_private(SERVER_CONFIG, "# Written by ptth_lib.demo; keep secret.\n" + tomlkit.dumps(server))
    relay = {
        "listen_timeout_secs": LISTEN_TIMEOUT_SECS,
        "servers": [
            {
                "name": SERVER_NAME,
                "tripcode": tripcode.derive(api_key),
                "display_name": "Demo server",
            }
        ],
    }
    RELAY_CONFIG.write_text("# Written by ptth_lib.demo.\n" + tomlkit.dumps(relay), encoding="utf-8")


def _is_port_free(port: int) -> bool:
    # SO_REUSEADDR as gunicorn sets it, so a port only in TIME_WAIT counts as free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (DEMO_DIR / f"{name}.log").open("wb") as log:
        # Own session: Ctrl+C reaches only us, and we stop each child's whole group.
        return subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _print_tail(name: str) -> None:
    lines = (DEMO_DIR / f"{name}.log").read_text(errors="replace").splitlines()
    print(f"--- last lines of demo/{name}.log ---", file=sys.stderr)
    for line in lines[-LOG_TAIL_LINES:]:
        print(f"    {line}", file=sys.stderr)


def _wait_for_200(url: str, children: dict[str, subprocess.Popen[bytes]], deadline: float) -> str:
    """Poll `url` until it answers 200; return "" or what went wrong."""
    # No proxy: an http_proxy in the environment must not intercept 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        for name, proc in children.items():
            if proc.poll() is not None:
                _print_tail(name)
                return f"the {name} exited early with code {proc.returncode}"
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return ""
        except (urllib.error.URLError, OSError):
            pass  # not up yet (connection refused) or not ready (502 while the server connects)
        time.sleep(POLL_INTERVAL_SECONDS)
    for name in children:
        _print_tail(name)
    return f"{url} did not answer 200 within {READY_DEADLINE_SECONDS:.0f} s"


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child's process group, then SIGKILL what is left after the grace time."""
    for proc in children.values():
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)  # the group: gunicorn's workers too
    except ProcessLookupError:
        pass  # already gone


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def main() -> int:
    parser = argparse.ArgumentParser(description="Run a PTTH relay and server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=4000, help="relay port (default 4000)")
    port = parser.parse_args().port
    if not _is_port_free(port):
        # `make demo` is the documented way in, so the hint is in its terms (the make variable).
        print(f"demo: port {port} is in use: stop what uses it, or use another port: make demo PORT=N",
              file=sys.stderr)
        return 1
    try:
        DEMO_DIR.mkdir(exist_ok=True)
        _prepare_files()
        _prepare_configs(port)
    except tomllib.TOMLDecodeError as e:
        print(f"{SERVER_CONFIG}: {e}; fix it or delete demo/ to start afresh", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot prepare {DEMO_DIR}: {e}", file=sys.stderr)
        return 1

    env = dict(os.environ, PTTH_RELAY_CONFIG=str(RELAY_CONFIG), PYTHONUNBUFFERED="1")
    base = f"http://127.0.0.1:{port}"
    children: dict[str, subprocess.Popen[bytes]] = {}
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        relay_argv = [sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py"]
        relay_argv += ["--bind", f"127.0.0.1:{port}", "ptth_relay:app"]
        children["relay"] = _start("relay", relay_argv, env)
        deadline = time.monotonic() + READY_DEADLINE_SECONDS
        problem = _wait_for_200(f"{base}/frontend/relay_up_check", children, deadline)
        if not problem:
            server_argv = [sys.executable, "ptth_server.py", "--config", "demo/ptth_server.toml"]
            children["server"] = _start("server", server_argv, env)
            problem = _wait_for_200(f"{base}/frontend/servers/{SERVER_NAME}/", children, deadline)
        if problem:
            print(f"demo failed to start: {problem}", file=sys.stderr)
            return 1

        files = f"{base}/frontend/servers/{SERVER_NAME}/files/"
        print(
            f"""
PTTH demo is running (state and logs in demo/: relay.log, server.log).
  Browse the files:  {files}
  Server list:       {base}/frontend/servers/
  Download by curl:  curl -o /tmp/{BIG_FILE_NAME} {files}{BIG_FILE_NAME}
Press Ctrl+C to stop.""",
            flush=True,
        )
        while True:
            for name, proc in children.items():
                if proc.poll() is not None:
                    _print_tail(name)
                    print(f"the {name} exited with code {proc.returncode}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping the demo", flush=True)
        return 0
    finally:
        # A second Ctrl+C must not leave the children running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(children)


if __name__ == "__main__":
    raise SystemExit(main())
