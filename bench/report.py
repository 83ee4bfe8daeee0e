"""What a run of the suite leaves: medians, ratios, targets, and the table it prints.

Every run is kept in bench/results.json; the table shows the median of the
runs per target and the tunnel/direct ratio, then the targets of the
benchmark issue, each met or missed, and how much other processes took of
the machine while the runs went on.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from measure import NOISY_OTHERS_PCT, NoiseBudget
from plan import PARALLEL_DOWNLOADS, TARGETS
from targets import find_tool


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
    """The machine and the software versions, for the record."""
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
            cpu = {t: _get(s["small"][c], "median", t, "cpu_us_per_request") or {} for t in TARGETS}
            if cpu["tunnel"]:
                rows.append((f"2. small 1 KiB, concurrency {conc}, CPU µs per request",
                             f"relay {_fmt(cpu['tunnel'].get('relay'))}, server {_fmt(cpu['tunnel'].get('server'))}",
                             _fmt(cpu["direct"].get("file_server")), _fmt(cpu["nginx"].get("nginx")), "-"))
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
            "secs_waited_or_repeated": round(NoiseBudget.spent)}


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


def summary(results: dict[str, Any], quick: bool, output: str) -> str:
    """What the suite prints at the end: the table, the targets, the background load."""
    m = results["machine"]
    c = results["code"]
    title = (f"\nPTTH benchmark, {m['date']}, {m['cpu_model']}, {m['cores']} cores; code {c['commit']}"
             f"{' plus uncommitted changes' if c['dirty'] else ''}"
             f"{' (QUICK: smoke test, not figures)' if quick else ''}\n")
    lines = [title, table(results),
             "\n| target | value | met |\n|---|---:|---|"]
    for t in results["targets"]:
        met = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"| {t['target']} | {t['shown']} | {met} |")
    bg = results["background_load_pct"]
    if bg:
        lines.append(f"\nOther processes used a median {bg['median']:.0f} % of a core during the runs kept (max "
                     f"{bg['max']:.0f} %); {bg['repeated_runs']} runs were repeated for that, "
                     f"{bg['noisy_runs_kept']} of {bg['runs']} kept above {NOISY_OTHERS_PCT:.0f} %.")
    lines.append(f"\nwritten {output}; {results['elapsed_secs']:.0f} s in all")
    return "\n".join(lines)
