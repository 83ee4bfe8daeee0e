"""What each run of the suite records besides its own figures: CPU, peak RSS, noise.

For every process doing the work: its CPU share (100 = one core) and the
kernel's part of it, from /proc/PID/stat; its peak RSS (VmHWM, reset through
/proc/PID/clear_refs before the run); the client's CPU; how busy the whole
machine was (/proc/stat), and so what processes not ours took. Others may
share the machine: before each run we wait for it to be quiet, and a run
during which others took more than NOISY_OTHERS_PCT of a core is repeated,
within a budget, and flagged "noisy" if it stays so. `alternate` runs the
targets in turn, rotating the order from run to run.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plan import progress
from targets import Endpoint

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


class NoiseBudget:
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
            if time.monotonic() > deadline or not NoiseBudget.left():
                progress(f"{label}: machine still {busy:.0f} % busy without us; measuring anyway")
                return round(busy, 1)
            progress(f"{label}: machine {busy:.0f} % busy without us (other processes); waiting")
            time.sleep(2)
    finally:
        NoiseBudget.spent += max(0.0, time.monotonic() - started - QUIET_SAMPLE_SECS)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(endpoint: Endpoint, run: Callable[[], dict[str, Any]], label: str) -> dict[str, Any]:
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
    result["wall_secs"] = round(wall, 3)  # with cpu_pct, the CPU seconds of each process
    result["cpu_pct"] = {k: round(v, 1) for k, v in cpu.items()}
    result["sys_pct"] = {k: round(100 * (after[k][1] - before[k][1]) / wall, 1) for k in pids}
    result["machine_pct"] = {"busy": round(machine, 1), "others": round(max(0.0, machine - sum(cpu.values())), 1),
                             "others_before": background}
    result["peak_rss_mib"] = {k: round(memory_kib(pid)["VmHWM"] / 1024, 1) for k, pid in pids.items()}
    if result.get("requests"):  # wrk: CPU per request, steadier than requests/s on a shared machine
        result["cpu_us_per_request"] = {k: round(1e6 * (sum(after[k]) - sum(before[k])) / result["requests"], 1)
                                        for k in pids}
    return result


def alternate(label: str, endpoints: list[Endpoint], runs: int,
              run: Callable[[Endpoint], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`runs` rounds over the endpoints, each round in a rotated order; noisy runs repeated."""
    results: dict[str, list[dict[str, Any]]] = {e.name: [] for e in endpoints}
    for i in range(runs):
        shift = i % len(endpoints)
        for endpoint in endpoints[shift:] + endpoints[:shift]:
            progress(f"{label}: run {i + 1} of {runs}, {endpoint.name}")
            for attempt in range(1 + NOISY_REPEATS):
                started = time.monotonic()
                result = measure(endpoint, lambda e=endpoint: run(e), f"{label}, {endpoint.name}")
                others = result["machine_pct"]["others"]
                result["noisy"] = others > NOISY_OTHERS_PCT
                result["attempt"] = attempt + 1
                if not result["noisy"]:
                    break
                repeat = attempt < NOISY_REPEATS and NoiseBudget.left()
                progress(f"{label}, {endpoint.name}: other processes took {others:.0f} % of a core "
                         f"during the run" + (", repeating it" if repeat else ", keeping it"))
                if not repeat:
                    break
                NoiseBudget.spent += time.monotonic() - started
            results[endpoint.name].append(result)
    return results
