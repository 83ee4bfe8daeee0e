"""Where the tunnel's CPU goes: py-spy samples of the relay worker and the server under load.

bench/run.py --profile (or --profile-only) runs bulk, small and medium
transfers through the tunnel while py-spy samples the relay worker and the
server, and writes a summary per scenario to bench/profile-<scenario>.txt:
self time by package, and the top functions by self and inclusive time.
Raw samples go to /tmp/ptth-bench-profiles/. py-spy is not a project
requirement: `.venv/bin/pip install py-spy` first.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from load import curl, wrk
from measure import measure
from plan import BENCH, FILES, REPO, BenchError, Plan, progress
from targets import Endpoint

PROFILE_DIR = Path(tempfile.gettempdir()) / "ptth-bench-profiles"
PROFILE_RATE_HZ = 100


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(found, os.X_OK):
        raise BenchError("--profile needs py-spy: `.venv/bin/pip install py-spy` (not a project requirement)")
    return found


def profile(plan: Plan, endpoint: Endpoint, code: Path) -> dict[str, Any]:
    """Sample the relay worker and the server with py-spy while load runs through the tunnel.

    The relay is one gevent thread: its active samples are where its CPU goes
    (idle = the hub waiting in epoll, left out). The server has a thread per
    response, and py-spy counts some threads blocked in recv() as active, so
    it is sampled twice: every active thread (time in syscalls included, which
    matters for bulk) and only the thread holding the GIL (`--gil`: where its
    Python time goes, which matters for small requests). `code` is where the
    code under test runs from, left out of the file names shown.
    """
    py_spy = _py_spy()
    PROFILE_DIR.mkdir(exist_ok=True)
    secs = plan.profile_secs
    bulk_size = FILES["bulk"][1]

    def bulk_load() -> dict[str, Any]:
        end = time.monotonic() + secs + 1
        speeds = []
        while time.monotonic() < end:
            speeds.append(curl(endpoint.url("bulk"), bulk_size)["mib_s"])
        return {"mib_s": round(statistics.median(speeds), 1)}

    loads: dict[str, Callable[[], dict[str, Any]]] = {
        "bulk": bulk_load,
        "small-c1": lambda: wrk(endpoint.url("small"), 1, secs + 1),
        "small-c32": lambda: wrk(endpoint.url("small"), 32, secs + 1),
        "medium-c32": lambda: wrk(endpoint.url("medium"), 32, secs + 1),
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

        m = measure(endpoint, sampled, f"profile {label}")
        figure = f"{m['mib_s']:,.0f} MiB/s" if label == "bulk" else f"{m['rps']:,.0f} requests/s"
        text = [f"# py-spy profile: {label} through the tunnel, {figure} while sampled",
                f"# {secs} s at {PROFILE_RATE_HZ} Hz per sampler, --nonblocking; idle samples left out.",
                f"# CPU, 100 = one core: {_cpu_line(m)}", ""]
        for who, (proc, flags) in samplers.items():
            title = f"{proc} {' '.join(flags)}".strip()
            text += summarize_profile(raws[who], title, m["cpu_pct"][proc], m["sys_pct"][proc], code)
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


def _frame(frame: str, code: Path) -> str:
    """`send (/x/site-packages/gevent/_socket3.py:123)` -> `send (gevent/_socket3.py)`."""
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    path = _SITE.sub("", path).replace(str(code) + "/", "").replace(str(REPO) + "/", "")
    return f"{func} ({path})"


def _package(frame: str) -> str:
    path = frame.rpartition("(")[2].rstrip(")")
    top = path.split("/")[0]
    if top.endswith(".py") and "/" not in path:
        return "stdlib:" + top[:-3] if not top.startswith("ptth") else top
    return top


def summarize_profile(raw: Path, who: str, cpu_pct: float, sys_pct: float, code: Path,
                      top: int = 20) -> list[str]:
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
        frames = [_frame(f, code) for f in stack.split(";")]
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
