"""The install that README documents: from requirements.txt alone, with a venv on each machine.

`make test` runs everything from one venv built from requirements-dev.txt,
whose test and lint tools bring packages of their own. A runtime dependency
that only they bring in goes unnoticed there and breaks the documented
install: gunicorn's gevent worker imports `packaging` but gunicorn asks for it
only in its `[gevent]` extra, so the relay's worker died at start with
ModuleNotFoundError on a fresh relay machine while every other test passed.

So this test builds a venv from requirements.txt and nothing else, then runs
the relay under gunicorn with the gevent worker from it (as README and the
systemd unit do) and a ptth_server from it (which generates its key), and
fetches a file through them. To stay cheap it uses pip's cache (no network
but the package index pip is configured with, and none at all when the cache
is warm) and the test run's own pip, pointed at the new venv with
`--python`, instead of installing a second pip into it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests
from conftest import REPO, Proc, Relay, tripcode_of, wait_for_online, wait_until

# What the programs from the new venv see of our environment: no PYTHONPATH, no venv of ours.
CLEAN_ENV = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}

# A cold pip cache downloads some 60 MB of wheels; a warm one installs in ~10 s.
INSTALL_TIMEOUT_SECS = 500.0


@pytest.mark.process
@pytest.mark.timeout(INSTALL_TIMEOUT_SECS + 60)
def test_requirements_txt_alone_runs_the_relay_and_the_server(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--disable-pip-version-check", "--no-compile", "-r", str(REPO / "requirements.txt")],
        check=False, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECS)
    assert install.returncode == 0, install.stdout + install.stderr
    # Nothing of the test run's own venv may be visible from the new one.
    seen = subprocess.run([str(python), "-c", "import pytest"], check=False, capture_output=True,
                          cwd=tmp_path)
    assert seen.returncode != 0, "the new venv sees the test run's packages"

    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_text("hello from a fresh venv\n")
    # README's step 1: the server's first run writes its key and prints the tripcode.
    server_config = tmp_path / "ptth_server.toml"
    server_config.write_text(f'name = "fresh"\nrelay_url = "http://127.0.0.1:1"\nfile_server_root = "{root}"\n')
    first = subprocess.run([str(python), "ptth_server.py", "--config", str(server_config), "--print-tripcode"],
                           check=False, capture_output=True, text=True, cwd=REPO, timeout=60,
                           env=CLEAN_ENV)
    assert first.returncode == 0, first.stdout + first.stderr
    code = first.stdout.strip()
    assert tripcode_of(tomllib.loads(server_config.read_text())["api_key"]) == code

    # Step 2: the relay, under gunicorn with the gevent worker, from the venv's own gunicorn.
    relay_config = tmp_path / "ptth_relay.toml"
    relay_config.write_text(f'[[servers]]\nname = "fresh"\ntripcode = "{code}"\n')
    relay_proc = Proc([str(venv / "bin" / "gunicorn"), "-c", "conf/gunicorn.conf.py", "--bind", "127.0.0.1:0",
                       "ptth_relay:app"], tmp_path / "relay.log", env={"PTTH_RELAY_CONFIG": str(relay_config)},
                      inherit_env=False)
    server = None
    try:
        port = int(relay_proc.wait_for_output(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
        relay = Relay(relay_proc, port, relay_config)
        wait_until(lambda: _is_up(relay.url), "relay up check", relay_proc)
        assert "Traceback" not in relay_proc.output()

        # Step 3: the server, pointed at that relay; a file through the tunnel.
        text = server_config.read_text().replace('"http://127.0.0.1:1"', f'"{relay.url}"')
        server_config.write_text(text)
        server = Proc([str(python), "ptth_server.py", "--config", str(server_config)], tmp_path / "server.log",
                      inherit_env=False)
        wait_for_online(relay, "fresh", server)
        got = requests.get(f"{relay.url}/frontend/servers/fresh/files/hello.txt", timeout=10)
        assert (got.status_code, got.text) == (200, "hello from a fresh venv\n")
    finally:
        if server is not None:
            server.kill()
        relay_proc.kill()


def _is_up(url: str) -> bool:
    try:
        r = requests.get(f"{url}/frontend/relay_up_check", timeout=2)
    except requests.RequestException:
        return False
    return (r.status_code, r.text.strip()) == (200, "Relay is up")


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


# The programs a set-up command may start: anything of ours runs from the copy's venv.
_FROM_THE_VENV = re.compile(r"^(\.venv|/opt/ptth/\.venv)/bin/(python|gunicorn|pip)\b")
_OUTSIDE_THE_VENV = ("python3 -m venv .venv", "cp ", "mkdir ", "curl ", "sudo mkdir ", "sudo mv ",
                     "sudo systemctl ")


def test_readme_set_up_runs_from_a_venv_on_each_machine() -> None:
    """README's set-up (steps 1-3 and the systemd units) as a first-time user follows it on fresh
    machines: each machine makes its venv, and every program runs from it (a bare `gunicorn` or
    `python` is whatever the machine has, if anything)."""
    readme = (REPO / "README.md").read_text()
    set_up = _section(readme, "## Setting up for real", "### Behind nginx")
    systemd = _section(readme, "### systemd", "\n## ")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", set_up + systemd, re.DOTALL):
        for line in block.splitlines():
            commands += [c.strip() for c in line.split("#")[0].split("&&") if c.strip()]
    assert commands
    for command in commands:
        assert _FROM_THE_VENV.match(command) or command.startswith(_OUTSIDE_THE_VENV), command
    for step in ("### 1. The server", "### 2. The relay"):
        assert "python3 -m venv .venv" in _section(set_up, step, "\n### "), f"{step} makes no venv"
    units = re.findall(r"```ini\n(.*?)```", systemd, re.DOTALL)[0]
    for exec_start in re.findall(r"^ExecStart=(\S+)", units, re.MULTILINE):
        assert exec_start.startswith("/opt/ptth/.venv/bin/"), exec_start
    assert units.count("[Service]") == units.count("[Install]") == 3, "systemctl enable needs [Install]"
