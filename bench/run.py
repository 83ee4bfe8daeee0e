"""PTTH benchmark suite: the tunnel against direct file serving, on loopback.

    .venv/bin/python bench/run.py [--quick] [--only SCENARIO[,SCENARIO...]]
        [--rev REVISION] [--profile | --profile-only]

Starts, on 127.0.0.1: the relay as deployed (gunicorn, gevent worker,
conf/gunicorn.conf.py), a real ptth_server, ptth_file_server on the same folder
(the direct baseline) and nginx on the same folder (for reference, config from
bench/nginx.conf.template). Then runs each scenario through the tunnel,
directly and with nginx, alternating targets within every run (the order
rotates from run to run), and keeps the median of the runs:

  bulk      one 1 GiB file with curl: MiB/s and time to first byte
  small     a 1 KiB file with wrk, concurrency 1 and 32: requests/s, p50, p99
  medium    a 256 KiB file with wrk, concurrency 32: requests/s
  parallel  8 concurrent 128 MiB downloads (curl): aggregate MiB/s
  idle      1,000 idle servers parked at a fresh relay (bench/idle_servers.py):
            relay RSS, and `small` at concurrency 1 without and with them

The product files are copied at start (from the working tree, or from git
revision --rev), so edits made while a run goes on cannot mix versions; the
commit is recorded. Peak RSS (VmHWM, reset through /proc/PID/clear_refs before
each run), the CPU share of every process involved (and its kernel part) and
how busy the whole machine was are recorded for every run. Others may share
the machine: before each run the suite waits for it to be quiet, and repeats a
run during which other processes took more than a quarter of a core (within a
budget of 5 minutes), flagging what stays noisy. Prints a Markdown table and
the targets of the benchmark issue, writes bench/results.json. With --profile
it then samples the relay worker and the server with py-spy during bulk,
small and medium transfers through the tunnel and writes a summary per
scenario to bench/profile-<scenario>.txt (raw samples in
/tmp/ptth-bench-profiles/). py-spy is not a project requirement:
`.venv/bin/pip install py-spy` first.

The test files are random bytes, written once to /tmp/ptth-bench-data
(--data-dir) and reused; every target reads the same files from the page
cache. nginx, wrk and curl come from Debian and are installed with apt-get
when missing (as root). Never part of `make test`: a full run takes about 10
minutes on a quiet machine, and needs both cores to itself.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import grp
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# The product files a run starts (relay, server, file server and their config),
# copied once per run so that edits made while it runs do not mix versions.
PRODUCT_PATHS = ("ptth_relay.py", "ptth_server.py", "ptth_file_server.py", "ptth_lib", "conf")

MIB = 1024 * 1024
SCENARIOS = ("bulk", "small", "medium", "parallel", "idle")
TARGETS = ("tunnel", "direct", "nginx")

# name -> (file name, size). Random bytes: no compression or zero-page
# special case anywhere can flatter one target.
FILES = {
    "bulk": ("bulk-1g.bin", 1024 * MIB),
    "parallel": ("parallel-128m.bin", 128 * MIB),
    "medium": ("medium-256k.bin", 256 * 1024),
    "small": ("small-1k.bin", 1024),
}
PARALLEL_DOWNLOADS = 8
IDLE_SERVERS = 1000
SERVER_NAME = "bench"

# Open files for the relay and the idle client: 1,000 parked listens plus
# clients, above the relay's worker_connections (4096) as the README advises.
NOFILE_LIMIT = 16384

STARTUP_DEADLINE_SECS = 30.0
# 1,000 idle servers ramp up over IDLE_RAMP_SECS; all must be parked by then.
IDLE_RAMP_SECS = 5.0
IDLE_PARK_DEADLINE_SECS = 60.0
# Generous: through a loaded tunnel a 1 GiB download is still seconds.
CURL_TIMEOUT_SECS = 300
WRK_TIMEOUT = "10s"

# Others share the machine (a developer's tests, CI): before each run, wait up
# to QUIET_WAIT_SECS until the machine is below QUIET_BUSY_PCT (of one core)
# without our load, and record what was seen.
QUIET_BUSY_PCT = 20.0
QUIET_SAMPLE_SECS = 0.5
QUIET_WAIT_SECS = 45.0
# A run during which processes not ours took more than NOISY_OTHERS_PCT of a
# core is repeated, up to NOISY_REPEATS times, and flagged "noisy" if it stays so.
NOISY_OTHERS_PCT = 25.0
NOISY_REPEATS = 2
# At most this long in all goes to waiting and repeating, so that a run on a
# busy machine still ends; noisy runs are then kept, and flagged.
NOISE_BUDGET_SECS = 300.0

PROFILE_DIR = Path(tempfile.gettempdir()) / "ptth-bench-profiles"
PROFILE_RATE_HZ = 100


@dataclass(frozen=True)
class Plan:
    """How many runs and how long: the full run, or --quick for a smoke test."""

    runs_curl: int = 5  # bulk and parallel: a run takes seconds
    runs_wrk: int = 3  # small, medium, idle: a run takes wrk_secs
    wrk_secs: int = 10
    warmup_secs: int = 2
    profile_secs: int = 10
    quick: bool = False


QUICK_PLAN = Plan(runs_curl=1, runs_wrk=1, wrk_secs=3, warmup_secs=1, profile_secs=4, quick=True)

_started = time.monotonic()


def progress(message: str) -> None:
    elapsed = int(time.monotonic() - _started)
    print(f"[bench {elapsed // 60:2d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and where the logs are."""


# ---- processes --------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_LIMIT if hard == resource.RLIM_INFINITY else min(NOFILE_LIMIT, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Proc:
    """A child process in its own process group, output to a log file, run in the code snapshot."""

    code_dir: Path = REPO  # set by run() to the snapshot

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                cwd=Proc.code_dir, start_new_session=True)

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
        raise BenchError(f"{pattern!r} not seen in the output of {' '.join(self.args)} (log {self.log}):\n"
                         f"{self.output()[-2000:]}")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(f"{' '.join(self.args)} exited with {self.popen.returncode} (log {self.log}):\n"
                             f"{self.output()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 15 s."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat; busy is all but idle and iowait."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def machine_busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Busy share of the whole machine between two machine_ticks(), 100 per core."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return 100 * (os.cpu_count() or 1) * busy / total if total else 0.0


class _NoiseBudget:
    """Seconds spent so far waiting for quiet and repeating noisy runs, against NOISE_BUDGET_SECS."""

    spent = 0.0

    @classmethod
    def left(cls) -> bool:
        return cls.spent < NOISE_BUDGET_SECS


def wait_for_quiet(label: str) -> float:
    """Wait until the machine is quiet between runs (others may share it); return the busy share seen."""
    started = time.monotonic()
    deadline = started + QUIET_WAIT_SECS
    try:
        while True:
            before = machine_ticks()
            time.sleep(QUIET_SAMPLE_SECS)
            busy = machine_busy_pct(before, machine_ticks())
            if busy <= QUIET_BUSY_PCT:
                return round(busy, 1)
            if time.monotonic() > deadline or not _NoiseBudget.left():
                progress(f"{label}: machine still {busy:.0f} % busy without us; measuring anyway")
                return round(busy, 1)
            progress(f"{label}: machine {busy:.0f} % busy without us (other processes); waiting")
            time.sleep(2)
    finally:
        _NoiseBudget.spent += max(0.0, time.monotonic() - started - QUIET_SAMPLE_SECS)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since start or the last clear_refs) in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_until(check: Callable[[], bool], what: str, proc: Proc | None = None,
               deadline: float = STARTUP_DEADLINE_SECS) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        if proc is not None:
            proc.check_alive()
        time.sleep(0.1)
    log = f" (log {proc.log})" if proc else ""
    raise BenchError(f"timed out after {deadline:.0f} s waiting for {what}{log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- tools and data ----------------------------------------------------------

_SBIN_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"


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


def new_key(name: str) -> str:
    return f"bench-key-{name}-" + os.urandom(18).hex()


def tripcode_of(key: str) -> str:
    """The spec's tripcode, independent of ptth_lib: base64 of BLAKE3 of the UTF-8 key."""
    import blake3

    return base64.b64encode(blake3.blake3(key.encode()).digest()).decode()


def relay_config(servers: dict[str, str]) -> str:
    """A relay config registering `servers` (name -> API key) with default settings.

    But one: wrk's connections all come from one address, which the relay
    would make wait beyond `requests_per_address` (16) in flight at a time.
    That is a policy against one client taking all of a server; the suite
    measures what the tunnel costs, so it lifts the policy (in revisions that
    have it).
    """
    knows_shares = "requests_per_address" in (Proc.code_dir / "ptth_lib" / "config.py").read_text()
    return ("requests_per_address = 10000\n\n" if knows_shares else "") + "".join(
        f'[[servers]]\nname = "{name}"\ntripcode = "{tripcode_of(key)}"\n\n' for name, key in servers.items())


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


# ---- the processes under test ------------------------------------------------


@dataclass
class Tunnel:
    """A relay under gunicorn and one ptth_server connected to it."""

    relay: Proc
    server: Proc
    url: str

    def worker_pid(self) -> int:
        """The gunicorn worker (child of the master), where the relay's state and work are."""
        kids = children(self.relay.pid)
        if len(kids) != 1:
            raise BenchError(f"expected one gunicorn worker, found {kids} (log {self.relay.log})")
        return kids[0]

    def stop(self) -> None:
        self.server.stop()
        self.relay.stop()


@dataclass
class Endpoint:
    """One way to fetch the bench files: a base URL and the processes doing the work."""

    name: str
    files_url: str
    pids: Callable[[], dict[str, int]]


@dataclass
class Bench:
    work: Path
    data: Path
    plan: Plan
    procs: list[Proc] = field(default_factory=list)
    counter: int = 0

    def _log(self, what: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:02d}-{what}.log"

    def start_tunnel(self, servers: dict[str, str]) -> Tunnel:
        """Start a relay registering `servers` plus our server, and our server."""
        key = new_key(SERVER_NAME)
        self.counter += 1
        config = self.work / f"relay-{self.counter}.toml"
        config.write_text(relay_config({SERVER_NAME: key, **servers}))
        relay = Proc([sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py",
                      "--bind", "127.0.0.1:0", "ptth_relay:app"],
                     self._log("relay"), env={"PTTH_RELAY_CONFIG": str(config)})
        self.procs.append(relay)
        port = int(relay.wait_for_output(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(url + "/frontend/relay_up_check") == 200, "the relay", relay)
        wait_until(lambda: len(children(relay.pid)) == 1, "the gunicorn worker", relay)

        server_config = self.work / f"server-{self.counter}.toml"
        server_config.write_text(f'name = "{SERVER_NAME}"\napi_key = "{key}"\nrelay_url = "{url}/"\n'
                                 f'file_server_root = "{self.data}"\n')
        server_config.chmod(0o600)
        server = Proc([sys.executable, "ptth_server.py", "--config", str(server_config)], self._log("server"))
        self.procs.append(server)
        wait_until(lambda: http_status(f"{url}/frontend/servers/{SERVER_NAME}/") == 200,
                   "ptth_server online at the relay", server)
        return Tunnel(relay, server, url)

    def start_file_server(self) -> tuple[Proc, str]:
        proc = Proc([sys.executable, "ptth_file_server.py", "--root", str(self.data), "--bind", "127.0.0.1:0"],
                    self._log("file-server"))
        self.procs.append(proc)
        url = proc.wait_for_output(r"listening on (http://127\.0\.0\.1:\d+)").group(1)
        return proc, url

    def start_nginx(self) -> tuple[Proc, str]:
        nginx = find_tool("nginx")
        assert nginx is not None
        prefix = self.work / "nginx"
        prefix.mkdir(exist_ok=True)
        user = ""
        if os.geteuid() == 0:  # workers drop to nobody; the bench folder is world-readable
            group = "nogroup" if _has_group("nogroup") else "nobody"
            user = f"user nobody {group};"
        for _attempt in range(3):
            port = free_port()
            text = (BENCH / "nginx.conf.template").read_text()
            for k, v in {"@USER@": user, "@PREFIX@": str(prefix), "@PORT@": str(port),
                         "@ROOT@": str(self.data)}.items():
                text = text.replace(k, v)
            conf = prefix / "nginx.conf"
            conf.write_text(text)
            proc = Proc([nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")],
                        self._log("nginx"))
            self.procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until(lambda u=url: http_status(u + "/files/" + FILES["small"][0]) == 200,
                           "nginx", proc, deadline=10)
                return proc, url
            except BenchError:
                proc.stop()
                if "Address already in use" not in (prefix / "error.log").read_text(errors="replace"):
                    raise
        raise BenchError("nginx found no free port in 3 tries")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # ---- measuring ----------------------------------------------------------

    def measure(self, endpoint: Endpoint, run: Callable[[], dict[str, Any]], label: str) -> dict[str, Any]:
        """Run one measurement and add, for each process: CPU share (100 = one core), the
        system part of it, and peak RSS; the client's CPU; how busy the whole machine was,
        and the busy share of processes not ours (others may share the machine)."""
        background = wait_for_quiet(label)
        pids = endpoint.pids()
        for pid in pids.values():
            reset_peak_rss(pid)
        before = {k: cpu_times(pid) for k, pid in pids.items()}
        client_before = _children_cpu()
        machine_before = machine_ticks()
        started = time.monotonic()
        result = run()
        wall = time.monotonic() - started
        machine = machine_busy_pct(machine_before, machine_ticks())
        after = {k: cpu_times(pid) for k, pid in pids.items()}
        cpu = {k: 100 * (sum(after[k]) - sum(before[k])) / wall for k in pids}
        cpu["client"] = 100 * (_children_cpu() - client_before) / wall
        result["cpu_pct"] = {k: round(v, 1) for k, v in cpu.items()}
        result["sys_pct"] = {k: round(100 * (after[k][1] - before[k][1]) / wall, 1) for k in pids}
        result["machine_pct"] = {"busy": round(machine, 1), "others": round(max(0.0, machine - sum(cpu.values())), 1),
                                 "others_before": background}
        result["peak_rss_mib"] = {k: round(memory_kib(pid)["VmHWM"] / 1024, 1) for k, pid in pids.items()}
        return result

    def alternate(self, label: str, endpoints: list[Endpoint], runs: int,
                  run: Callable[[Endpoint], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """`runs` rounds over the endpoints, each round in a rotated order."""
        results: dict[str, list[dict[str, Any]]] = {e.name: [] for e in endpoints}
        for i in range(runs):
            shift = i % len(endpoints)
            for endpoint in endpoints[shift:] + endpoints[:shift]:
                progress(f"{label}: run {i + 1} of {runs}, {endpoint.name}")
                for attempt in range(1 + NOISY_REPEATS):
                    started = time.monotonic()
                    result = self.measure(endpoint, lambda e=endpoint: run(e), f"{label}, {endpoint.name}")
                    others = result["machine_pct"]["others"]
                    result["noisy"] = others > NOISY_OTHERS_PCT
                    result["attempt"] = attempt + 1
                    if not result["noisy"]:
                        break
                    repeat = attempt < NOISY_REPEATS and _NoiseBudget.left()
                    progress(f"{label}, {endpoint.name}: other processes took {others:.0f} % of a core "
                             f"during the run" + (", repeating it" if repeat else ", keeping it"))
                    if not repeat:
                        break
                    _NoiseBudget.spent += time.monotonic() - started
                results[endpoint.name].append(result)
        return results


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def curl(url: str, size: int) -> dict[str, Any]:
    """Download `url` to /dev/null; check the status and size."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}",
         url], check=False, capture_output=True, text=True, timeout=CURL_TIMEOUT_SECS)
    return _curl_result(url, size, out.stdout, out.stderr)


def _curl_result(url: str, size: int, stdout: str, stderr: str) -> dict[str, Any]:
    try:
        code, got, ttfb, total = stdout.split()
    except ValueError:
        raise BenchError(f"curl {url}: unexpected output {stdout!r} {stderr.strip()!r}") from None
    if code != "200" or int(got) != size:
        raise BenchError(f"curl {url}: status {code}, {got} of {size} bytes {stderr.strip()}")
    return {"mib_s": round(size / float(total) / MIB, 1), "ttfb_ms": round(float(ttfb) * 1000, 2),
            "secs": round(float(total), 3)}


def curl_parallel(url: str, size: int, count: int) -> dict[str, Any]:
    """`count` concurrent downloads of `url`; aggregate MiB/s over the wall time of all."""
    args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}",
            url]
    started = time.monotonic()
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    outs = [p.communicate(timeout=CURL_TIMEOUT_SECS) for p in procs]
    wall = time.monotonic() - started
    each = [_curl_result(url, size, out, err) for out, err in outs]
    return {"mib_s": round(count * size / wall / MIB, 1), "secs": round(wall, 3),
            "slowest_mib_s": min(e["mib_s"] for e in each), "fastest_mib_s": max(e["mib_s"] for e in each)}


def wrk(url: str, connections: int, secs: int) -> dict[str, Any]:
    """wrk with one thread (the servers get the other core) and bench/wrk_report.lua."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--timeout", WRK_TIMEOUT,
            "-s", str(BENCH / "wrk_report.lua"), url]
    out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=secs + 60)
    m = re.search(r"^WRK_JSON (\{.*\})$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not m:
        raise BenchError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    raw = json.loads(m.group(1))
    secs_run = raw["duration_us"] / 1e6
    errors = {k: v for k, v in raw["errors"].items() if v}
    if errors:
        progress(f"warning: wrk {url} at {connections} connections had errors {errors}")
    lat = raw["latency_us"]
    return {"rps": round(raw["requests"] / secs_run, 1), "mib_s": round(raw["bytes"] / secs_run / MIB, 1),
            "p50_ms": lat["p50"] / 1000, "p90_ms": lat["p90"] / 1000, "p99_ms": lat["p99"] / 1000,
            "requests": raw["requests"], "errors": errors}


# ---- scenarios ---------------------------------------------------------------


def _url(endpoint: Endpoint, what: str) -> str:
    return endpoint.files_url + FILES[what][0]


def scenario_bulk(bench: Bench, endpoints: list[Endpoint]) -> dict[str, Any]:
    name, size = FILES["bulk"]
    for e in endpoints:
        progress(f"bulk: warm-up, {e.name}")
        curl(_url(e, "parallel"), FILES["parallel"][1])
    runs = bench.alternate("bulk 1 GiB", endpoints, bench.plan.runs_curl,
                           lambda e: curl(_url(e, "bulk"), size))
    return {"file": name, "bytes": size, "runs": runs}


def scenario_parallel(bench: Bench, endpoints: list[Endpoint]) -> dict[str, Any]:
    name, size = FILES["parallel"]
    for e in endpoints:
        progress(f"parallel: warm-up, {e.name}")
        curl(_url(e, "parallel"), size)
    runs = bench.alternate(f"parallel {PARALLEL_DOWNLOADS} x 128 MiB", endpoints, bench.plan.runs_curl,
                           lambda e: curl_parallel(_url(e, "parallel"), size, PARALLEL_DOWNLOADS))
    return {"file": name, "bytes": size, "downloads": PARALLEL_DOWNLOADS, "runs": runs}


def _wrk_scenario(bench: Bench, endpoints: list[Endpoint], what: str, connections: int) -> dict[str, Any]:
    plan = bench.plan
    label = f"{what} c{connections}"
    for e in endpoints:
        progress(f"{label}: warm-up, {e.name}")
        wrk(_url(e, what), connections, plan.warmup_secs)
    runs = bench.alternate(label, endpoints, plan.runs_wrk, lambda e: wrk(_url(e, what), connections, plan.wrk_secs))
    return {"file": FILES[what][0], "connections": connections, "secs": plan.wrk_secs, "runs": runs}


def scenario_small(bench: Bench, endpoints: list[Endpoint]) -> dict[str, Any]:
    return {"c1": _wrk_scenario(bench, endpoints, "small", 1),
            "c32": _wrk_scenario(bench, endpoints, "small", 32)}


def scenario_medium(bench: Bench, endpoints: list[Endpoint]) -> dict[str, Any]:
    return {"c32": _wrk_scenario(bench, endpoints, "medium", 32)}


def listeners_waiting(relay_url: str) -> int:
    try:
        with urllib.request.urlopen(relay_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1
    m = re.search(r"^ptth_listeners_waiting (\S+)$", text, re.MULTILINE)
    return int(float(m.group(1))) if m else -1


def scenario_idle(bench: Bench, direct: Endpoint) -> dict[str, Any]:
    """A fresh relay with 1,000 more servers registered: small c1 without them parked, then with."""
    plan = bench.plan
    idle_keys = {f"idle-{i:04d}": new_key(f"idle-{i:04d}") for i in range(IDLE_SERVERS)}
    progress(f"idle: starting a relay with {IDLE_SERVERS + 1} servers registered")
    tunnel = bench.start_tunnel(idle_keys)
    idle_client: Proc | None = None
    try:
        endpoint = Endpoint("tunnel", f"{tunnel.url}/frontend/servers/{SERVER_NAME}/files/",
                            lambda: {"relay": tunnel.worker_pid(), "server": tunnel.server.pid})
        endpoints = [endpoint, direct]
        url = _url(endpoint, "small")
        progress("idle: warm-up")
        wrk(url, 1, plan.warmup_secs)
        rss_before = memory_kib(tunnel.worker_pid())["VmRSS"]
        without = bench.alternate("idle: small c1 without idle servers", endpoints, plan.runs_wrk,
                                  lambda e: wrk(_url(e, "small"), 1, plan.wrk_secs))

        keys_file = bench.work / "idle-keys.json"
        keys_file.write_text(json.dumps(idle_keys))
        progress(f"idle: parking {IDLE_SERVERS} idle servers' listens (bench/idle_servers.py)")
        duration = 120 + plan.runs_wrk * 2 * (plan.wrk_secs + 5)
        idle_client = Proc([sys.executable, str(BENCH / "idle_servers.py"), "--relay", tunnel.url,
                            "--keys", str(keys_file), "--ramp-secs", str(IDLE_RAMP_SECS),
                            "--duration-secs", str(duration)], bench._log("idle-servers"))
        bench.procs.append(idle_client)
        parked_at = time.monotonic()
        wait_until(lambda: listeners_waiting(tunnel.url) >= IDLE_SERVERS, f"{IDLE_SERVERS} parked listens",
                   idle_client, deadline=IDLE_PARK_DEADLINE_SECS)
        park_secs = time.monotonic() - parked_at
        time.sleep(2)
        worker = tunnel.worker_pid()
        rss_parked = memory_kib(worker)["VmRSS"]
        cpu0, t0 = cpu_seconds(worker), time.monotonic()
        time.sleep(5)
        idle_cpu_pct = 100 * (cpu_seconds(worker) - cpu0) / (time.monotonic() - t0)
        parked_count = listeners_waiting(tunnel.url)
        with_idle = bench.alternate(f"idle: small c1 with {IDLE_SERVERS} idle servers", endpoints,
                                    plan.runs_wrk, lambda e: wrk(_url(e, "small"), 1, plan.wrk_secs))
        parked_after = listeners_waiting(tunnel.url)
        idle_client.check_alive()
        rss_end = memory_kib(worker)
        return {
            "servers": IDLE_SERVERS,
            "park_secs": round(park_secs, 1),
            "listeners_waiting": {"before_runs": parked_count, "after_runs": parked_after},
            "relay_rss_mib": {"before": round(rss_before / 1024, 1), "parked": round(rss_parked / 1024, 1),
                              "after_runs": round(rss_end["VmRSS"] / 1024, 1),
                              "peak_since_start": round(rss_end["VmHWM"] / 1024, 1)},
            "relay_cpu_pct_while_idle": round(idle_cpu_pct, 1),
            "without": without,
            "with": with_idle,
        }
    finally:
        if idle_client is not None:
            idle_client.stop()
        tunnel.stop()


# ---- profiling ---------------------------------------------------------------


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(found, os.X_OK):
        raise BenchError("--profile needs py-spy: `.venv/bin/pip install py-spy` (not a project requirement)")
    return found


def profile(bench: Bench, endpoint: Endpoint) -> dict[str, Any]:
    """Sample the relay worker and the server with py-spy while load runs through the tunnel.

    The relay is one gevent thread: its active samples are where its CPU goes
    (idle = the hub waiting in epoll, left out). The server has a thread per
    response, and py-spy counts some threads blocked in recv() as active, so
    it is sampled twice: every active thread (time in syscalls included, which
    matters for bulk) and only the thread holding the GIL (`--gil`: where its
    Python time goes, which matters for small requests).
    """
    py_spy = _py_spy()
    PROFILE_DIR.mkdir(exist_ok=True)
    secs = bench.plan.profile_secs
    bulk_size = FILES["bulk"][1]

    def bulk_load() -> dict[str, Any]:
        end = time.monotonic() + secs + 1
        speeds = []
        while time.monotonic() < end:
            speeds.append(curl(_url(endpoint, "bulk"), bulk_size)["mib_s"])
        return {"mib_s": round(statistics.median(speeds), 1)}

    loads: dict[str, Callable[[], dict[str, Any]]] = {
        "bulk": bulk_load,
        "small-c1": lambda: wrk(_url(endpoint, "small"), 1, secs + 1),
        "small-c32": lambda: wrk(_url(endpoint, "small"), 32, secs + 1),
        "medium-c32": lambda: wrk(_url(endpoint, "medium"), 32, secs + 1),
    }
    samplers = {"relay": ("relay", []), "server": ("server", []), "server-gil": ("server", ["--gil"])}
    summaries = {}
    for label, load in loads.items():
        progress(f"profile: {label} through the tunnel, py-spy for {secs} s")
        raws = {who: PROFILE_DIR / f"profile-{label}-{who}.raw.txt" for who in samplers}

        def sampled(load: Callable[[], dict[str, Any]] = load,
                    raws: dict[str, Path] = raws) -> dict[str, Any]:
            pids = endpoint.pids()
            spies = [subprocess.Popen(
                [py_spy, "record", "--pid", str(pids[proc]), "--duration", str(secs), "--rate",
                 str(PROFILE_RATE_HZ), "--format", "raw", "--nonblocking", *flags, "-o", str(raws[who])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for who, (proc, flags) in samplers.items()]
            time.sleep(0.5)  # let py-spy attach
            figures = load()
            for spy in spies:
                _, err = spy.communicate(timeout=60)
                if spy.returncode != 0:
                    raise BenchError(f"py-spy failed: {err[-1000:]}")
            return figures

        m = bench.measure(endpoint, sampled, f"profile {label}")
        figure = f"{m['mib_s']:,.0f} MiB/s" if label == "bulk" else f"{m['rps']:,.0f} requests/s"
        text = [f"# py-spy profile: {label} through the tunnel, {figure} while sampled",
                f"# {secs} s at {PROFILE_RATE_HZ} Hz per sampler, --nonblocking; idle samples left out.",
                f"# CPU, 100 = one core: {_cpu_line(m)}", ""]
        for who, (proc, flags) in samplers.items():
            title = f"{proc} {' '.join(flags)}".strip()
            text += summarize_profile(raws[who], title, m["cpu_pct"][proc], m["sys_pct"][proc])
        out = BENCH / f"profile-{label}.txt"
        out.write_text("\n".join(text) + "\n")
        summaries[label] = {"summary": str(out.relative_to(REPO)), "figure": figure,
                            "cpu_pct": m["cpu_pct"], "sys_pct": m["sys_pct"], "machine_pct": m["machine_pct"]}
    return summaries


def _cpu_line(m: dict[str, Any]) -> str:
    parts = [f"{k} {v:.0f} % (system {m['sys_pct'][k]:.0f} %)" if k in m["sys_pct"] else f"{k} {v:.0f} %"
             for k, v in m["cpu_pct"].items()]
    return ", ".join(parts) + f"; whole machine {m['machine_pct']['busy']:.0f} % of 200"


_SITE = re.compile(r"^.*/(site-packages|lib/python3\.\d+)/")


def _frame(frame: str) -> str:
    """`send (/x/site-packages/gevent/_socket3.py:123)` -> `send (gevent/_socket3.py)`."""
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    path = _SITE.sub("", path).replace(str(Proc.code_dir) + "/", "").replace(str(REPO) + "/", "")
    return f"{func} ({path})"


def _package(frame: str) -> str:
    path = frame.rpartition("(")[2].rstrip(")")
    top = path.split("/")[0]
    if top.endswith(".py") and "/" not in path:
        return "stdlib:" + top[:-3] if not top.startswith("ptth") else top
    return top


def summarize_profile(raw: Path, who: str, cpu_pct: float, sys_pct: float, top: int = 20) -> list[str]:
    """Self and inclusive shares of the sampled functions, and self time by package."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for f in set(frames):
            inclusive[f] += n
    if total == 0:
        return [f"## {who}: no samples", ""]

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f} %"

    heading = (f"## {who}: process CPU {cpu_pct:.0f} % of one core ({sys_pct:.0f} % in the kernel); "
               f"{total} samples")
    lines = [heading, "",
             "self time by package:"]
    lines += [f"  {pct(n)}  {name}" for name, n in packages.most_common(12)]
    lines += ["", f"self time, top {top} functions:"]
    lines += [f"  {pct(n)}  {name}" for name, n in own.most_common(top)]
    lines += ["", f"inclusive time, top {top + 10} functions:"]
    lines += [f"  {pct(n)}  {name}" for name, n in inclusive.most_common(top + 10)]
    return [*lines, ""]


# ---- results -----------------------------------------------------------------


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every number across runs (recursing into dicts); peak RSS keeps the max."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        if key in ("noisy", "attempt"):
            continue
        if key == "errors":
            out["errors_total"] = sum(sum(v.values()) for v in values)
        elif key == "peak_rss_mib":
            out["peak_rss_mib_max"] = {k: max(v[k] for v in values) for k in first}
            out[key] = {k: round(statistics.median(v[k] for v in values), 1) for k in first}
        elif isinstance(first, dict) and all(isinstance(x, int | float) for x in first.values()) and first:
            out[key] = {k: round(statistics.median(v[k] for v in values), 2) for k in first}
        elif isinstance(first, int | float) and not isinstance(first, bool):
            out[key] = round(statistics.median(values), 3)
    return out


def add_medians(node: Any) -> Any:
    """Replace every {"runs": {target: [run, ...]}} by adding "median": {target: {...}}."""
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key in ("runs", "without", "with") and isinstance(value, dict) and all(
                    isinstance(v, list) for v in value.values()):
                node[f"{key}_median" if key != "runs" else "median"] = {
                    t: _median_of(r) for t, r in value.items() if r}
            else:
                add_medians(value)
    return node


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    mem = re.search(r"^MemTotal:\s*(\d+)", meminfo, re.MULTILINE)

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def tool(args: list[str]) -> str:
        try:
            out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("gevent", "gunicorn", "flask", "werkzeug", "requests", "urllib3",
                                             "msgpack", "greenlet")},
        "nginx": tool([find_tool("nginx") or "nginx", "-v"]),
        "wrk": tool(["wrk", "-v"]),
        "curl": tool(["curl", "--version"]),
    }


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,.{digits}f}"


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "-"
    return f"{a / b:.2f}"


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table: median per target, and tunnel/direct."""
    s = results["scenarios"]
    rows: list[tuple[str, str, str, str, str]] = []

    def metric(label: str, node: Any, key: str, digits: int = 0) -> None:
        med = _get(node, "median") or {}
        vals = [_get(med, t, key) for t in TARGETS]
        rows.append((label, *(_fmt(v, digits) for v in vals), _ratio(vals[0], vals[1])))

    if "bulk" in s:
        metric("1. bulk 1 GiB, MiB/s", s["bulk"], "mib_s")
        metric("1. bulk 1 GiB, time to first byte, ms", s["bulk"], "ttfb_ms", 2)
    if "small" in s:
        for c in ("c1", "c32"):
            conc = c[1:]
            metric(f"2. small 1 KiB, concurrency {conc}, requests/s", s["small"][c], "rps")
            metric(f"2. small 1 KiB, concurrency {conc}, p50 ms", s["small"][c], "p50_ms", 2)
            metric(f"2. small 1 KiB, concurrency {conc}, p99 ms", s["small"][c], "p99_ms", 2)
    if "medium" in s:
        metric("3. medium 256 KiB, concurrency 32, requests/s", s["medium"]["c32"], "rps")
        metric("3. medium 256 KiB, concurrency 32, MiB/s", s["medium"]["c32"], "mib_s")
    if "parallel" in s:
        metric(f"4. parallel {PARALLEL_DOWNLOADS} x 128 MiB, aggregate MiB/s", s["parallel"], "mib_s")
    for name, label in (("bulk", "1 GiB"), ("parallel", f"{PARALLEL_DOWNLOADS} x 128 MiB")):
        if name in s:
            peak = {t: _get(s[name], "median", t, "peak_rss_mib_max") or {} for t in TARGETS}
            rows.append((f"5. peak RSS during {label}, MiB (max of runs)",
                         f"relay {_fmt(peak['tunnel'].get('relay'))}, server {_fmt(peak['tunnel'].get('server'))}",
                         _fmt(peak["direct"].get("file_server")), _fmt(peak["nginx"].get("nginx")), "-"))
    if "idle" in s:
        idle = s["idle"]
        rss = idle["relay_rss_mib"]
        rows.append((f"5. relay RSS, {idle['servers']:,} idle servers parked, MiB",
                     f"{_fmt(rss['parked'])} (before {_fmt(rss['before'])})", "-", "-", "-"))
        for key, label in (("rps", "requests/s"), ("p50_ms", "p50 ms")):
            digits = 2 if key.endswith("ms") else 0
            w = [_get(idle, "with_median", t, key) for t in ("tunnel", "direct")]
            wo = [_get(idle, "without_median", t, key) for t in ("tunnel", "direct")]
            rows.append((f"5. small c1 without idle servers, {label}", _fmt(wo[0], digits), _fmt(wo[1], digits),
                         "-", _ratio(wo[0], wo[1])))
            rows.append((f"5. small c1 with {idle['servers']:,} idle servers, {label}", _fmt(w[0], digits),
                         _fmt(w[1], digits), "-", _ratio(w[0], w[1])))
    head = ("scenario", "tunnel", "direct (ptth_file_server)", "nginx", "tunnel/direct")
    out = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the benchmark issue, each with its value and whether it is met."""
    s = results["scenarios"]
    checks: list[dict[str, Any]] = []

    def check(what: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        checks.append({"target": what, "value": value, "shown": shown if value is not None else "-",
                       "met": None if value is None else bool(ok(value))})

    bulk = _get(s, "bulk", "median")
    if bulk:
        t, d = bulk["tunnel"]["mib_s"], bulk["direct"]["mib_s"]
        check("bulk through the tunnel >= 600 MiB/s", t, lambda v: v >= 600, f"{t:,.0f} MiB/s")
        check("bulk tunnel >= 40 % of direct ptth_file_server", t / d, lambda v: v >= 0.40, f"{100 * t / d:.0f} %")
        peak = bulk["tunnel"]["peak_rss_mib_max"]
        check("relay worker < 80 MiB RSS during the 1 GiB transfer", peak["relay"], lambda v: v < 80,
              f"{peak['relay']:.0f} MiB")
        check("server < 80 MiB RSS during the 1 GiB transfer", peak["server"], lambda v: v < 80,
              f"{peak['server']:.0f} MiB")
    small = _get(s, "small")
    if small:
        rps = small["c32"]["median"]["tunnel"]["rps"]
        check("small at concurrency 32 through the tunnel >= 1,500 requests/s", rps, lambda v: v >= 1500,
              f"{rps:,.0f} requests/s")
        c1 = small["c1"]["median"]
        added = c1["tunnel"]["p50_ms"] - c1["direct"]["p50_ms"]
        check("small at concurrency 1: p50 added latency <= 1.5 ms over direct", added, lambda v: v <= 1.5,
              f"{added:.2f} ms")
    idle = _get(s, "idle")
    if idle:
        rss = idle["relay_rss_mib"]["parked"]
        check(f"{idle['servers']:,} idle servers: relay RSS < 300 MiB", rss, lambda v: v < 300, f"{rss:.0f} MiB")
        w = idle["with_median"]["tunnel"]["rps"]
        wo = idle["without_median"]["tunnel"]["rps"]
        check(f"{idle['servers']:,} idle servers: small c1 within 20 % of its figure without them", w / wo,
              lambda v: v >= 0.8, f"{w:,.0f} vs {wo:,.0f} requests/s ({100 * (w / wo - 1):+.0f} %)")
    return checks


def _all_runs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "machine_pct" in node and "cpu_pct" in node:
            yield node
        else:
            for key, value in node.items():
                if not key.endswith("median"):
                    yield from _all_runs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_runs(item)


def background_load(results: dict[str, Any]) -> dict[str, float]:
    """CPU used by processes not ours during the runs (others share the machine), 100 = one core."""
    others = [r["machine_pct"]["others"] for r in _all_runs(results["scenarios"])]
    if not others:
        return {}
    runs = list(_all_runs(results["scenarios"]))
    return {"runs": len(others), "median": round(statistics.median(others), 1), "max": max(others),
            "noisy_runs_kept": sum(1 for r in runs if r.get("noisy")),
            "repeated_runs": sum(r.get("attempt", 1) - 1 for r in runs),
            "secs_waited_or_repeated": round(_NoiseBudget.spent)}


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """tunnel/direct and tunnel/nginx for each throughput figure."""
    s = results["scenarios"]
    out = {}
    for label, path, key in (("bulk_mib_s", ("bulk",), "mib_s"), ("bulk_ttfb_ms", ("bulk",), "ttfb_ms"),
                             ("small_c1_rps", ("small", "c1"), "rps"), ("small_c1_p50_ms", ("small", "c1"), "p50_ms"),
                             ("small_c32_rps", ("small", "c32"), "rps"), ("medium_c32_rps", ("medium", "c32"), "rps"),
                             ("parallel_mib_s", ("parallel",), "mib_s")):
        med = _get(s, *path, "median")
        if med:
            t, d, n = (med[x][key] for x in TARGETS)
            out[f"{label}_tunnel_over_direct"] = round(t / d, 3) if d else None
            out[f"{label}_tunnel_over_nginx"] = round(t / n, 3) if n else None
    return out


# ---- main --------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK_PLAN if args.quick else Plan()
    only = [] if args.profile_only else args.only
    args.profile = args.profile or args.profile_only
    ensure_tools(need_nginx=any(x != "idle" for x in only))
    data = Path(args.data_dir)
    prepare_data(data)
    work = Path(tempfile.mkdtemp(prefix="ptth-bench-"))
    progress(f"logs and configs in {work}")
    bench = Bench(work, data, plan)
    results: dict[str, Any] = {"machine": machine_info(), "plan": plan.__dict__, "scenarios": {}}
    ok = False
    try:
        code = results["code"] = snapshot_code(args.rev, work / "code")
        Proc.code_dir = work / "code"
        progress(f"code under test: {code['source']}, {code['commit']} {code['subject']!r}"
                 + (" plus uncommitted changes" if code["dirty"] else ""))
        file_server, direct_url = bench.start_file_server()
        direct = Endpoint("direct", f"{direct_url}/files/", lambda: {"file_server": file_server.pid})
        endpoints = [direct]
        if any(x != "idle" for x in only) or args.profile:
            t = bench.start_tunnel({})
            endpoints.insert(0, Endpoint("tunnel", f"{t.url}/frontend/servers/{SERVER_NAME}/files/",
                                         lambda: {"relay": t.worker_pid(), "server": t.server.pid}))
            nginx, nginx_url = bench.start_nginx()
            endpoints.append(Endpoint("nginx", f"{nginx_url}/files/",
                                      lambda: {"nginx": children(nginx.pid)[0]}))
        progress(f"running {', '.join(only) or 'no scenario'} ({'quick' if plan.quick else 'full'} plan)")
        scenarios = results["scenarios"]
        for name in only:
            if name == "bulk":
                scenarios["bulk"] = scenario_bulk(bench, endpoints)
            elif name == "small":
                scenarios["small"] = scenario_small(bench, endpoints)
            elif name == "medium":
                scenarios["medium"] = scenario_medium(bench, endpoints)
            elif name == "parallel":
                scenarios["parallel"] = scenario_parallel(bench, endpoints)
            elif name == "idle":
                scenarios["idle"] = scenario_idle(bench, direct)
        if args.profile:
            results["profiles"] = profile(bench, endpoints[0])
        ok = True
    finally:
        bench.close()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            progress(f"logs kept in {work}")
    add_medians(results["scenarios"])
    results["ratios"] = ratios(results)
    results["targets"] = check_targets(results)
    results["background_load_pct"] = background_load(results)
    results["elapsed_secs"] = round(time.monotonic() - _started, 1)
    return results


def _parse_only(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return [x for x in SCENARIOS if x in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run per scenario: a smoke test, not figures")
    parser.add_argument("--only", type=_parse_only, default=list(SCENARIOS), metavar="SCENARIO[,...]",
                        help=f"run only these scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument("--profile", action="store_true",
                        help="then profile the tunnel with py-spy (bench/profile-*.txt)")
    parser.add_argument("--rev", metavar="REVISION",
                        help="benchmark this git revision (e.g. HEAD) instead of the working tree as it is at start")
    parser.add_argument("--profile-only", action="store_true", help="run no scenario, only the profiles")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ptth-bench-data"),
                        help="where the random test files are written once and reused")
    parser.add_argument("--output", default=str(BENCH / "results.json"), help="results file (JSON)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and configs of the processes")
    args = parser.parse_args(argv)

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    _raise_nofile()  # inherited by the relay and the idle client
    try:
        results = run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    c = results["code"]
    print(f"\nPTTH benchmark, {m['date']}, {m['cpu_model']}, {m['cores']} cores; code {c['commit']}"
          f"{' plus uncommitted changes' if c['dirty'] else ''}"
          f"{' (QUICK: smoke test, not figures)' if args.quick else ''}\n")
    print(table(results))
    print("\n| target | value | met |\n|---|---:|---|")
    for c in results["targets"]:
        met = "-" if c["met"] is None else ("met" if c["met"] else "MISSED")
        print(f"| {c['target']} | {c['shown']} | {met} |")
    bg = results["background_load_pct"]
    if bg:
        print(f"\nOther processes used a median {bg['median']:.0f} % of a core during the runs kept (max "
              f"{bg['max']:.0f} %); {bg['repeated_runs']} runs were repeated for that, {bg['noisy_runs_kept']} "
              f"of {bg['runs']} kept above {NOISY_OTHERS_PCT:.0f} %.")
    print(f"\nwritten {args.output}; {results['elapsed_secs']:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
