"""nginx in front of the relay, configured exactly as the README says.

The site config is the README's nginx block (under "Behind nginx (TLS)"),
read from README.md when the test runs, so a change there is a change here.
Only what cannot be the same on a test machine is changed, each replacement
checked to apply exactly once: the listen port (and no TLS), the relay's
port, and the password files' paths. nginx runs in the foreground in its own
prefix, reading and writing nothing of the system's nginx.

`make debian-deps` installs nginx; without it the tests that need it skip.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Cluster, Proc, Relay, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

USER, PASSWORD = "reader", "reader-password-1"
PRIVATE_USER, PRIVATE_PASSWORD = "insider", "insider-password-2"
# The relay config line the README pairs with its nginx block.
TRUSTED_PROXIES = 'trusted_proxies = ["127.0.0.1/32", "::1/128"]'


def readme_site_config() -> str:
    """The ```nginx block of README.md's "Behind nginx (TLS)" section, as written."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Behind nginx (TLS)"):]
    match = re.search(r"```nginx\n(.*?)```", section, re.DOTALL)
    assert match, "README.md has no nginx block under 'Behind nginx (TLS)'"
    return match.group(1)


def cluster_site(ports: list[int]) -> str:
    """The README's site block with the upstream of "Running a relay cluster" (its hosts on
    127.0.0.1 `ports`, in turn); 4000 is the port start_nginx points at the relay it is given."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running a relay cluster"):]
    match = re.search(r"```nginx\n(upstream ptth_relay \{.*?\})\n```", section, re.DOTALL)
    assert match, "README.md's cluster section has no upstream block"
    lines = match.group(1).splitlines()
    servers = [line for line in lines if re.match(r"\s*server \S+", line)]
    assert len(servers) >= 2, lines
    hosts = [re.sub(r"server \S+?;|server \S+", f"server 127.0.0.1:{port}", servers[0], count=1) for port in ports]
    upstream = "\n".join([lines[0], *hosts, *(line for line in lines[1:] if line not in servers)])
    site = readme_site_config()
    return _replace_once(site, r"(?s)^upstream ptth_relay \{.*?^\}", upstream.replace("\\", "\\\\"))


def _replace_once(text: str, pattern: str, replacement: str, at_most: bool = False) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1 or (at_most and count == 0), (
        f"the README's nginx block should have {pattern!r} exactly once, has it {count} times")
    return new


@dataclass
class Nginx:
    proc: Proc
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str]:
        """The people's password (location /)."""
        return USER, PASSWORD

    @property
    def private_auth(self) -> tuple[str, str]:
        """The password of /frontend/servers/private/."""
        return PRIVATE_USER, PRIVATE_PASSWORD

    def as_relay(self, relay: Relay) -> Relay:
        """The relay as seen through nginx, for Cluster.server and Cluster.client."""
        return Relay(relay.proc, self.port, relay.config, relay.cluster)


def start_nginx(cluster: Cluster, relay: Relay, site: str | None = None, port: int = 0) -> Nginx:
    """nginx with the README's site config (or `site`, a variant of it) in front of `relay`, on `port`
    (0: a free one)."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (make debian-deps installs it)")
    prefix = cluster.tmp / f"nginx-{cluster.counter}"
    prefix.mkdir()
    (prefix / "ptth.htpasswd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    (prefix / "ptth-private.htpasswd").write_text(f"{PRIVATE_USER}:{{PLAIN}}{PRIVATE_PASSWORD}\n")
    port = port or free_port()
    text = site if site is not None else readme_site_config()
    text = _replace_once(text, r"^\s*listen 443 ssl;\s*$", f"    listen 127.0.0.1:{port};")
    text = _replace_once(text, r"^\s*ssl_certificate .*$", "")
    text = _replace_once(text, r"^\s*ssl_certificate_key .*$", "")
    text = _replace_once(text, r"server 127\.0\.0\.1:4000\b", f"server 127.0.0.1:{relay.port}")
    # The password files: in the main block once each; the web-app block has none.
    text = _replace_once(text, r"/etc/nginx/ptth\.htpasswd", str(prefix / "ptth.htpasswd"), at_most=True)
    text = _replace_once(text, r"/etc/nginx/ptth-private\.htpasswd", str(prefix / "ptth-private.htpasswd"),
                         at_most=True)
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/{kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root, nginx's workers would run as nobody, who cannot read pytest's private temp folders.
    user = "user root;" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(f"""{user}
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
{temp_paths}
    access_log {prefix}/access.log;
{text}
}}
""")
    proc = Proc([NGINX, "-p", f"{prefix}/", "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log"],
                cluster._log("nginx"))
    cluster.procs.append(proc)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Nginx(proc, port, prefix)
        except OSError:
            if proc.popen.poll() is not None:
                break
            time.sleep(0.05)
    errors = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
    raise AssertionError(f"nginx did not start:\n{proc.output()[-2000:]}\n{errors[-2000:]}")


def without_upstream_keepalive(site: str) -> str:
    """The README's block as the README had it before: a new connection to the relay per request."""
    site = _replace_once(site, r"^\s*keepalive \d+;.*$", "")
    return _replace_once(site, r'^\s*proxy_set_header Connection \$connection_upgrade;.*$', "")
