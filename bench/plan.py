"""What a run of the benchmark suite (bench/run.py) measures, and how long.

The scenarios and the targets each runs against, the test files, the full
plan and the --quick one; and how every part of the suite reports progress
(a line on stderr with the time since start) and failure (BenchError).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STARTED = time.monotonic()

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
# The ptth_server every tunnel has, serving the files above.
SERVER_NAME = "bench"


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


def progress(message: str) -> None:
    """One line on stderr, stamped with the time since the suite started."""
    elapsed = int(time.monotonic() - STARTED)
    print(f"[bench {elapsed // 60:2d}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and where the logs are."""
