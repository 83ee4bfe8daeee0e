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

This file is the command line and the order of a run. The rest of the suite:
plan.py (scenarios, files, plans), targets.py (the processes under test,
started with tests/e2e/procs.py), scenarios.py, load.py (curl and wrk),
measure.py (CPU, RSS, noise), profiling.py (py-spy) and report.py (medians,
targets, the table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from plan import BENCH, QUICK_PLAN, SCENARIOS, SERVER_NAME, STARTED, Plan, progress
from profiling import profile
from report import add_medians, background_load, check_targets, machine_info, ratios, summary
from scenarios import SCENARIO_RUNS
from targets import (
    Endpoint,
    Targets,
    ensure_tools,
    prepare_data,
    procs,
    run_command,
    snapshot_code,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the targets, run the scenarios (and profiles) asked for, stop everything; the results."""
    plan = QUICK_PLAN if args.quick else Plan()
    only = [] if args.profile_only else args.only
    args.profile = args.profile or args.profile_only
    ensure_tools(need_nginx=any(x != "idle" for x in only))
    data = Path(args.data_dir)
    prepare_data(data)
    work = Path(tempfile.mkdtemp(prefix="ptth-bench-"))
    progress(f"logs and configs in {work}")
    targets = Targets(work, data, work / "code")
    results: dict[str, Any] = {"machine": machine_info(), "plan": plan.__dict__, "scenarios": {}}
    ok = False
    try:
        code = results["code"] = snapshot_code(args.rev, targets.code)
        progress(f"code under test: {code['source']}, {code['commit']} {code['subject']!r}"
                 + (" plus uncommitted changes" if code["dirty"] else ""))
        file_server, direct_url = targets.start_file_server()
        direct = Endpoint("direct", f"{direct_url}/files/", lambda: {"file_server": file_server.pid})
        endpoints = [direct]
        if any(x != "idle" for x in only) or args.profile:
            t = targets.start_tunnel({})
            endpoints.insert(0, Endpoint("tunnel", f"{t.url}/frontend/servers/{SERVER_NAME}/files/",
                                         lambda: {"relay": t.worker_pid(), "server": t.server.pid}))
            nginx, nginx_url = targets.start_nginx()
            endpoints.append(Endpoint("nginx", f"{nginx_url}/files/",
                                      lambda: {"nginx": procs.children(nginx.pid)[0]}))
        progress(f"running {', '.join(only) or 'no scenario'} ({'quick' if plan.quick else 'full'} plan)")
        for name in only:
            results["scenarios"][name] = SCENARIO_RUNS[name](targets, plan, endpoints)
        if args.profile:
            results["profiles"] = profile(plan, endpoints[0], targets.code)
        ok = True
    finally:
        targets.close()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            progress(f"logs kept in {work}")
    add_medians(results["scenarios"])
    results["ratios"] = ratios(results)
    results["targets"] = check_targets(results)
    results["background_load_pct"] = background_load(results)
    results["elapsed_secs"] = round(time.monotonic() - STARTED, 1)
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
    code, results = run_command("bench", lambda: run(args))
    if results is None:
        return code
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results, args.quick, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
