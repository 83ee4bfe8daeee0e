"""The wheel, installed as users install it, runs the whole tunnel from any folder.

CI builds the wheel from the checkout's files (a copy, so that the build writes
nothing into the checkout), installs it into a new venv without extras, and
runs the README's flow with the installed commands only, from a folder outside
the checkout with no PYTHONPATH: the example configs they print, a relay,
a server (whose first run writes its key), a file downloaded and checked by
hash, a TCP echo forwarded by ptth-client, ptth-healthcheck passing and then
failing once the server stops, and `gunicorn -k gevent ptth_relay:app` too.

A venv of its own also catches what `make test`'s venv hides: it holds the
test and lint tools and what they bring in, so a runtime dependency that only
they install goes unnoticed there. (gunicorn's gevent worker imports
`packaging`, which gunicorn asks for only in its `[gevent]` extra: the relay's
worker once died at start on a fresh machine while every other test passed.)

To stay cheap the wheel is built without build isolation, with the setuptools
requirements-dev.txt pins, and installed with the test run's own pip (pointed
at the new venv with `--python`) from `.venv/wheelhouse` alone (`--no-index`),
constrained to requirements.txt's pins: `make test` builds that folder, the
wheels of requirements.txt, from pip's cache, so no test reaches the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests
from conftest import REPO, Proc, wait_until
from procs import http_status
from tcp_peers import EchoServer, recv_all

# The wheels of requirements.txt, which `make test` builds: the install reads nothing else.
WHEELHOUSE = REPO / ".venv" / "wheelhouse"
INSTALL_TIMEOUT_SECS = 120.0
RUN_TIMEOUT_SECS = 30.0
# The names the example configs use, which the flow below keeps.
SERVER_NAME = "aliens_wildland"
PORT_NAME = "ssh"


def _copy_source(dest: Path) -> None:
    """The checkout's files as git sees them (tracked, or new and not ignored); else all but the usual junk."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=False)
    if listed.returncode != 0:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "demo", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
        return
    for name in listed.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` but bytecode caches, with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _is_online(url: str, name: str) -> bool:
    listing = requests.get(f"{url}/frontend/servers/", headers={"Accept": "application/json"}, timeout=5).json()
    return bool(next(s for s in listing if s["name"] == name)["online"])


@pytest.mark.process
@pytest.mark.timeout(INSTALL_TIMEOUT_SECS + 120)
def test_the_wheel_runs_the_tunnel_with_its_commands(tmp_path: Path) -> None:
    if not (WHEELHOUSE / ".stamp").exists():
        pytest.skip(f"no {WHEELHOUSE}: `make test` builds it (the wheels of requirements.txt, so that no test "
                    "reaches the network)")
    source, dist = tmp_path / "source", tmp_path / "dist"
    source.mkdir()
    _copy_source(source)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--wheel-dir", str(dist), str(source)],
        check=False, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("ptth-*.whl")
    version = wheel.name.split("-")[1]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
         "--no-compile", "--no-index", "--find-links", str(WHEELHOUSE), "-c", str(REPO / "requirements.txt"),
         str(wheel)],
        check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECS)
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp_path / "work"  # the user's folder: not the checkout, nothing of ours on the path
    work.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    for module in ("pytest", "qh3", "redis"):  # neither the test run's packages nor the extras
        seen = subprocess.run([str(python), "-c", f"import {module}"], check=False, capture_output=True, cwd=work,
                              env=env)
        assert seen.returncode != 0, f"the new venv has {module}"
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    before = _snapshot(site_packages)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / args[0]), *args[1:]], check=False, capture_output=True, text=True,
                              cwd=work, env=env, timeout=RUN_TIMEOUT_SECS)

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for command in scripts:
        result = run(command, "--version")
        assert (result.returncode, result.stdout) == (0, f"{command} {version}\n"), result
    for command, example in [("ptth-relay", "relay"), ("ptth-server", "server"), ("ptth-client", "client")]:
        result = subprocess.run([str(bin_dir / command), "--example-config"], check=False, capture_output=True,
                                cwd=work, env=env, timeout=RUN_TIMEOUT_SECS)
        assert result.returncode == 0 and result.stdout == (REPO / "conf" / f"{example}.example.toml").read_bytes()
        (work / f"ptth_{example}.toml").write_bytes(result.stdout)

    # The printed examples, as README's first steps use them: the server's folder and port to serve,
    echo = EchoServer()
    data = work / "data"  # the example's file_server_root, ./data
    data.mkdir()
    payload = os.urandom(1024 * 1024 + 7)
    (data / "big.bin").write_bytes(payload)
    server_config = work / "ptth_server.toml"
    server_config.write_text(server_config.read_text().replace('"127.0.0.1:22"', f'"127.0.0.1:{echo.port}"'))
    # its key, written on the first run,
    first = run("ptth-server", "--print-tripcode")
    assert first.returncode == 0 and "[[servers]]" in first.stderr, first
    server_code = first.stdout.strip()
    # the client's key and config, and the relay's with both tripcodes (its laptop may reach our ssh).
    assert run("ptth-client", "--new-key", "ptth_client.key").returncode == 0
    client_config = work / "ptth_client.toml"
    client_config.write_text(client_config.read_text().replace(f'"2200:{SERVER_NAME}:', f'"0:{SERVER_NAME}:'))
    client_code = run("ptth-client", "--config", "ptth_client.toml", "--print-tripcode").stdout.strip()
    relay_config = work / "ptth_relay.toml"
    relay_text = relay_config.read_text()
    for name, code in [(SERVER_NAME, server_code), ("laptop", client_code)]:
        relay_text = re.sub(rf'(name = "{name}"\n(?:#.*\n)*tripcode = )"[^"]*"', rf'\1"{code}"', relay_text)
    assert relay_text.count(server_code) == relay_text.count(client_code) == 1
    relay_config.write_text(relay_text)

    procs: list[Proc] = []
    try:
        relay = Proc([str(bin_dir / "ptth-relay"), "--bind", "127.0.0.1:0"], tmp_path / "relay.log", env=env,
                     cwd=work, inherit_env=False)
        procs.append(relay)
        url = "http://127.0.0.1:" + relay.wait_for_output(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1)
        wait_until(lambda: http_status(f"{url}/frontend/relay_up_check") == 200, "relay up", relay)
        # Its start line gives the capacity gunicorn's pool was sized for, and nothing says an error.
        relay.wait_for_output(r"holds \d+ connections")
        assert "Error" not in relay.output(), relay.output()
        server = Proc([str(bin_dir / "ptth-server"), "--relay-url", url], tmp_path / "server.log", env=env,
                      cwd=work, inherit_env=False)
        procs.append(server)
        wait_until(lambda: http_status(f"{url}/frontend/servers/{SERVER_NAME}/") == 200, "server online", server)

        got = requests.get(f"{url}/frontend/servers/{SERVER_NAME}/files/big.bin", timeout=30)
        assert got.status_code == 200
        assert hashlib.sha256(got.content).hexdigest() == hashlib.sha256(payload).hexdigest()

        client = Proc([str(bin_dir / "ptth-client"), "--config", "ptth_client.toml", "--relay-url", url],
                      tmp_path / "client.log", env=env, cwd=work, inherit_env=False)
        procs.append(client)
        port = int(client.wait_for_output(rf"forwarding 127\.0\.0\.1:(\d+) to {SERVER_NAME}:{PORT_NAME}\b").group(1))
        message = os.urandom(64 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=RUN_TIMEOUT_SECS) as sock:
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == message

        healthy = run("ptth-healthcheck", "--relay", url, "--server", SERVER_NAME)
        assert (healthy.returncode, healthy.stdout) == (0, "ok: relay up, 1 server online\n"), healthy
        assert server.stop(signal.SIGTERM) == 0
        wait_until(lambda: not _is_online(url, SERVER_NAME), "the relay to see the server offline", relay)
        sick = run("ptth-healthcheck", "--relay", url, "--server", SERVER_NAME)
        assert sick.returncode == 1 and f"server '{SERVER_NAME}' is offline" in sick.stderr, sick

        # `gunicorn -k gevent ptth_relay:app` from the user's folder: the wheel ships ptth_relay.
        plain = Proc([str(bin_dir / "gunicorn"), "-k", "gevent", "--bind", "127.0.0.1:0", "ptth_relay:app"],
                     tmp_path / "gunicorn.log", env={**env, "PTTH_RELAY_CONFIG": str(relay_config)}, cwd=work,
                     inherit_env=False)
        procs.append(plain)
        plain_url = "http://127.0.0.1:" + plain.wait_for_output(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1)
        wait_until(lambda: http_status(f"{plain_url}/frontend/relay_up_check") == 200, "plain gunicorn up", plain)
        for proc in procs:
            proc.stop(signal.SIGTERM)
            assert "Traceback" not in proc.output(), proc.output()
    finally:
        for proc in procs:
            proc.kill()
        echo.close()
    assert _snapshot(site_packages) == before, "a command wrote into the installed packages"


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


# What a set-up command may run: PTTH's installed commands (on the PATH through /usr/local/bin), or
# the install itself and the system's own tools. Never a program from a copy of the repository.
_SET_UP_COMMAND = re.compile(
    r"^(sudo )?(ptth-[a-z-]+ |sudoedit |mkdir -p |curl |systemctl --user |"
    r"python3 -m venv /opt/ptth|/opt/ptth/bin/pip install -c requirements\.txt |ln -sf /opt/ptth/bin/ptth-\* |"
    r"mkdir -p /etc/ptth|systemctl )")


def _commands(markdown: str) -> list[str]:
    """Each command of the sh blocks, pipelines and && lists split, comments dropped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.DOTALL):
        for line in block.splitlines():
            commands += [c.strip() for c in re.split(r"&&|\|", line.split("#")[0]) if c.strip()]
    return commands


def test_readme_starts_with_the_install_and_the_servers_example_config() -> None:
    readme = (REPO / "README.md").read_text()
    first = re.match(r"# PTTH\n\n```sh\n(.*?)```", readme, re.DOTALL)
    assert first, "the README opens with the commands"
    assert _commands(first.group(0))[:4] == [
        "pipx install .", "ptth-server --example-config > ptth_server.toml", "ptth-server --print-tripcode",
        "ptth-server"]


def test_readme_set_up_runs_the_installed_commands() -> None:
    """README's set-up (steps 1-3 and systemd) as a first-time user follows it on a fresh machine:
    PTTH installed into /opt/ptth, every program one of its commands, every unit printed by one."""
    from ptth_lib.systemd import relay_unit

    readme = (REPO / "README.md").read_text()
    set_up = _section(readme, "## Setting up for real", "### Behind nginx")
    systemd = _section(readme, "### systemd", "\n## ")
    commands = _commands(set_up + systemd)
    assert commands
    for command in commands:
        assert _SET_UP_COMMAND.match(command) or command.startswith("sudo tee "), command
    for unit in ("ptth-relay", "ptth-server"):
        printing = [c for c in commands if c.startswith(f"{unit} --systemd-unit --config /etc/ptth/")]
        assert printing, f"{unit}'s unit is not printed by {unit} --systemd-unit"
        assert f"| sudo tee /etc/systemd/system/{unit}.service" in set_up
        assert f"sudo systemctl enable --now {unit}" in set_up
    assert "ptth-client --systemd-unit --user --config " in systemd
    (shown,) = re.findall(r"```ini\n(.*?)```", systemd, re.DOTALL)
    assert shown == relay_unit(["/usr/local/bin/ptth-relay"], "/etc/ptth/ptth_relay.toml"), (
        "README's relay unit is not what ptth-relay --systemd-unit prints")
