"""The processes the suite measures: the tunnel, ptth_file_server (direct) and nginx.

Before anything starts, the product files are copied (from the working tree,
or from a git revision with --rev) so that edits made while a run goes on
cannot mix versions; every process runs that copy. The random test files are
written once and read into the page cache, so every target serves the same
cached pages. nginx, wrk and curl come from Debian.

Starting, waiting for and stopping a process is tests/e2e/procs.py, which
the end-to-end tests use too. This module puts tests/e2e on sys.path for it,
so bench/'s scripts take `procs` from here (`from targets import procs`).
"""

from __future__ import annotations

import grp
import io
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plan import BENCH, FILES, MIB, REPO, SERVER_NAME, BenchError, progress

sys.path.append(str(REPO / "tests" / "e2e"))  # for procs, the process helpers the tests share
import procs
from procs import Proc, ProcError

__all__ = ["NOFILE_LIMIT", "PRODUCT_PATHS", "STARTUP_DEADLINE_SECS", "STOP_SECS", "Endpoint", "Proc",
           "ProcError", "Targets", "Tunnel", "ensure_tools", "find_tool", "prepare_data", "procs",
           "raise_nofile", "relay_config", "snapshot_code"]

# The product files a run starts (relay, server, file server and their config),
# copied once per run so that edits made while it runs do not mix versions.
PRODUCT_PATHS = ("ptth_relay.py", "ptth_server.py", "ptth_file_server.py", "ptth_lib", "conf")

# Open files for the relay and the idle client: 1,000 parked listens plus
# clients, above the relay's worker_connections (4096) as the README advises.
NOFILE_LIMIT = 16384
# More than the tests allow: a relay registering 1,001 servers, on a busy machine.
STARTUP_DEADLINE_SECS = 30.0
# SIGTERM, then SIGKILL after this long: gunicorn lets its worker finish first.
STOP_SECS = 15.0

_SBIN_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"


def raise_nofile() -> None:
    """Raise our open-file limit to NOFILE_LIMIT; the relay and the idle client inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_LIMIT if hard == resource.RLIM_INFINITY else min(NOFILE_LIMIT, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run_command(prog: str, run: Callable[[], dict[str, Any]]) -> tuple[int, dict[str, Any] | None]:
    """Run a benchmark as a command: SIGTERM stops it as Ctrl+C does (its processes are
    stopped), the open-file limit is raised for it and its children, and an expected failure
    is one line on stderr. The exit code, and the results if there are any."""
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    raise_nofile()
    try:
        return 0, run()
    except (BenchError, ProcError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130, None


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def ensure_tools(need_nginx: bool) -> None:
    """Install nginx, wrk and curl from Debian if missing (as root; else say how)."""
    wanted = {"wrk": "wrk", "curl": "curl"}
    if need_nginx:
        wanted["nginx"] = "nginx"
    missing = [package for tool, package in wanted.items() if find_tool(tool) is None]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise BenchError(f"the benchmark needs {', '.join(missing)}: run `sudo {' '.join(command)}`")
    progress(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"], [*command[:2], "-qq", *command[2:]]):
        result = subprocess.run(args, check=False, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    still = [tool for tool in wanted if find_tool(tool) is None]
    if still:
        raise BenchError(f"apt-get installed {' '.join(missing)} but {', '.join(still)} is still not found")


def prepare_data(data_dir: Path) -> None:
    """Write the random test files once (reused by later runs), then read them into the page cache."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o755)  # nginx's worker runs as nobody
    for name, size in FILES.values():
        path = data_dir / name
        if not (path.is_file() and path.stat().st_size == size):
            progress(f"writing {size // 1024} KiB of random bytes to {path} (once; later runs reuse it)")
            part = path.with_name(path.name + ".part")
            with open(part, "wb") as f:
                left = size
                while left:
                    block = os.urandom(min(16 * MIB, left))
                    f.write(block)
                    left -= len(block)
            part.rename(path)
        path.chmod(0o644)
        with open(path, "rb", buffering=0) as f:
            while f.read(16 * MIB):
                pass


def snapshot_code(rev: str | None, dest: Path) -> dict[str, Any]:
    """Copy the product files into `dest`: from git revision `rev`, else from the working tree."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            raise BenchError(f"git {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout.strip()

    dest.mkdir()
    if rev is not None:
        commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
        archive = subprocess.run(["git", "archive", "--format=tar", commit], check=True, cwd=REPO,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        subject = git("log", "-1", "--format=%s", commit)
        return {"source": f"git revision {rev}", "commit": commit[:12], "subject": subject, "dirty": False}
    for name in PRODUCT_PATHS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=all", "--", *PRODUCT_PATHS))
    return {"source": "working tree", "commit": commit[:12], "subject": git("log", "-1", "--format=%s"),
            "dirty": dirty}


def relay_config(servers: dict[str, str], code: Path, extra: str = "") -> str:
    """A relay config for the code in `code`, registering `servers` (name -> API key), `extra` TOML first.

    With default settings but one: wrk's connections all come from one
    address, which the relay would make wait beyond `requests_per_address`
    (16) in flight at a time. That is a policy against one client taking all
    of a server; the suite measures what the tunnel costs, so it lifts the
    policy (in revisions that have it).
    """
    # The relay's keys are in ptth_lib/config.py in older revisions, ptth_lib/config/ now.
    sources = [code / "ptth_lib" / "config.py", *(code / "ptth_lib" / "config").glob("*.py")]
    knows_shares = any("requests_per_address" in f.read_text() for f in sources if f.is_file())
    return procs.relay_config(servers, ("requests_per_address = 10000\n" if knows_shares else "") + extra)


@dataclass
class Tunnel:
    """A relay under gunicorn and one ptth_server connected to it."""

    relay: Proc
    server: Proc
    url: str

    def worker_pid(self) -> int:
        """The gunicorn worker (child of the master), where the relay's state and work are."""
        return procs.gunicorn_worker(self.relay)

    def relay_pids(self, prefix: str = "") -> dict[str, int]:
        """The gunicorn master and each of its workers (a cluster has several), by name."""
        workers = sorted(procs.children(self.relay.pid))
        return {f"{prefix}master": self.relay.pid,
                **{f"{prefix}worker-{i + 1}": pid for i, pid in enumerate(workers)}}

    def stop(self) -> None:
        self.server.terminate(STOP_SECS)
        self.relay.terminate(STOP_SECS)


@dataclass
class Endpoint:
    """One way to fetch the bench files: a base URL and the processes doing the work."""

    name: str
    files_url: str
    pids: Callable[[], dict[str, int]]

    def url(self, what: str) -> str:
        """The URL of the test file `what` (a key of FILES)."""
        return self.files_url + FILES[what][0]


@dataclass
class Targets:
    """Starts the processes of one run, on the code in `code`, and stops them all at the end."""

    work: Path  # logs and configs
    data: Path  # the test files
    code: Path  # the product files under test
    procs: list[Proc] = field(default_factory=list)
    counter: int = 0

    def log(self, what: str) -> Path:
        """A new log file for a process."""
        self.counter += 1
        return self.work / f"{self.counter:02d}-{what}.log"

    def start(self, args: list[str], what: str) -> Proc:
        """Start a process that `close` will stop."""
        proc = Proc(args, self.log(what), cwd=self.code)
        self.procs.append(proc)
        return proc

    def start_tunnel(self, servers: dict[str, str], extra: str = "",
                     gunicorn_args: Sequence[str] = ()) -> Tunnel:
        """Start a relay registering `servers` plus our server, and our server.

        `extra` is added to the relay's config, `gunicorn_args` to its command line.
        """
        key = procs.new_key(SERVER_NAME)
        relay, url = self.start_relay({SERVER_NAME: key, **servers}, extra, gunicorn_args)
        return Tunnel(relay, self.start_server(url, key), url)

    def start_relay(self, servers: dict[str, str], extra: str = "",
                    gunicorn_args: Sequence[str] = ()) -> tuple[Proc, str]:
        """Start a relay (gunicorn) registering `servers`; it and its URL once it answers."""
        self.counter += 1
        config = self.work / f"relay-{self.counter}.toml"
        config.write_text(relay_config(servers, self.code, extra))
        relay, port = procs.start_relay(config, self.log("relay"), cwd=self.code, gunicorn_args=gunicorn_args,
                                        deadline=STARTUP_DEADLINE_SECS)
        self.procs.append(relay)
        return relay, f"http://127.0.0.1:{port}"

    def start_server(self, relay_url: str, key: str) -> Proc:
        """Start our ptth_server (SERVER_NAME, serving the test files) at `relay_url`; it once online."""
        self.counter += 1
        server_config = procs.write_server_config(self.work / f"server-{self.counter}.toml", SERVER_NAME, key,
                                                  relay_url, self.data)
        server = procs.start_server(server_config, self.log("server"), cwd=self.code)
        self.procs.append(server)
        procs.wait_for_server(relay_url, SERVER_NAME, server, STARTUP_DEADLINE_SECS)
        return server

    def start_file_server(self) -> tuple[Proc, str]:
        proc, url = procs.start_file_server(self.data, self.log("file-server"), cwd=self.code,
                                            deadline=STARTUP_DEADLINE_SECS)
        self.procs.append(proc)
        return proc, url

    def start_nginx(self) -> tuple[Proc, str]:
        """nginx on the test files, config from bench/nginx.conf.template; a new port if taken."""
        nginx = find_tool("nginx")
        assert nginx is not None
        prefix = self.work / "nginx"
        prefix.mkdir(exist_ok=True)
        user = ""
        if os.geteuid() == 0:  # workers drop to nobody; the bench folder is world-readable
            group = "nogroup" if _has_group("nogroup") else "nobody"
            user = f"user nobody {group};"
        for _attempt in range(3):
            port = procs.free_port()
            text = (BENCH / "nginx.conf.template").read_text()
            for k, v in {"@USER@": user, "@PREFIX@": str(prefix), "@PORT@": str(port),
                         "@ROOT@": str(self.data)}.items():
                text = text.replace(k, v)
            conf = prefix / "nginx.conf"
            conf.write_text(text)
            proc = self.start([nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")],
                              "nginx")
            url = f"http://127.0.0.1:{port}"
            try:
                procs.wait_until(lambda u=url: procs.http_status(u + "/files/" + FILES["small"][0]) == 200,
                                 "nginx", proc, deadline=10)
                return proc, url
            except ProcError:
                proc.terminate(STOP_SECS)
                if "Address already in use" not in (prefix / "error.log").read_text(errors="replace"):
                    raise
        raise BenchError("nginx found no free port in 3 tries")

    def start_idle_servers(self, relay_url: str, keys_file: Path, ramp_secs: float,
                           duration_secs: float) -> Proc:
        """bench/idle_servers.py: the listens of the servers in `keys_file`, parked at the relay."""
        return self.start([sys.executable, str(BENCH / "idle_servers.py"), "--relay", relay_url,
                           "--keys", str(keys_file), "--ramp-secs", str(ramp_secs),
                           "--duration-secs", str(duration_secs)], "idle-servers")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate(STOP_SECS)


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
