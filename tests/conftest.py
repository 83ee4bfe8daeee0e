"""What every test shares: under pytest-xdist, tests marked `alone` run with no other test beside them.

`make test` runs the suite in several pytest-xdist workers (`-n`, pyproject.toml).
Most tests wait on sockets and timeouts rather than the CPU, so they share the
machine well; a few measure latency or hit a window of milliseconds, and a
busy neighbour would make them fail now and then. Those are marked `alone`.

How: a readers-writer lock between the workers, two lock files in a folder the
controller makes. Every test holds the main lock shared; an `alone` test holds
it exclusively, so it starts once the tests running beside it have ended, and
none starts beside it. The turnstile lock gives it priority: it holds the
turnstile while it waits, and a test must pass through the turnstile before
taking its shared lock, so the workers do not keep the lock shared forever.
Without xdist (one process) nothing is locked.

Under xdist the `alone` tests run first: the files that hold them are handed
out first, each with its `alone` tests at its head, so they run one after the
other at the start, and no worker drains its running test for one of them
later. Then come the files that take longest (LONGEST_FILES), so that the run
does not end with one worker busy on a long file and the rest idle.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

_LOCK_DIR_KEY = "ptth_alone_lock_dir"

# The files that take longest (30 s or more in one process), longest first: under xdist they
# are handed out first. Only the order depends on this list; a stale one costs time, nothing else.
LONGEST_FILES = ("test_quic_forwarding.py", "test_backend_api.py", "test_reliability.py",
                 "test_forwarding_faults.py", "test_cli.py", "test_forwarding_api.py", "test_relay_pages.py",
                 "test_hostile.py", "test_operations.py", "test_cluster_faults.py", "test_desktop_client.py",
                 "test_cluster_ops.py", "test_cluster_relay.py", "test_web_app_processes.py", "test_redirects.py",
                 "test_server_lifecycle.py")


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and config.pluginmanager.hasplugin("xdist"):
        config._ptth_lock_dir = tempfile.mkdtemp(prefix="ptth-alone-")  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_ptth_lock_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):
        return

    with_alone = {item.path for item in items if item.get_closest_marker("alone")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        if item.path in with_alone:
            return 0, 0 if item.get_closest_marker("alone") else 1
        return 1 + (LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)), 0

    items.sort(key=rank)  # stable: otherwise each file keeps its own order


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist, on the controller: hand each worker the folder of the lock files."""
    node.workerinput[_LOCK_DIR_KEY] = node.config._ptth_lock_dir


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    folder = getattr(item.config, "workerinput", {}).get(_LOCK_DIR_KEY)
    if folder is None:
        yield
        return
    alone = item.get_closest_marker("alone") is not None
    with open(os.path.join(folder, "turnstile"), "a") as turnstile, open(os.path.join(folder, "main"), "a") as main:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(main, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
