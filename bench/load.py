"""The clients that put load on a target: curl for downloads, wrk for many small requests.

Each checks what it got (status and size, or wrk's errors) and returns its
figures: MiB/s and time to first byte for curl; requests/s, MiB/s and
latency percentiles for wrk (reported as JSON by bench/wrk_report.lua).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

from plan import BENCH, MIB, BenchError, progress

# Generous: through a loaded tunnel a 1 GiB download is still seconds.
CURL_TIMEOUT_SECS = 300
WRK_TIMEOUT = "10s"
_CURL_WRITE_OUT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"


def curl(url: str, size: int) -> dict[str, Any]:
    """Download `url` to /dev/null; check the status and size."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", _CURL_WRITE_OUT, url],
                         check=False, capture_output=True, text=True, timeout=CURL_TIMEOUT_SECS)
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
    args = ["curl", "-sS", "-o", "/dev/null", "-w", _CURL_WRITE_OUT, url]
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
