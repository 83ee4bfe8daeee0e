"""The suite's relays as a cluster: PTTH_TEST_RELAY=workers or hosts (`make test-cluster`).

By default every relay a test starts is one gunicorn worker, as the
single-process relay runs. With PTTH_TEST_RELAY set, `Cluster.start_relay`
starts the same relay as a cluster on a redis-server of the test's own:

- `workers`: one gunicorn with WORKERS workers on one port;
- `hosts`: two gunicorns ("hosts") of HOST_WORKERS workers each, behind
  nginx doing round robin with the README's site config (its public
  variant: the auth_basic lines deleted) and the upstream of its cluster
  section, so servers and clients go through nginx as the README sets them
  up. nginx connects from NGINX_ADDRESS, which the relay trusts as a proxy.

The test sees one `Relay` (`cluster=True`): its port is the one clients
use, its `proc` stands for every process of the relay (logs joined, signals
to all). A test that starts its own cluster (it passes `-w` or a
`redis_url`) is left alone. A test that looks at the one worker's memory
skips (`Relay.worker_pid`); one of the relay's own HTTP edge, marked
`direct_relay`, skips behind nginx (conftest.py). Requests really cross: ids
name their owner worker, and tests/e2e/test_cluster_relay.py proves it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from procs import STARTUP_DEADLINE_SECS, Proc, ProcError

# PTTH_TEST_RELAY: "" or "single" (default), "workers", "hosts".
MODE = os.environ.get("PTTH_TEST_RELAY", "single") or "single"
MODES = ("single", "workers", "hosts")
if MODE not in MODES:
    raise SystemExit(f"PTTH_TEST_RELAY={MODE!r}: use one of {', '.join(MODES)}")

WORKERS = 4
HOST_WORKERS = 2


def wanted(config: Path, env: dict[str, str] | None, gunicorn_args: Sequence[str]) -> bool:
    """Whether this relay start becomes a cluster: in a cluster mode, unless the test made it one itself."""
    if MODE == "single":
        return False
    if "-w" in gunicorn_args or "--workers" in gunicorn_args or (env and "PTTH_REDIS_URL" in env):
        return False
    return not re.search(r"^\s*redis_url\s*=", config.read_text(), re.MULTILINE)


def cluster_env(redis_url: str) -> dict[str, str]:
    """What a relay of the cluster gets: the Redis (PTTH_REDIS_URL overrides the config). Its workers
    take peer ports from the default peer_bind range (the cluster's own tests use others)."""
    return {"PTTH_REDIS_URL": redis_url}


def wait_for_nodes(proc: Proc, workers: int) -> None:
    """Until each of the relay's workers has joined the cluster (logged "relay node ... up")."""
    proc.wait_for_output(r"(?s)(relay node \S+ up.*){" + str(workers) + "}", STARTUP_DEADLINE_SECS)


# nginx connects to the hosts from this address, which their config trusts as a proxy, so that
# the tests' clients (127.0.0.1) are visitors, not proxies: a visitor on a trusted address could
# name any address in X-Forwarded-For.
NGINX_ADDRESS = "127.0.0.77"


# The README's relay config line that goes with its nginx block, for nginx's own address.
TRUST_NGINX = f'trusted_proxies = ["{NGINX_ADDRESS}/32"]\n'


def _with_trust(text: str) -> str:
    """`text` trusting nginx, unless it says which proxies to trust itself."""
    return text if re.search(r"^\s*trusted_proxies\s*=", text, re.MULTILINE) else TRUST_NGINX + text


def trust_nginx(config: Path) -> None:
    """The relay behind the hosts' nginx trusts it (unless its config names its own proxies)."""
    config.write_text(_with_trust(config.read_text()))


def as_deployed(config: Path, text: str) -> str:
    """A new text for a relay's config: under PTTH_TEST_RELAY=hosts, still trusting nginx if it did."""
    return _with_trust(text) if MODE == "hosts" and config.read_text().startswith(TRUST_NGINX) else text


def hosts_site(ports: Sequence[int]) -> str:
    """The README's nginx block, public (no passwords), with the upstream of its cluster section
    (every host's port in turn; start_nginx points 4000 at the first)."""
    from nginx import cluster_site  # nginx.py imports conftest, which imports this module

    site = re.sub(r"^\s*auth_basic(_user_file)? .*\n", "", cluster_site([4000, *ports[1:]]), flags=re.MULTILINE)
    assert site.count("    proxy_http_version 1.1;\n") == 1
    return site.replace("    proxy_http_version 1.1;\n", f"    proxy_http_version 1.1;\n    proxy_bind {NGINX_ADDRESS};\n")


class _Popens:
    """What tests read of `Proc.popen` (poll, wait), for the processes of a relay together."""

    def __init__(self, procs: Sequence[Proc]) -> None:
        self._procs = procs

    def poll(self) -> int | None:
        """None while every process runs; else the first exit code."""
        for proc in self._procs:
            code = proc.popen.poll()
            if code is not None:
                return code
        return None

    def wait(self, timeout: float | None = None) -> int:
        codes = [proc.popen.wait(timeout) for proc in self._procs]
        return next((c for c in codes if c != 0), 0)

    @property
    def returncode(self) -> int | None:  # Proc.check_alive names it
        return self.poll()


class RelayProcs(Proc):
    """Every process of one relay (gunicorns, and nginx for hosts) as one `Proc`: the first is host A.

    Proc's own stop, terminate and wait_for_output work through what this overrides."""

    def __init__(self, procs: Sequence[Proc]) -> None:
        self.procs = list(procs)
        self.args = self.procs[0].args
        self.log = self.procs[0].log
        self.popen = _Popens(self.procs)  # type: ignore[assignment]

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def output(self) -> str:
        return "".join(proc.output() for proc in self.procs)

    def _failure(self, what: str) -> ProcError:
        logs = ", ".join(str(p.log) for p in self.procs)
        return ProcError(f"{what} (logs {logs}):\n{self.output()[-4000:]}")

    def send_signal(self, sig: int) -> None:
        for proc in self.procs:
            proc.send_signal(sig)

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
