"""A throwaway sshd on 127.0.0.1 for the port forwarding tests: a real interactive
TCP server, with a host key, one client key and no other way in.

`make debian-deps` installs openssh-server; without /usr/sbin/sshd the tests
that need it skip, saying so.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Cluster, Proc

SSHD = Path("/usr/sbin/sshd")


@dataclass
class Sshd:
    proc: Proc
    port: int
    key: Path  # the client's private key
    user: str

    def ssh(self, port: int, *remote: str) -> list[str]:
        """An ssh command line that logs in through `port` (a forward) and runs `remote`."""
        return ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", f"{self.user}@127.0.0.1", *remote]

    def scp(self, port: int, source: Path, target: str) -> list[str]:
        """An scp command line copying `source` to the remote path `target` through `port`."""
        return ["scp", "-F", "/dev/null", "-P", str(port), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", str(source), f"{self.user}@127.0.0.1:{target}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sshd(cluster: Cluster, tmp: Path) -> Sshd:
    """Start sshd in the foreground under `cluster` (which stops it); skip if it is not installed."""
    if not SSHD.is_file():
        pytest.skip(f"{SSHD} is missing: install openssh-server (make debian-deps does)")
    tmp.mkdir(parents=True, exist_ok=True)
    host_key, client_key = tmp / "ssh_host_ed25519_key", tmp / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ptth-test", "-f", str(key)],
                       check=True, timeout=30)
    authorized = tmp / "authorized_keys"
    authorized.write_bytes(client_key.with_suffix(".pub").read_bytes())
    config = tmp / "sshd_config"
    config.write_text(f"ListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n"
                      "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                      "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n"
                      "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation directory
    port = _free_port()
    proc = Proc([str(SSHD), "-D", "-e", "-f", str(config), "-p", str(port)], tmp / "sshd.log")
    cluster.procs.append(proc)
    proc.wait_for_output(rf"Server listening on 127\.0\.0\.1 port {port}\b")
    return Sshd(proc, port, client_key, getpass.getuser())
