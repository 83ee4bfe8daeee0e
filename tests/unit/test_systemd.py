"""The units `--systemd-unit` prints (ptth_lib/systemd.py): their settings, and systemd's own check of them.

`systemd-analyze verify` (when installed) reads each unit as systemd would,
checks that ExecStart's program exists, and complains about any setting it
ignores; a unit passes only if it says nothing at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptth_lib.systemd import (
    RELAY_LIMIT_NOFILE,
    client_unit,
    relay_unit,
    server_unit,
    unreadable_paths,
)

COMMAND = [sys.executable]  # a program that exists, for systemd-analyze verify


def settings(unit: str) -> dict[str, list[str]]:
    """Each setting of the unit to its values, in order (comments and section heads left out)."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


HARDENED = {"DynamicUser": ["yes"], "ProtectSystem": ["strict"], "NoNewPrivileges": ["yes"],
            "Restart": ["on-failure"]}


def test_relay_unit() -> None:
    unit = relay_unit(COMMAND, "/etc/ptth/ptth_relay.toml", ["--bind", "10.0.0.5:4000"])
    s = settings(unit)
    assert s["ExecStart"] == [f"{sys.executable} --config /etc/ptth/ptth_relay.toml --bind 10.0.0.5:4000"]
    assert s.items() >= HARDENED.items()
    assert s["LimitNOFILE"] == [str(RELAY_LIMIT_NOFILE)]
    assert s["StateDirectory"] == ["ptth-relay"] and s["WorkingDirectory"] == ["%S/ptth-relay"]
    assert s["EnvironmentFile"] == ["-/etc/ptth/ptth_relay.env"]
    assert s["WantedBy"] == ["multi-user.target"]
    assert unit.startswith("# /etc/systemd/system/ptth-relay.service")


def test_server_unit_reads_its_key_as_a_credential() -> None:
    """The config holds the key; the service's own user reads a copy that systemd hands it."""
    s = settings(server_unit(COMMAND, "/etc/ptth/ptth_server.toml", user=False, working_folder="/ignored"))
    assert s["ExecStart"] == [f"{sys.executable} --config ${{CREDENTIALS_DIRECTORY}}/ptth_server.toml"]
    assert s["LoadCredential"] == ["ptth_server.toml:/etc/ptth/ptth_server.toml"]
    assert s.items() >= HARDENED.items()
    assert s["StateDirectory"] == ["ptth-server"]
    assert "LimitNOFILE" in s


@pytest.mark.parametrize("unit", [
    client_unit(COMMAND, "/home/ann/.config/ptth/ptth_client.toml", "/home/ann"),
    server_unit(COMMAND, "/home/ann/ptth/ptth_server.toml", user=True, working_folder="/home/ann/ptth"),
], ids=["client", "server"])
def test_user_units_run_as_their_user_in_their_folder(unit: str) -> None:
    s = settings(unit)
    assert "DynamicUser" not in s and "LoadCredential" not in s
    assert s["ExecStart"][0].endswith("/ptth_client.toml") or s["ExecStart"][0].endswith("/ptth_server.toml")
    assert s["WorkingDirectory"][0].startswith("/home/ann")
    assert s["WantedBy"] == ["default.target"]
    assert s["NoNewPrivileges"] == ["yes"] and s["Restart"] == ["on-failure"] and "LimitNOFILE" in s
    assert unit.startswith("# ~/.config/systemd/user/ptth-")


def test_unreadable_paths_are_those_in_home_folders() -> None:
    assert unreadable_paths(["/root/.local/bin/ptth-relay", "/home/ann/x.toml", "/opt/ptth/bin/ptth-relay",
                             "/homework/x"]) == ["/root/.local/bin/ptth-relay", "/home/ann/x.toml"]


# ---- systemd's own reading -------------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def verify(unit: str, name: str, tmp_path: Path, user: bool = False) -> None:
    """`systemd-analyze verify` accepts the unit without a word."""
    folder = tmp_path / "units"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.service"
    path.write_text(unit)
    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    result = subprocess.run(["systemd-analyze", "verify", *(["--user"] if user else []), str(path)],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, ""), unit


@needs_systemd_analyze
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    verify(relay_unit(COMMAND, "/etc/ptth/ptth_relay.toml", ["--workers", "4"]), "ptth-relay", tmp_path)
    verify(server_unit(COMMAND, "/etc/ptth/ptth_server.toml", False, "/"), "ptth-server", tmp_path)
    verify(server_unit(COMMAND, str(tmp_path / "s.toml"), True, str(tmp_path)), "ptth-server", tmp_path, user=True)
    verify(client_unit(COMMAND, str(tmp_path / "c.toml"), str(tmp_path)), "ptth-client", tmp_path, user=True)


@needs_systemd_analyze
def test_odd_paths_reach_systemd_as_they_are(tmp_path: Path) -> None:
    """Spaces, quotes, backslashes, % (a specifier) and $ (a variable) in paths reach systemd as they are.

    (systemd refuses quotes and backslashes in the program's own path.)
    """
    folder = tmp_path / "a b %h $HOME"
    folder.mkdir()
    program = folder / "ptth-relay"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    config = str(folder / "'c' \"d\" \\e" / "ptth_relay.toml")
    verify(relay_unit([str(program)], config), "ptth-relay", tmp_path)
    verify(server_unit([str(program)], config, True, str(folder)), "ptth-server", tmp_path, user=True)
    verify(server_unit([str(program)], config, False, "/"), "ptth-server", tmp_path)
