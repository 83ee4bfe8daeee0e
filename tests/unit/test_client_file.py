"""Tests for config.client_file: the desktop app's view of ptth_client.toml.

Edits keep what the user wrote (comments, layout, unknown keys), checks
answer per field, the key file is made once, and what is saved is what
`ptth_client.py --config FILE` reads (load_client_config, with
$PTTH_CLIENT_API_KEY unset so that the key comes from the file).
"""

from __future__ import annotations

import re
import stat
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptth_lib.config import (
    CLIENT_ENTRY_KEYS,
    ClientConfig,
    Forward,
    QuicRelayTarget,
    load_client_config,
)
from ptth_lib.config.client_file import (
    ClientFile,
    RelaySettings,
    clients_snippet,
    default_config_path,
)
from ptth_lib.config.keys import apply_keys
from ptth_lib.errors import ConfigError
from ptth_lib.wire import tripcode

EXAMPLE = Path(__file__).parents[2] / "conf" / "client.example.toml"
FINGERPRINT = "3f" * 32
QUIC = RelaySettings(quic_relay="relay.example.com:30380", relay_fingerprint=FINGERPRINT, name="laptop")

COMMENTED = """\
# ptth_client settings, edited by hand and by the app.

# The relay.
relay_url = "http://127.0.0.1:4000"  # the test relay

# Where the key is.
api_key_file = "KEYFILE"

bind = "127.0.0.1"  # loopback only

forward = [
    # ssh first
    "2200:box:ssh",  # the box's ssh
    "2201:box:web",
    # spare ports below
]
# the end
"""


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PTTH_CLIENT_API_KEY", raising=False)


def comments(text: str) -> list[str]:
    return re.findall(r"#.*", text)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_edits_keep_every_comment_and_the_cli_accepts_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text(COMMENTED.replace("KEYFILE", str(tmp_path / "client.key")))
    cf = ClientFile.load(path)
    key, created = cf.ensure_key()  # api_key_file is set, the file is not there yet
    assert created and (tmp_path / "client.key").read_text() == key + "\n"

    cf.add_forward(Forward(2202, "box", "db"))
    cf.replace_forward(2200, Forward(2300, "box", "ssh"))
    cf.remove_forward(2201)
    assert cf.set_relay(RelaySettings(relay_url="https://relay.example.com")) == {}
    cf.save()

    text = path.read_text()
    assert text == COMMENTED.replace("KEYFILE", str(tmp_path / "client.key")).replace(
        "http://127.0.0.1:4000", "https://relay.example.com").replace(
        '"2200:box:ssh"', '"2300:box:ssh"').replace('    "2201:box:web",\n', "").replace(
        "    # spare ports below\n", '    # spare ports below\n    "2202:box:db"\n')  # tomlkit: no comma after a comment
    assert comments(text) == comments(COMMENTED)
    assert load_client_config(path, {}) == ClientConfig(
        key, "127.0.0.1", (Forward(2300, "box", "ssh"), Forward(2202, "box", "db")),
        relay_url="https://relay.example.com")
    assert ClientFile.load(path).forwards() == [Forward(2300, "box", "ssh"), Forward(2202, "box", "db")]


def test_switching_to_quic_and_back_keeps_the_examples_comments(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example's api_key_file is relative: to the current folder, as for the CLI
    path = tmp_path / "ptth_client.toml"
    path.write_text(EXAMPLE.read_text())
    cf = ClientFile.load(path)
    key, created = cf.ensure_key()
    assert created and cf.api_key_file == "ptth_client.key" and (tmp_path / "ptth_client.key").exists()

    assert cf.set_relay(QUIC) == {}
    cf.save()
    text = path.read_text()
    # Each new key goes under the commented-out example of it; relay_url is gone.
    assert '# quic_relay = "relay.example.com:30380"\nquic_relay = "relay.example.com:30380"\n' in text
    assert f'# relay_fingerprint = "paste the 64 hex digits here"\nrelay_fingerprint = "{FINGERPRINT}"\n' in text
    assert '# name = "laptop"\nname = "laptop"\n' in text
    assert comments(text) == comments(EXAMPLE.read_text())
    config = cf.to_config()
    assert (config.relay_url, config.quic, config.name, config.api_key) == (
        None, QuicRelayTarget("relay.example.com", 30380, FINGERPRINT, None), "laptop", key)
    assert ClientFile.load(path).relay() == QUIC

    assert cf.set_relay(RelaySettings(relay_url="https://relay.example.com")) == {}
    cf.save()
    text = path.read_text()
    assert set(tomllib.loads(text)) == {"relay_url", "api_key_file", "bind", "forward"}
    assert comments(text) == comments(EXAMPLE.read_text())
    assert cf.to_config().relay_url == "https://relay.example.com"


def test_first_run_makes_a_private_folder_key_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = default_config_path()
    assert path == tmp_path / "xdg" / "ptth" / "ptth_client.toml"
    cf = ClientFile.load(path)
    assert not cf.exists and cf.relay() == RelaySettings() and cf.forwards() == [] and cf.api_key_file is None

    key, created = cf.ensure_key()
    key_file = path.parent / "ptth_client.key"
    assert created and cf.api_key_file == str(key_file) and key_file.read_text() == key + "\n"
    assert mode(path.parent) == 0o700 and mode(key_file) == 0o600
    assert cf.set_relay(RelaySettings(relay_url="https://relay.example.com")) == {}
    cf.add_forward(Forward(2200, "box", "ssh"))
    cf.save()
    assert cf.exists and mode(path) == 0o600
    assert path.read_text() == (f'relay_url = "https://relay.example.com"\napi_key_file = "{key_file}"\n'
                                'forward = ["2200:box:ssh"]\n')

    again = ClientFile.load(path)
    assert again.exists and again.ensure_key() == (key, False)
    assert again.to_config() == ClientConfig(key, "127.0.0.1", (Forward(2200, "box", "ssh"),),
                                             relay_url="https://relay.example.com")


def test_default_config_path_ignores_a_relative_xdg_config_home(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("", "relative/dir"):
        monkeypatch.setenv("XDG_CONFIG_HOME", value)
        assert default_config_path() == Path.home() / ".config" / "ptth" / "ptth_client.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_config_path() == Path.home() / ".config" / "ptth" / "ptth_client.toml"


def test_ensure_key_reads_the_file_never_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ptth_client.key").write_text("k" * 40 + "\n")
    monkeypatch.setenv("PTTH_CLIENT_API_KEY", "e" * 40)
    cf = ClientFile.load(tmp_path / "ptth_client.toml")
    # No api_key_file, but the file it would make is there (an earlier run that was not saved): it is used.
    assert cf.ensure_key() == ("k" * 40, False)
    assert cf.api_key_file == str(tmp_path / "ptth_client.key")


@pytest.mark.parametrize(("content", "error"), [
    ("short\n", "too weak"),
    ("has a space in it, and is long enough\n", "printable ASCII"),
    ("", "must hold one line"),
])
def test_ensure_key_refuses_a_bad_key_file(tmp_path: Path, content: str, error: str) -> None:
    (tmp_path / "my.key").write_text(content)
    path = tmp_path / "ptth_client.toml"
    path.write_text(f'api_key_file = "{tmp_path / "my.key"}"\n')
    with pytest.raises(ConfigError, match=error):
        ClientFile.load(path).ensure_key()


@pytest.mark.parametrize(("relay", "fields"), [
    (RelaySettings(), {"relay_url"}),
    (RelaySettings(relay_url="ftp://relay.example.com"), {"relay_url"}),
    (RelaySettings(relay_url="https://r.example.com", quic_relay="r.example.com:30380"), {"relay_url", "quic_relay"}),
    (RelaySettings(relay_url="https://r.example.com", name="laptop"), {"name"}),
    (RelaySettings(relay_url="https://r.example.com", relay_fingerprint=FINGERPRINT, ca_file="/ca.pem"),
     {"relay_fingerprint", "ca_file"}),
    (RelaySettings(quic_relay="no-port"), {"quic_relay", "relay_fingerprint", "name"}),
    (RelaySettings(quic_relay="r.example.com:30380", relay_fingerprint="3f3f", name="bad name"),
     {"relay_fingerprint", "name"}),
    (RelaySettings(quic_relay="r.example.com:99999", ca_file="/ca.pem", name="laptop"), {"quic_relay"}),
])
def test_set_relay_reports_each_wrong_field_and_changes_nothing(relay: RelaySettings, fields: set[str],
                                                                tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text(COMMENTED)
    cf = ClientFile.load(path)
    errors = cf.set_relay(relay)
    assert set(errors) == fields
    assert all(message and "\n" not in message for message in errors.values())
    assert cf.as_string() == COMMENTED


def test_set_relay_strips_values_and_normalizes_the_fingerprint(tmp_path: Path) -> None:
    cf = ClientFile.load(tmp_path / "ptth_client.toml")
    pasted = "SHA256:" + ":".join(["3F"] * 32)
    assert cf.set_relay(RelaySettings(quic_relay=" r.example.com:30380 ", relay_fingerprint=pasted,
                                      name="laptop\n")) == {}
    assert cf.relay() == RelaySettings(quic_relay="r.example.com:30380", relay_fingerprint=FINGERPRINT,
                                       name="laptop")
    assert cf.set_relay(RelaySettings(quic_relay="r.example.com:30380", ca_file="/ca.pem", name="laptop")) == {}
    assert tomllib.loads(cf.as_string()) == {"quic_relay": "r.example.com:30380", "ca_file": "/ca.pem",
                                             "name": "laptop"}


def test_an_unchanged_value_keeps_how_it_was_written(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text("relay_url = 'https://relay.example.com'   # literal string\n")
    cf = ClientFile.load(path)
    assert cf.set_relay(cf.relay()) == {}
    assert cf.as_string() == path.read_text()


@pytest.mark.parametrize(("args", "fields"), [
    (("2202", "box", "db"), set()),
    ((" 2202 ", "box", "db"), set()),
    (("0", "box", "db"), {"local_port"}),
    (("65536", "box", "db"), {"local_port"}),
    (("22a", "box", "db"), {"local_port"}),
    (("9" * 5000, "box", "db"), {"local_port"}),
    (("", "", ""), {"local_port", "server", "port_name"}),
    (("2200", "box", "db"), {"local_port"}),  # 2200 is box:ssh's
    (("2202", "a box", "d.b"), {"server", "port_name"}),
])
def test_check_forward(args: tuple[str, str, str], fields: set[str], tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text(COMMENTED)
    errors = ClientFile.load(path).check_forward(*args)
    assert set(errors) == fields
    assert all(message and "\n" not in message for message in errors.values())


def test_check_forward_lets_the_edited_forward_keep_its_port(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text(COMMENTED)
    cf = ClientFile.load(path)
    assert cf.check_forward("2200", "box", "ssh2", replacing=2200) == {}
    assert cf.check_forward("2201", "box", "ssh2", replacing=2200) == {
        "local_port": "is already forwarded to box:web"}


def test_forward_edits_refuse_what_the_cli_would(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text(COMMENTED)
    cf = ClientFile.load(path)
    with pytest.raises(ValueError, match="already forwarded"):
        cf.add_forward(Forward(2200, "other", "ssh"))
    with pytest.raises(ValueError, match="not a valid forward"):
        cf.add_forward(Forward(2202, "a box", "ssh"))
    with pytest.raises(ValueError, match="already forwarded"):
        cf.replace_forward(2200, Forward(2201, "box", "ssh"))
    with pytest.raises(KeyError):
        cf.remove_forward(9999)
    cf.replace_forward(2200, Forward(2200, "box", "ssh2"))  # its own port is fine
    assert cf.forwards() == [Forward(2200, "box", "ssh2"), Forward(2201, "box", "web")]


def test_entries_that_do_not_parse_are_skipped_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text('forward = ["2200:box:ssh", "nonsense", 7]\n')
    cf = ClientFile.load(path)
    assert cf.forwards() == [Forward(2200, "box", "ssh")]
    cf.remove_forward(2200)
    cf.add_forward(Forward(2201, "box", "web"))
    assert tomllib.loads(cf.as_string())["forward"] == ["nonsense", 7, "2201:box:web"]


def test_a_one_line_list_grows_one_entry_a_line(tmp_path: Path) -> None:
    cf = ClientFile.load(tmp_path / "ptth_client.toml")
    cf.add_forward(Forward(2200, "box", "ssh"))
    assert cf.as_string() == 'forward = ["2200:box:ssh"]\n'
    cf.add_forward(Forward(2201, "box", "web"))
    assert cf.as_string() == 'forward = [\n    "2200:box:ssh",\n    "2201:box:web",\n]\n'
    cf.remove_forward(2200)
    cf.remove_forward(2201)
    assert tomllib.loads(cf.as_string()) == {"forward": []}


def test_unknown_keys_stay_and_the_cli_names_them(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text('colour = "blue"  # not a ptth key\nrelay_url = "http://127.0.0.1:4000"\n')
    cf = ClientFile.load(path)
    cf.add_forward(Forward(2200, "box", "ssh"))
    cf.save()
    assert path.read_text().startswith('colour = "blue"  # not a ptth key\n')
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        cf.to_config()


def test_new_keys_go_before_a_table_and_after_trailing_comments(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text("# just comments\n\n# and blank lines\n\n")
    cf = ClientFile.load(path)
    assert cf.set_relay(RelaySettings(relay_url="https://relay.example.com")) == {}
    cf.add_forward(Forward(2200, "box", "ssh"))
    assert comments(cf.as_string()) == ["# just comments", "# and blank lines"]
    assert tomllib.loads(cf.as_string()) == {"relay_url": "https://relay.example.com", "forward": ["2200:box:ssh"]}

    path.write_text('bind = "127.0.0.1"\n\n[extra]\nx = 1  # a table (the CLI refuses it; tomlkit keeps it)\n')
    cf = ClientFile.load(path)
    assert cf.set_relay(QUIC) == {}
    cf.add_forward(Forward(2200, "box", "ssh"))
    cf.save()
    assert tomllib.loads(path.read_text()) == {
        "bind": "127.0.0.1", "quic_relay": "relay.example.com:30380", "relay_fingerprint": FINGERPRINT,
        "name": "laptop", "forward": ["2200:box:ssh"], "extra": {"x": 1}}
    assert path.read_text().endswith("[extra]\nx = 1  # a table (the CLI refuses it; tomlkit keeps it)\n")


def test_save_keeps_a_files_mode_its_symlink_and_crlf(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_bytes(b'# mine\r\nrelay_url = "http://127.0.0.1:4000"\r\n')
    real.chmod(0o640)
    link = tmp_path / "ptth_client.toml"
    link.symlink_to(real)
    cf = ClientFile.load(link)
    cf.add_forward(Forward(2200, "box", "ssh"))
    cf.save()
    assert link.is_symlink() and mode(real) == 0o640
    assert real.read_bytes() == b'# mine\r\nrelay_url = "http://127.0.0.1:4000"\r\nforward = ["2200:box:ssh"]\r\n'
    assert not list(tmp_path.glob(".ptth_client.*"))  # no temporary file left


@pytest.mark.parametrize(("content", "error"), [
    (b"relay_url = ", "not valid TOML: "),
    (b'relay_url = "\xff"', "not valid TOML: the file is not UTF-8 text"),
    (b"a = 1\na = 2\n", "not valid TOML: "),
])
def test_load_errors_are_one_line(tmp_path: Path, content: bytes, error: str) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        ClientFile.load(path)
    assert str(e.value).startswith(f"{path}: {error}") and "\n" not in str(e.value)


def test_a_folder_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}: cannot read: "):
        ClientFile.load(tmp_path)


def test_clients_snippet_is_a_valid_relay_entry() -> None:
    key = tripcode.generate_key()
    forwards = [Forward(2200, "box", "ssh"), Forward(2201, "box", "web"), Forward(2202, "box", "ssh")]
    snippet = clients_snippet("laptop", key, forwards)
    assert snippet == (f'[[clients]]\nname = "laptop"\ntripcode = "{tripcode.derive(key)}"\n'
                       'allow = ["box:ssh", "box:web"]\n')
    entry = tomllib.loads(snippet)["clients"][0]
    assert apply_keys(CLIENT_ENTRY_KEYS, entry, "snippet") == entry
    placeholder = tomllib.loads(clients_snippet("laptop", key, []))["clients"][0]
    assert placeholder["allow"] == ["SERVER:PORTNAME"]
    assert apply_keys(CLIENT_ENTRY_KEYS, placeholder, "snippet") == placeholder
    for bad in ("", "my laptop", 'a"b', "x" * 65):
        with pytest.raises(ValueError, match="^must be 1-64 characters"):
            clients_snippet(bad, key, forwards)


ARRAY_WITH_COMMENTS = """\
# The forwards, below.
forward = [
    # first comment, on its own line
    "1:box:ssh",  # inline, goes with its entry
    # last comment
]
# after
"""

_servers = st.sampled_from(["box", "pi", "a.b_c~d-e"])
_port_names = st.sampled_from(["ssh", "web", "X_1-2"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_sequence_of_forward_edits_matches_a_model(data: st.DataObject) -> None:
    model = [Forward(1, "box", "ssh")]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ptth_client.toml"
        path.write_text(ARRAY_WITH_COMMENTS)
        cf = ClientFile.load(path)
        for _ in range(data.draw(st.integers(0, 12), label="edits")):
            ops = ["add", "replace", "remove"] if model else ["add"]
            op = data.draw(st.sampled_from(ops), label="op")
            old = data.draw(st.sampled_from(model), label="old") if op != "add" else None
            free = sorted(set(range(1, 25)) - {f.local_port for f in model if f is not old})
            new = Forward(data.draw(st.sampled_from(free), label="port"), data.draw(_servers), data.draw(_port_names))
            if op == "add":
                cf.add_forward(new)
                model.append(new)
            elif op == "replace":
                assert old is not None
                cf.replace_forward(old.local_port, new)
                model[model.index(old)] = new
            else:
                assert old is not None
                cf.remove_forward(old.local_port)
                model.remove(old)
            assert cf.forwards() == model
        cf.save()
        text = path.read_text()
        assert tomllib.loads(text) == {"forward": [f"{f.local_port}:{f.server}:{f.port}" for f in model]}
        assert ClientFile.load(path).forwards() == model
        kept = [c for c in comments(ARRAY_WITH_COMMENTS) if "inline" not in c]
        assert [c for c in comments(text) if "inline" not in c] == kept


def test_an_empty_list_takes_its_first_entry_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "ptth_client.toml"
    path.write_text("forward = []  # none yet\n")
    cf = ClientFile.load(path)
    cf.add_forward(Forward(2200, "box", "ssh"))
    assert cf.as_string() == 'forward = ["2200:box:ssh"]  # none yet\n'
