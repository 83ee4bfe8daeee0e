"""The entry points as people run them: exit codes and what they print.

Every case runs the real program (`ptth_server.py`, `ptth_relay.py`, gunicorn)
as a subprocess and checks its exit code, that it never shows a traceback,
that an error is one short line, and that the API key never appears.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import REPO, Cluster, Proc, free_port, new_key, refusing_port, tripcode_of, wait_until

pytestmark = pytest.mark.process

# Generous bounds for one short-lived command; each is far above what the
# command needs, so hitting one means it hung.
RUN_TIMEOUT_SECS = 30.0
GUNICORN_FAIL_SECS = 15.0


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_SECS) -> Result:
    """Run a command in its own process group; kill the whole group if it overstays."""
    inherited = {k: v for k, v in os.environ.items() if k != "PTTH_API_KEY"}
    full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"{args} still running after {timeout} s:\n{out}\n{err}") from None
    return Result(proc.returncode, out, err)


def server(*args: str, env: dict[str, str] | None = None) -> Result:
    return run([sys.executable, "ptth_server.py", *args], env=env)


def relay_dev(*args: str, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_SECS) -> Result:
    return run([sys.executable, "ptth_relay.py", *args], env=env, timeout=timeout)


def assert_clean(text: str, key: str | None = None) -> None:
    assert "Traceback" not in text, text
    if key:
        assert key not in text, "the API key must never be printed"


def assert_one_line_error(result: Result, prog: str, code: int = 2, key: str | None = None) -> str:
    """Exit `code`, nothing on stdout, one `prog: ...` line on stderr; return it."""
    assert result.returncode == code, result
    assert_clean(result.output, key)
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line of error, got:\n{result.stderr}"
    assert lines[0].startswith(f"{prog}: "), lines[0]
    assert len(lines[0]) < 400, lines[0]
    return lines[0]




@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    (path / "hello.txt").write_text("hello\n")
    return path


def write_server_config(path: Path, root: Path, key: str | None, name: str = "alpha",
                        relay_url: str = "http://127.0.0.1:4000/", extra: str = "") -> Path:
    text = f'name = "{name}"\nrelay_url = "{relay_url}"\nfile_server_root = "{root}"\n'
    if key is not None:
        text += f'api_key = "{key}"\n'
    path.write_text(text + extra)
    path.chmod(0o600)
    return path


# ---- ptth_server.py: config and --print-tripcode ----------------------------


def test_print_tripcode(tmp_path: Path, root: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(tmp_path / "s.toml", root, key)
    result = server("--config", str(config), "--print-tripcode")
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    assert result.stderr == ""
    assert_clean(result.output, key)


def test_print_tripcode_warns_about_a_readable_config(tmp_path: Path, root: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(tmp_path / "s.toml", root, key)
    config.chmod(0o644)
    result = server("--config", str(config), "--print-tripcode")
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "chmod 600" in lines[0], result.stderr
    assert_clean(result.output, key)


def test_print_tripcode_with_key_from_env(tmp_path: Path, root: Path) -> None:
    key = new_key("env")
    config = write_server_config(tmp_path / "s.toml", root, None)
    before = config.read_text()
    result = server("--config", str(config), "--print-tripcode", env={"PTTH_API_KEY": key})
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    assert_clean(result.output, key)
    assert config.read_text() == before, "a key from the environment is not saved"


def test_weak_key_refused(tmp_path: Path, root: Path) -> None:
    config = write_server_config(tmp_path / "s.toml", root, "secretpassword")
    line = assert_one_line_error(server("--config", str(config), "--print-tripcode"), "ptth_server",
                                 key="secretpassword")
    assert "weak" in line and "20" in line and "api_key" in line


def test_weak_env_key_refused(tmp_path: Path, root: Path) -> None:
    config = write_server_config(tmp_path / "s.toml", root, None)
    result = server("--config", str(config), "--print-tripcode", env={"PTTH_API_KEY": "secretpassword"})
    line = assert_one_line_error(result, "ptth_server", key="secretpassword")
    assert "weak" in line and "PTTH_API_KEY" in line


def test_missing_config(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    line = assert_one_line_error(server("--config", str(path)), "ptth_server")
    assert str(path) in line


def test_default_config_missing(tmp_path: Path) -> None:
    # Run from the repository, which holds no ptth_server.toml.
    assert not (REPO / "ptth_server.toml").exists()
    line = assert_one_line_error(server(), "ptth_server")
    assert "ptth_server.toml" in line and "not found" in line


def test_config_is_a_directory(tmp_path: Path) -> None:
    line = assert_one_line_error(server("--config", str(tmp_path)), "ptth_server")
    assert str(tmp_path) in line


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "alpha\napi_key = "never-shown-0123456789-abcdef"\n')
    line = assert_one_line_error(server("--config", str(path)), "ptth_server",
                                 key="never-shown-0123456789-abcdef")
    assert str(path) in line and "TOML" in line


def test_unknown_key(tmp_path: Path, root: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(tmp_path / "s.toml", root, key, extra='relay_ulr = "http://x/"\n')
    line = assert_one_line_error(server("--config", str(config)), "ptth_server", key=key)
    assert "relay_ulr" in line


def test_missing_file_server_root(tmp_path: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(tmp_path / "s.toml", tmp_path / "no-such-dir", key)
    line = assert_one_line_error(server("--config", str(config), "--print-tripcode"), "ptth_server", key=key)
    assert "file_server_root" in line and "no-such-dir" in line


def test_file_server_root_is_a_file(tmp_path: Path) -> None:
    key = new_key("alpha")
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    config = write_server_config(tmp_path / "s.toml", not_dir, key)
    assert_one_line_error(server("--config", str(config)), "ptth_server", key=key)


def test_generated_key(tmp_path: Path, root: Path) -> None:
    config = write_server_config(tmp_path / "s.toml", root, None)
    config.chmod(0o644)
    first = server("--config", str(config), "--print-tripcode")
    assert first.returncode == 0, first
    assert_clean(first.output)
    text = config.read_text()
    key = re.search(r'^api_key = "([^"]+)"$', text, re.MULTILINE)
    assert key, text
    key_value = key.group(1)
    assert len(key_value) >= 20
    code = tripcode_of(key_value)
    assert first.stdout == code + "\n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert key_value not in first.output
    # The notice shows the relay's [[servers]] snippet with the tripcode.
    assert "[[servers]]" in first.stderr
    assert 'name = "alpha"' in first.stderr
    assert f'tripcode = "{code}"' in first.stderr
    assert str(config) in first.stderr

    second = server("--config", str(config), "--print-tripcode")
    assert second.returncode == 0, second
    assert second.stdout == code + "\n"
    assert second.stderr == "", "no notice and no warning the second time"
    assert config.read_text() == text, "no new key"


def test_config_with_key_inside_root_refused(root: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(root / "ptth_server.toml", root, key)
    line = assert_one_line_error(server("--config", str(config), "--print-tripcode"), "ptth_server", key=key)
    assert "file_server_root" in line


def test_config_with_key_inside_root_refused_relative(root: Path, tmp_path: Path) -> None:
    """Same, with the root given as a path that resolves to the config's folder."""
    key = new_key("alpha")
    config = write_server_config(root / "ptth_server.toml", tmp_path / "." / "root" / ".." / "root", key)
    assert_one_line_error(server("--config", str(config), "--print-tripcode"), "ptth_server", key=key)


def test_config_inside_root_allowed_when_key_is_in_env(root: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(root / "ptth_server.toml", root, None)
    result = server("--config", str(config), "--print-tripcode", env={"PTTH_API_KEY": key})
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    assert_clean(result.output, key)


def test_config_with_key_inside_root_refused_even_when_key_is_in_env(root: Path) -> None:
    """$PTTH_API_KEY replaces the file's key, but the file still gives its own away."""
    file_key, env_key = new_key("file"), new_key("env")
    config = write_server_config(root / "ptth_server.toml", root, file_key)
    result = server("--config", str(config), "--print-tripcode", env={"PTTH_API_KEY": env_key})
    line = assert_one_line_error(result, "ptth_server", key=file_key)
    assert env_key not in result.output
    assert "file_server_root" in line and "holds the API key" in line


GENERATED_COMMENT = "# Generated by ptth_server.py. Keep it secret: it proves this server's name.\n"


def test_generated_key_goes_above_the_first_table(tmp_path: Path, root: Path) -> None:
    """The example config (no key, a [forwarded_ports] table at the end) gets its key as a
    top-level key, the rest of the file byte for byte as it was, and starts again."""
    example = (REPO / "conf" / "server.example.toml").read_text()
    config = tmp_path / "ptth_server.toml"
    config.write_text(example)
    first = server("--config", str(config), "--file-server-root", str(root), "--print-tripcode")
    assert first.returncode == 0, first
    assert_clean(first.output)
    text = config.read_text()
    raw = tomllib.loads(text)
    key = raw["api_key"]
    assert first.stdout == tripcode_of(key) + "\n"
    assert raw["forwarded_ports"] == {"ssh": "127.0.0.1:22"}
    block = f'{GENERATED_COMMENT}api_key = "{key}"\n'
    assert block in text and text.replace(block, "") == example, "only the key's two lines are new"
    assert text.index(block) < text.index("[forwarded_ports]")
    assert text.index(block) > text.index("# api_key = "), "after the example's placeholder"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    second = server("--config", str(config), "--file-server-root", str(root), "--print-tripcode")
    assert second.returncode == 0, second
    assert second.stdout == first.stdout and second.stderr == ""
    assert config.read_text() == text


@pytest.mark.parametrize(("mistake", "words"), [
    ("missing root", "is not a folder"), ("root is a file", "is not a folder"),
    ("inside the root", "lies inside file_server_root"), ("unknown key", "unknown key 'colour'"),
    ("bad forwarded port", "'forwarded_ports'"), ("bad quic table", "[quic] needs relay_fingerprint"),
])
def test_refused_config_is_never_written(tmp_path: Path, root: Path, mistake: str, words: str) -> None:
    """A config without a key gets one only once all the rest is right: a refused one is left
    byte for byte (and mode) as it was, with no file beside it."""
    folder = root if mistake == "inside the root" else tmp_path / "conf"
    folder.mkdir(exist_ok=True)
    serve = {"missing root": tmp_path / "no-such-dir", "root is a file": root / "hello.txt"}.get(mistake, root)
    extra = {"unknown key": "colour = \"blue\"\n",
             "bad forwarded port": "[forwarded_ports]\nssh = \"no port\"\n",
             "bad quic table": "[quic]\nrelay = \"127.0.0.1:30380\"\n"}.get(mistake, "")
    config = write_server_config(folder / "ptth_server.toml", serve, None, extra=extra)
    config.chmod(0o644)
    before = config.read_bytes()
    files_before = sorted(folder.iterdir())
    line = assert_one_line_error(server("--config", str(config), "--print-tripcode"), "ptth_server")
    assert words in line
    assert config.read_bytes() == before
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    assert sorted(folder.iterdir()) == files_before


def test_flags_override_the_file(tmp_path: Path, root: Path) -> None:
    key = new_key("alpha")
    # The file's name and root are invalid; the flags replace them before validation.
    config = write_server_config(tmp_path / "s.toml", tmp_path / "no-such-dir", key, name="bad name")
    result = server("--config", str(config), "--name", "other", "--file-server-root", str(root),
                    "--print-tripcode")
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
    assert_clean(result.output, key)


def test_bad_relay_url_flag(tmp_path: Path, root: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(tmp_path / "s.toml", root, key)
    line = assert_one_line_error(server("--config", str(config), "--relay-url", "notaurl"), "ptth_server",
                                 key=key)
    assert "relay_url" in line


def test_bad_name_flag(tmp_path: Path, root: Path) -> None:
    key = new_key("alpha")
    config = write_server_config(tmp_path / "s.toml", root, key)
    line = assert_one_line_error(server("--config", str(config), "--name", "a/b"), "ptth_server", key=key)
    assert "name" in line


# ---- make demo ----------------------------------------------------------------


def test_demo_on_a_busy_port_names_the_make_variable() -> None:
    """`make demo PORT=4010` is the documented way to choose the port, so the hint says that."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run([sys.executable, "-m", "ptth_lib.tools.demo", "--port", str(port)])
    line = assert_one_line_error(result, "demo", code=1)
    assert f"port {port} is in use" in line
    assert "make demo PORT=" in line and "--port" not in line


def test_demo_serves_its_files_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """What `make demo` runs: the relay and a server up, a file by curl's URL, a clean stop."""
    port = free_port()
    proc = Proc([sys.executable, "-m", "ptth_lib.tools.demo", "--port", str(port)], tmp_path / "demo.log",
                cwd=REPO)
    try:
        files = proc.wait_for_output(r"Browse the files:\s+(\S+)", deadline=60).group(1)
        assert files == f"http://127.0.0.1:{port}/frontend/servers/demo/files/"
        listing = requests.get(files, timeout=10)
        assert listing.status_code == 200 and "random-10MiB.bin" in listing.text
        big = requests.get(files + "random-10MiB.bin", timeout=30)
        assert big.status_code == 200 and len(big.content) == 10 * 1024 * 1024
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(30) == 0
    finally:
        proc.kill()
    assert "stopping the demo" in proc.output() and "Traceback" not in proc.output()


# ---- ptth_server.py: running against a relay ---------------------------------


def test_unreachable_relay_warns_once_and_stops_on_sigterm(tmp_path: Path, root: Path) -> None:
    key = new_key("alpha")
    with refusing_port() as port:
        config = write_server_config(tmp_path / "s.toml", root, key, relay_url=f"http://127.0.0.1:{port}/")
        proc = Proc([sys.executable, "ptth_server.py", "--config", str(config)], tmp_path / "server.log")
        _warns_once_and_stops(proc, key)


def _warns_once_and_stops(proc: Proc, key: str) -> None:
    try:
        proc.wait_for_output(r"cannot reach the relay", deadline=3.0)
        time.sleep(3.0)  # several retries happen in this time (backoff starts at 0.5 s)
        assert proc.popen.poll() is None, f"server exited:\n{proc.output()}"
        output = proc.output()
        warnings = [line for line in output.splitlines() if "cannot reach the relay" in line]
        assert len(warnings) == 1, output
        assert "WARNING" in warnings[0]
        assert_clean(output, key)
        assert proc.stop(signal.SIGTERM, timeout=5) == 0
        assert_clean(proc.output(), key)
    finally:
        proc.kill()


def test_unreachable_relay_warning_names_the_cause(tmp_path: Path, root: Path) -> None:
    """The warning says why (connection refused), not urllib3's retry summary."""
    key = new_key("alpha")
    with refusing_port() as port:
        config = write_server_config(tmp_path / "s.toml", root, key, relay_url=f"http://127.0.0.1:{port}/")
        proc = Proc([sys.executable, "ptth_server.py", "--config", str(config)], tmp_path / "server.log")
        try:
            line = proc.wait_for_output(r".*cannot reach the relay.*", deadline=3.0).group(0)
        finally:
            proc.kill()
    assert "refused" in line.lower(), line
    assert "Max retries" not in line, line
    assert "HTTPConnectionPool" not in line, line


def test_connected_server_stops_on_sigterm(cluster: Cluster, root: Path) -> None:
    """A server parked in a long-poll still stops at once on SIGTERM, with exit 0."""
    key = new_key("alpha")
    relay = cluster.relay(servers={"alpha": key})
    srv = cluster.server(relay, "alpha", key, root)
    time.sleep(0.5)  # let the next listen park at the relay
    started = time.monotonic()
    assert srv.proc.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 5
    assert_clean(srv.proc.output(), key)
    assert_clean(relay.proc.output(), key)


def test_relay_refuses_the_key(cluster: Cluster, root: Path) -> None:
    relay = cluster.relay(servers={"alpha": new_key("the-real-alpha")})
    key = new_key("impostor")
    srv = cluster.server(relay, "alpha", key, root, wait=False)
    try:
        srv.proc.popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server kept running after a refusal:\n{srv.proc.output()}") from None
    output = srv.proc.output()
    assert srv.proc.popen.returncode == 1, output
    assert tripcode_of(key) in output
    assert "registered" in output
    assert_clean(output, key)
    assert_clean(relay.proc.output(), key)


def test_unregistered_server_is_listed_without_its_key(cluster: Cluster, root: Path) -> None:
    relay = cluster.relay(servers={"alpha": new_key("alpha")})
    key = new_key("stranger")
    srv = cluster.server(relay, "stranger", key, root, wait=False)
    try:
        srv.proc.popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"unknown server kept running:\n{srv.proc.output()}") from None
    assert srv.proc.popen.returncode == 1, srv.proc.output()
    page = requests.get(relay.url + "/frontend/unregistered_servers", timeout=5)
    assert page.status_code == 200
    assert "stranger" in page.text
    assert tripcode_of(key) in page.text
    assert key not in page.text
    assert_clean(srv.proc.output(), key)
    assert_clean(relay.proc.output(), key)


# ---- ptth_relay.py (development server) --------------------------------------


def test_relay_dev_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen_timeout_secs = \n")
    line = assert_one_line_error(relay_dev("--config", str(bad), "--bind", "127.0.0.1:0"), "ptth_relay")
    assert str(bad) in line


def test_relay_dev_missing_config(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    line = assert_one_line_error(relay_dev("--config", str(path), "--bind", "127.0.0.1:0"), "ptth_relay")
    assert str(path) in line


def test_relay_dev_bad_config_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[servers]]\nname = "a b"\ntripcode = "x"\n')
    line = assert_one_line_error(relay_dev("--config", str(bad), "--bind", "127.0.0.1:0"), "ptth_relay")
    assert str(bad) in line and "name" in line


@pytest.mark.parametrize("bind", ["nonsense", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":4000"])
def test_relay_dev_bad_bind(tmp_path: Path, bind: str) -> None:
    good = tmp_path / "good.toml"
    good.write_text("")
    line = assert_one_line_error(relay_dev("--config", str(good), "--bind", bind), "ptth_relay")
    assert "--bind" in line


def test_relay_dev_port_in_use(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = relay_dev("--config", str(good), "--bind", f"127.0.0.1:{port}")
    line = assert_one_line_error(result, "ptth_relay", code=1)
    assert "cannot listen" in line and str(port) in line


def test_relay_dev_serves_and_stops(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[[servers]]\nname = "alpha"\ntripcode = "{tripcode_of(new_key("alpha"))}"\n')
    proc = Proc([sys.executable, "ptth_relay.py", "--config", str(good), "--bind", "127.0.0.1:0"],
                tmp_path / "relay.log")
    try:
        m = proc.wait_for_output(r"listening on http://127\.0\.0\.1:(\d+)/")
        port = int(m.group(1))
        assert port != 0
        r = requests.get(f"http://127.0.0.1:{port}/frontend/relay_up_check", timeout=5)
        assert r.status_code == 200 and "Relay is up" in r.text
        assert proc.stop(signal.SIGTERM, timeout=10) == 0
        assert_clean(proc.output())
    finally:
        proc.kill()


# ---- gunicorn -------------------------------------------------------------


def _gunicorn_fails(args: list[str], config: Path) -> Result:
    result = run([sys.executable, "-m", "gunicorn", *args], env={"PTTH_RELAY_CONFIG": str(config)},
                 timeout=GUNICORN_FAIL_SECS)
    assert result.returncode != 0, result
    assert_clean(result.output)
    ours = [line for line in result.output.splitlines() if line.startswith("ptth_relay:")]
    assert len(ours) == 1, result.output
    assert str(config) in ours[0]
    return result


def test_gunicorn_with_conf_and_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen_timeout_secs = \n")
    _gunicorn_fails(["-c", "conf/gunicorn.conf.py", "--bind", "127.0.0.1:0", "ptth_relay:app"], bad)


def test_gunicorn_with_conf_and_missing_config(tmp_path: Path) -> None:
    _gunicorn_fails(["-c", "conf/gunicorn.conf.py", "--bind", "127.0.0.1:0", "ptth_relay:app"],
                    tmp_path / "missing.toml")


def test_gunicorn_plain_with_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen_timeout_secs = \n")
    _gunicorn_fails(["-k", "gevent", "--no-control-socket", "--bind", "127.0.0.1:0", "ptth_relay:app"], bad)


def test_gunicorn_plain_with_invalid_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("request_timeout_secs = 0\n")
    _gunicorn_fails(["-k", "gevent", "--no-control-socket", "--bind", "127.0.0.1:0", "ptth_relay:app"], bad)


@pytest.mark.parametrize(("args", "env", "workers"), [
    (["-w", "2"], {}, 2),  # what anyone who knows gunicorn types first
    (["-c", "conf/gunicorn.conf.py", "-w", "4"], {}, 4),  # the flag beats the file's workers = 1
    ([], {"WEB_CONCURRENCY": "3"}, 3),  # set by some hosting platforms
], ids=["flag", "conf-and-flag", "WEB_CONCURRENCY"])
def test_gunicorn_with_more_than_one_worker_stops_with_one_line(tmp_path: Path, args: list[str],
                                                                 env: dict[str, str], workers: int) -> None:
    """A second worker would see half of the relay's state: refused, never half-served."""
    good = tmp_path / "good.toml"
    good.write_text(f'[[servers]]\nname = "alpha"\ntripcode = "{tripcode_of(new_key("alpha"))}"\n')
    result = run([sys.executable, "-m", "gunicorn", "-k", "gevent", "--no-control-socket", "--bind",
                  "127.0.0.1:0", *args, "ptth_relay:app"], env={"PTTH_RELAY_CONFIG": str(good), **env},
                 timeout=GUNICORN_FAIL_SECS)
    assert result.returncode == 3, result
    assert_clean(result.output)
    ours = [line for line in result.output.splitlines() if line.startswith("ptth_relay:")]
    assert len(ours) == 1, result.output
    assert f"asked for {workers} workers" in ours[0] and "run exactly one" in ours[0]
    assert "set redis_url" in ours[0] and "PTTH_REDIS_URL" in ours[0]  # the way to run many


def test_gunicorn_plain_with_good_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[[servers]]\nname = "alpha"\ntripcode = "{tripcode_of(new_key("alpha"))}"\n')
    proc = Proc([sys.executable, "-m", "gunicorn", "-k", "gevent", "--no-control-socket",
                 "--bind", "127.0.0.1:0", "ptth_relay:app"],
                tmp_path / "gunicorn.log", env={"PTTH_RELAY_CONFIG": str(good)})
    try:
        port = int(proc.wait_for_output(r"Listening at: http://127\.0\.0\.1:(\d+)").group(1))
        url = f"http://127.0.0.1:{port}/frontend/relay_up_check"

        def up() -> bool:
            try:
                r = requests.get(url, timeout=2)
            except requests.RequestException:
                return False
            return r.status_code == 200 and "Relay is up" in r.text

        wait_until(up, "relay up under plain gunicorn", proc)
        assert proc.stop(signal.SIGTERM, timeout=20) == 0
        assert_clean(proc.output())
    finally:
        proc.kill()


def test_gunicorn_conf_relay_serves(cluster: Cluster) -> None:
    relay = cluster.relay(servers={"alpha": new_key("alpha")})
    r = requests.get(relay.url + "/frontend/relay_up_check", timeout=5)
    assert r.status_code == 200 and "Relay is up" in r.text
    assert relay.proc.stop(signal.SIGTERM, timeout=60) == 0
    assert_clean(relay.proc.output())


def test_server_with_nothing_to_serve_refuses_to_start(tmp_path: Path) -> None:
    """No file_server_root (it has no default now) and no web_app_url: one line naming both."""
    key = new_key("alpha")
    config = tmp_path / "ptth_server.toml"
    config.write_text(f'name = "alpha"\nrelay_url = "http://127.0.0.1:4000/"\napi_key = "{key}"\n')
    config.chmod(0o600)
    line = assert_one_line_error(server("--config", str(config)), "ptth_server", key=key)
    assert "file_server_root" in line and "web_app_url" in line


def test_web_app_url_flag_is_checked(tmp_path: Path) -> None:
    key = new_key("alpha")
    config = tmp_path / "ptth_server.toml"
    config.write_text(f'name = "alpha"\nrelay_url = "http://127.0.0.1:4000/"\napi_key = "{key}"\n')
    config.chmod(0o600)
    line = assert_one_line_error(server("--config", str(config), "--web-app-url", "localhost:8080"), "ptth_server",
                                 key=key)
    assert "'web_app_url' must be an http:// or https:// URL" in line
    result = server("--config", str(config), "--web-app-url", "http://127.0.0.1:8080", "--print-tripcode")
    assert result.returncode == 0, result
    assert result.stdout == tripcode_of(key) + "\n"
