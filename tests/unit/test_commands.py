"""What every command answers besides its work (ptth_lib/commands.py), and ptth-relay's refusals.

The entry points' main functions are called in this process, as the
installed commands call them; nothing here starts a server.
tests/e2e/test_install.py runs the installed commands themselves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ptth_client
import ptth_client_gui
import ptth_file_server
import ptth_quic_relay
import ptth_relay
import ptth_server
from ptth_lib import __version__
from ptth_lib.tools import healthcheck

REPO = Path(__file__).resolve().parents[2]

MAINS: dict[str, Callable[[list[str]], int]] = {
    "ptth-relay": ptth_relay.serve, "ptth-server": ptth_server.main, "ptth-client": ptth_client.main,
    "ptth-file-server": ptth_file_server.main, "ptth-quic-relay": ptth_quic_relay.main,
    "ptth-healthcheck": healthcheck.main, "ptth-client-gui": ptth_client_gui.main,
}


@pytest.fixture(autouse=True)
def _environment_kept() -> Iterator[None]:
    """ptth-relay exports its --config to gunicorn's hooks and workers: none of that outlives a test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def call(main: Callable[[list[str]], int], *args: str) -> int:
    """main(args), with SystemExit (argparse's --version, a refusal) turned into its code."""
    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


@pytest.fixture
def as_command(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Run the next main as the installed command at /opt/ptth/bin/NAME, or as a script (NAME.py)."""
    def set_argv0(path: str) -> None:
        monkeypatch.setattr(sys, "argv", [path])
    return set_argv0


@pytest.mark.parametrize("command", sorted(MAINS))
def test_every_command_answers_its_version(command: str, as_command: Callable[[str], None],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    as_command(f"/opt/ptth/bin/{command}")
    assert call(MAINS[command], "--version") == 0
    assert capsys.readouterr().out == f"{command} {__version__}\n"


@pytest.mark.parametrize(("command", "example"), [("ptth-relay", "relay"), ("ptth-server", "server"),
                                                  ("ptth-client", "client")])
def test_example_config_prints_the_file_in_conf(command: str, example: str, as_command: Callable[[str], None],
                                                capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    as_command(f"/opt/ptth/bin/{command}")
    assert call(MAINS[command], "--example-config") == 0
    assert capsysbinary.readouterr().out == (REPO / "conf" / f"{example}.example.toml").read_bytes()


# ---- ptth-relay's refusals, before gunicorn starts --------------------------------------------


def refusal(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """ptth-relay `args` exits 2 with one line on stderr and nothing on stdout; the line."""
    assert call(ptth_relay.serve, *args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("ptth_relay: "), err
    return err


def test_relay_refuses_a_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "config file not found" in refusal(capsys, "--config", str(tmp_path / "missing.toml"))


def test_relay_refuses_a_broken_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.toml").write_text("listen_timeout_secs = \n")
    assert "not valid TOML" in refusal(capsys, "--config", str(tmp_path / "bad.toml"))


@pytest.mark.parametrize(("args", "words"), [
    (["--workers", "2"], "--workers asked for 2 workers, but without redis_url"),
    (["--workers", "0"], "--workers 0: expected 1 or more"),
    (["--bind", "localhost"], "--bind 'localhost': expected HOST:PORT"),
])
def test_relay_refuses_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                 words: str) -> None:
    (tmp_path / "ptth_relay.toml").write_text("")
    assert words in refusal(capsys, "--config", str(tmp_path / "ptth_relay.toml"), *args)


# ---- --systemd-unit ---------------------------------------------------------------------------


def unit_of(main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    assert call(main, "--systemd-unit", *args) == 0
    out, err = capsys.readouterr()
    return out, err


def test_relay_unit_runs_the_installed_command(as_command: Callable[[str], None],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    as_command("/opt/ptth/bin/ptth-relay")
    unit, warnings = unit_of(ptth_relay.serve, capsys, "--config", "/etc/ptth/ptth_relay.toml",
                             "--bind", "10.0.0.5:4000", "--workers", "4")
    assert "\nExecStart=/opt/ptth/bin/ptth-relay --config /etc/ptth/ptth_relay.toml --bind 10.0.0.5:4000 " \
           "--workers 4\n" in unit
    assert warnings == ""


def test_server_unit_from_a_checkout_runs_the_script(as_command: Callable[[str], None], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    as_command("/home/ann/ptth/ptth_server.py")
    unit, warnings = unit_of(ptth_server.main, capsys, "--config", "/etc/ptth/ptth_server.toml")
    assert f"\nExecStart={sys.executable} /home/ann/ptth/ptth_server.py --config " \
           "${CREDENTIALS_DIRECTORY}/ptth_server.toml\n" in unit
    assert "\nLoadCredential=ptth_server.toml:/etc/ptth/ptth_server.toml\n" in unit
    assert "cannot read /home/ann/ptth/ptth_server.py, in a home folder" in warnings


def test_user_units_run_in_this_folder(as_command: Callable[[str], None], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    as_command("/home/ann/.local/bin/ptth-client")
    unit, warnings = unit_of(ptth_client.main, capsys, "--user", "--config", "ptth_client.toml")
    assert f"\nExecStart=/home/ann/.local/bin/ptth-client --config {tmp_path}/ptth_client.toml\n" in unit
    assert f"\nWorkingDirectory={tmp_path}\n" in unit and "WantedBy=default.target" in unit
    assert warnings == "", "a user unit runs as its user, who can read their home"
    as_command("/home/ann/.local/bin/ptth-server")
    unit, _ = unit_of(ptth_server.main, capsys, "--user")
    assert f"\nExecStart=/home/ann/.local/bin/ptth-server --config {tmp_path}/ptth_server.toml\n" in unit


def test_the_client_runs_only_as_a_user_unit(capsys: pytest.CaptureFixture[str]) -> None:
    assert call(ptth_client.main, "--systemd-unit", "--config", "c.toml") == 2
    _, err = capsys.readouterr()
    assert err.startswith("ptth_client: --systemd-unit needs --user") and len(err.splitlines()) == 1


def test_the_client_s_unit_runs_the_desktop_app_s_config_by_default(
        as_command: Callable[[str], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    as_command("/home/ann/.local/bin/ptth-client")
    unit, _ = unit_of(ptth_client.main, capsys, "--user")
    assert f"\nExecStart=/home/ann/.local/bin/ptth-client --config {tmp_path}/config/ptth/ptth_client.toml\n" in unit


# ---- ptth-relay's gunicorn --------------------------------------------------------------------


def test_ptth_relay_runs_gunicorn_with_the_settings_of_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setting conf/gunicorn.conf.py gives gunicorn, ptth-relay gives it too; then
    $GUNICORN_CMD_ARGS (gunicorn's own way to add one), then ptth-relay's flags."""
    import runpy

    from gunicorn.config import Config

    from ptth_lib.relay.gunicorn_app import _RelayApplication

    conf = {k: v for k, v in runpy.run_path(str(REPO / "conf" / "gunicorn.conf.py")).items()
            if k in Config().settings}
    assert {"worker_class", "worker_connections", "graceful_timeout", "on_starting", "pre_request"} <= conf.keys()
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    flags = {"bind": ["127.0.0.1:0"], "workers": 1, "loglevel": "debug"}
    cfg = _RelayApplication(flags).cfg
    for name, value in conf.items():
        got = cfg.settings[name].value
        if name in flags:
            assert got == flags[name]
            continue
        as_set = Config()
        as_set.set(name, value)  # as gunicorn keeps it ("" becomes [] for forwarded_allow_ips)
        want = as_set.settings[name].value
        assert got == want or (callable(want) and got.__qualname__ == want.__qualname__), name
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests 1000 --worker-connections 99 -w 3")
    cfg = _RelayApplication({"bind": ["127.0.0.1:0"], "workers": 1, "loglevel": "info"}).cfg
    assert (cfg.max_requests, cfg.worker_connections, cfg.workers) == (1000, 99, 1)
