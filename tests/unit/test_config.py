"""Tests for ptth_lib.config and the example configs in conf/ (no processes)."""

from __future__ import annotations

import base64
import re
import stat
import tomllib
from pathlib import Path

import blake3
import pytest

from ptth_lib.config import (
    API_KEY_ENV,
    CLIENT_ENTRY_KEYS,
    CLIENT_KEYS,
    DASHBOARD_KEYS,
    QUIC_CLIENT_KEYS,
    QUIC_SERVER_KEYS,
    RELAY_KEYS,
    SCRAPER_KEY_KEYS,
    SERVER_ENTRY_KEYS,
    SERVER_KEYS,
    is_private,
    load_relay_config,
    load_server_config,
    parse_relay_config,
    parse_server_config,
    read_toml,
)
from ptth_lib.config.server import _with_top_level_key
from ptth_lib.errors import ConfigError, PtthError
from ptth_lib.wire import tripcode

REPO = Path(__file__).resolve().parents[2]
RELAY_EXAMPLE = REPO / "conf" / "relay.example.toml"
SERVER_EXAMPLE = REPO / "conf" / "server.example.toml"
CLIENT_EXAMPLE = REPO / "conf" / "client.example.toml"
QUIC_CLIENT_EXAMPLE = REPO / "conf" / "quic_client.example.toml"

STRONG_KEY = "a-strong-test-key-0123456789abcdef"
CODE_A = tripcode.derive("key-for-server-a-0123456789")
CODE_B = tripcode.derive("key-for-server-b-0123456789")


def _no_overrides() -> dict[str, None]:
    return {"name": None, "relay_url": None, "file_server_root": None}


# ---- the example files ----------------------------------------------------


def test_relay_example_parses() -> None:
    cfg = load_relay_config(RELAY_EXAMPLE)
    assert len(cfg.servers) == 2
    with_display = [s for s in cfg.servers.values() if s.display_name != s.name]
    without_display = [s for s in cfg.servers.values() if s.display_name == s.name]
    assert with_display and without_display
    for s in cfg.servers.values():
        assert tripcode.is_valid(s.tripcode)


def test_relay_example_shows_the_legacy_form_commented_out() -> None:
    text = RELAY_EXAMPLE.read_text()
    assert re.search(r"^#\s*\[server_tripcodes\]\s*$", text, re.MULTILINE)
    assert re.search(r"^#\s*[A-Za-z0-9_.~-]+\s*=\s*\"[A-Za-z0-9+/=]{44}\"", text, re.MULTILINE)
    assert text.count("[[servers]]") >= 2


def test_relay_example_legacy_form_parses_when_uncommented() -> None:
    text = RELAY_EXAMPLE.read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^#\s*\[server_tripcodes\]", line))
    uncommented = lines[:start] + [re.sub(r"^#\s*", "", line) for line in lines[start:] if line.strip()]
    raw = tomllib.loads("\n".join(uncommented))
    cfg = parse_relay_config(raw, "uncommented example")
    assert len(cfg.servers) == 3


def test_server_example_parses_once_given_a_key() -> None:
    raw = read_toml(SERVER_EXAMPLE)
    assert "api_key" not in raw, "the example must leave api_key commented out"
    raw["api_key"] = STRONG_KEY
    cfg = parse_server_config(raw, str(SERVER_EXAMPLE))
    assert cfg.api_key == STRONG_KEY


def test_server_example_explains_the_key() -> None:
    text = SERVER_EXAMPLE.read_text()
    assert re.search(r"^#\s*api_key\s*=", text, re.MULTILINE)
    assert "PTTH_API_KEY" in text
    assert "generat" in text


def _shows_key(text: str, name: str) -> bool:
    """`name =` or `# name =`, or the table forms `[name]`, `[[name]]`."""
    esc = re.escape(name)
    return bool(re.search(rf"^\s*(#\s*)?({esc}\s*=|\[{esc}\]|\[\[{esc}\]\])", text, re.MULTILINE))


@pytest.mark.parametrize(("keys", "example"), [
    (SERVER_KEYS, SERVER_EXAMPLE),
    (RELAY_KEYS, RELAY_EXAMPLE),
    (SERVER_ENTRY_KEYS, RELAY_EXAMPLE),
    (SCRAPER_KEY_KEYS, RELAY_EXAMPLE),
    (CLIENT_ENTRY_KEYS, RELAY_EXAMPLE),
    (DASHBOARD_KEYS, RELAY_EXAMPLE),
    (CLIENT_KEYS, CLIENT_EXAMPLE),
    (QUIC_SERVER_KEYS, SERVER_EXAMPLE),
    (QUIC_CLIENT_KEYS, QUIC_CLIENT_EXAMPLE),
], ids=["SERVER_KEYS", "RELAY_KEYS", "SERVER_ENTRY_KEYS", "SCRAPER_KEY_KEYS", "CLIENT_ENTRY_KEYS", "DASHBOARD_KEYS",
        "CLIENT_KEYS",
        "QUIC_SERVER_KEYS", "QUIC_CLIENT_KEYS"])
def test_example_shows_every_key(keys, example: Path) -> None:  # type: ignore[no-untyped-def]
    text = example.read_text()
    missing = [k.name for k in keys if not _shows_key(text, k.name)]
    assert not missing, f"{example.name} does not show {missing}"


@pytest.mark.parametrize(("keys", "example"), [
    (SERVER_KEYS, SERVER_EXAMPLE),
    (RELAY_KEYS, RELAY_EXAMPLE),
    (SERVER_ENTRY_KEYS, RELAY_EXAMPLE),
    (SCRAPER_KEY_KEYS, RELAY_EXAMPLE),
    (CLIENT_ENTRY_KEYS, RELAY_EXAMPLE),
    (DASHBOARD_KEYS, RELAY_EXAMPLE),
    (CLIENT_KEYS, CLIENT_EXAMPLE),
    (QUIC_SERVER_KEYS, SERVER_EXAMPLE),
    (QUIC_CLIENT_KEYS, QUIC_CLIENT_EXAMPLE),
], ids=["SERVER_KEYS", "RELAY_KEYS", "SERVER_ENTRY_KEYS", "SCRAPER_KEY_KEYS", "CLIENT_ENTRY_KEYS", "DASHBOARD_KEYS",
        "CLIENT_KEYS",
        "QUIC_SERVER_KEYS", "QUIC_CLIENT_KEYS"])
def test_example_comments_every_key(keys, example: Path) -> None:  # type: ignore[no-untyped-def]
    """Each key's first appearance is preceded by a comment line."""
    lines = example.read_text().splitlines()
    for key in keys:
        esc = re.escape(key.name)
        first = next(i for i, line in enumerate(lines)
                     if re.match(rf"^\s*(#\s*)?({esc}\s*=|\[{esc}\]|\[\[{esc}\]\])", line))
        before = lines[first - 1].strip() if first else ""
        same_line_doc = re.match(rf"^#\s*{esc}\s*=", lines[first]) and len(lines[first]) > 30
        assert before.startswith("#") or same_line_doc, f"{key.name} has no comment in {example.name}"


def test_every_key_has_a_doc() -> None:
    for key in (*SERVER_KEYS, *RELAY_KEYS, *SERVER_ENTRY_KEYS, *SCRAPER_KEY_KEYS, *CLIENT_KEYS, *CLIENT_ENTRY_KEYS,
                *QUIC_SERVER_KEYS, *QUIC_CLIENT_KEYS, *DASHBOARD_KEYS):
        assert key.doc and "\n" not in key.doc


# ---- bad configs --------------------------------------------------------

def _server_raw(**changes: object) -> dict[str, object]:
    raw: dict[str, object] = {"name": "alpha", "api_key": STRONG_KEY, "relay_url": "http://127.0.0.1:4000",
                              "file_server_root": "./data"}
    for k, v in changes.items():
        if v is _DELETE:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


_DELETE = object()

BAD_SERVER_CONFIGS = [
    # (id, raw, words the message must contain)
    ("unknown key", _server_raw(relay_ulr="http://x"), ["relay_ulr", "unknown"]),
    ("missing name", _server_raw(name=_DELETE), ["name", "missing"]),
    ("missing relay_url", _server_raw(relay_url=_DELETE), ["relay_url", "missing"]),
    ("name not a string", _server_raw(name=5), ["name", "str"]),
    ("name is a bool", _server_raw(name=True), ["name"]),
    ("api_key is a number", _server_raw(api_key=12345678901234567890123), ["api_key"]),
    ("weak key", _server_raw(api_key="secretpassword"), ["api_key", "weak", "20"]),
    ("19-char key", _server_raw(api_key="x" * 19), ["api_key", "weak"]),
    ("bad URL", _server_raw(relay_url="notaurl"), ["relay_url", "http"]),
    ("ftp URL", _server_raw(relay_url="ftp://example.com/"), ["relay_url"]),
    ("URL without host", _server_raw(relay_url="http://"), ["relay_url"]),
    ("name with slash", _server_raw(name="a/b"), ["name"]),
    ("name with space", _server_raw(name="a b"), ["name"]),
    ("empty name", _server_raw(name=""), ["name"]),
    ("name too long", _server_raw(name="a" * 65), ["name"]),
    ("name starting with dot", _server_raw(name=".."), ["name"]),
    ("file_server_root not a string", _server_raw(file_server_root=["x"]), ["file_server_root"]),
]


@pytest.mark.parametrize(("raw", "words"), [(r, w) for _, r, w in BAD_SERVER_CONFIGS],
                         ids=[i for i, _, _ in BAD_SERVER_CONFIGS])
def test_bad_server_config(raw: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_server_config(raw, "server.toml")
    message = str(info.value)
    assert message.startswith("server.toml")
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    if isinstance(raw.get("api_key"), str):
        assert raw["api_key"] not in message, "the message must not echo the key"


def test_a_20_char_key_is_enough() -> None:
    assert parse_server_config(_server_raw(api_key="x" * 20), "s").api_key == "x" * 20


BAD_RELAY_CONFIGS = [
    ("unknown key", {"listen_timeout": 30}, ["listen_timeout", "unknown"]),
    ("timeout as string", {"listen_timeout_secs": "30"}, ["listen_timeout_secs", "number"]),
    ("bool for number", {"request_timeout_secs": True}, ["request_timeout_secs"]),
    ("listen timeout 0", {"listen_timeout_secs": 0}, ["listen_timeout_secs", "1 to 300"]),
    ("listen timeout too big", {"listen_timeout_secs": 301}, ["listen_timeout_secs"]),
    ("request timeout negative", {"request_timeout_secs": -1.5}, ["request_timeout_secs"]),
    ("request timeout nan", {"request_timeout_secs": float("nan")}, ["request_timeout_secs"]),
    ("request timeout inf", {"request_timeout_secs": float("inf")}, ["request_timeout_secs"]),
    ("servers not a list", {"servers": {"name": "a"}}, ["servers"]),
    ("servers entry not a table", {"servers": ["alpha"]}, ["servers", "table"]),
    ("servers entry unknown key", {"servers": [{"name": "a", "tripcode": CODE_A, "trip": "x"}]},
     ["trip", "unknown", "[[servers]]"]),
    ("servers entry missing tripcode", {"servers": [{"name": "a"}]}, ["tripcode", "missing"]),
    ("servers entry missing name", {"servers": [{"tripcode": CODE_A}]}, ["name", "missing"]),
    ("bad tripcode", {"servers": [{"name": "a", "tripcode": "not-a-tripcode"}]}, ["tripcode"]),
    ("tripcode of 31 bytes", {"servers": [{"name": "a", "tripcode": "A" * 40 + "AA=="}]}, ["tripcode"]),
    ("tripcode not a string", {"servers": [{"name": "a", "tripcode": 5}]}, ["tripcode"]),
    ("name with slash", {"servers": [{"name": "a/b", "tripcode": CODE_A}]}, ["name"]),
    ("name with space", {"servers": [{"name": "a b", "tripcode": CODE_A}]}, ["name"]),
    ("display_name not a string", {"servers": [{"name": "a", "tripcode": CODE_A, "display_name": 1}]},
     ["display_name"]),
    ("duplicate server", {"servers": [{"name": "a", "tripcode": CODE_A}, {"name": "a", "tripcode": CODE_B}]},
     ["'a'", "twice"]),
    ("duplicate across forms", {"servers": [{"name": "a", "tripcode": CODE_A}],
                                "server_tripcodes": {"a": CODE_B}}, ["'a'", "twice"]),
    ("legacy bad tripcode", {"server_tripcodes": {"a": "nope"}}, ["tripcode", "server_tripcodes"]),
    ("legacy bad name", {"server_tripcodes": {"a/b": CODE_A}}, ["name", "server_tripcodes"]),
    ("legacy not a table", {"server_tripcodes": ["a"]}, ["server_tripcodes"]),
    ("max_connections too few", {"max_connections": 15}, ["max_connections", "0 (derived", "16 to 1000000"]),
    ("max_connections negative", {"max_connections": -1}, ["max_connections"]),
    ("max_connections too many", {"max_connections": 1_000_001}, ["max_connections"]),
    ("max_connections not a whole number", {"max_connections": 100.5}, ["max_connections", "whole number"]),
]


@pytest.mark.parametrize(("raw", "words"), [(r, w) for _, r, w in BAD_RELAY_CONFIGS],
                         ids=[i for i, _, _ in BAD_RELAY_CONFIGS])
def test_bad_relay_config(raw: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_config(raw, "relay.toml")
    message = str(info.value)
    assert message.startswith("relay.toml")
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_config_error_is_a_ptth_error_and_value_error() -> None:
    assert issubclass(ConfigError, PtthError)
    assert issubclass(ConfigError, ValueError)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "alpha\nrelay_url = \n')
    for load in (load_relay_config, lambda p: load_server_config(p, _no_overrides())):
        with pytest.raises(ConfigError) as info:
            load(path)
        message = str(info.value)
        assert str(path) in message
        assert "TOML" in message
        assert "\n" not in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "missing.toml"
    for load in (load_relay_config, lambda p: load_server_config(p, _no_overrides())):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(path) in str(info.value)
        assert "not found" in str(info.value)


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    # A directory where a file is expected: OSError other than FileNotFoundError.
    with pytest.raises(ConfigError) as info:
        load_relay_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_relay_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("listen_timeout_secs = 0\n")
    with pytest.raises(ConfigError) as info:
        load_relay_config(path)
    assert str(path) in str(info.value) and "listen_timeout_secs" in str(info.value)


# ---- good configs -------------------------------------------------------


def test_relay_defaults() -> None:
    cfg = parse_relay_config({}, "relay.toml")
    assert cfg.listen_timeout_secs == 120  # a spec 002 server's: at most 30 (relay.py SPEC_002_LISTEN_SECS)
    assert cfg.max_connections == 0  # derived from the open-files limit (capacity.py)
    assert cfg.request_timeout_secs == 30
    assert dict(cfg.servers) == {}


def test_relay_timeouts_accept_int_and_float_at_the_bounds() -> None:
    cfg = parse_relay_config({"listen_timeout_secs": 1, "request_timeout_secs": 3600.0}, "r")
    assert cfg.listen_timeout_secs == 1.0 and isinstance(cfg.listen_timeout_secs, float)
    assert cfg.request_timeout_secs == 3600.0


def test_legacy_server_tripcodes_merged_with_servers(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[[servers]]\nname = "alpha"\ntripcode = "{CODE_A}"\ndisplay_name = "Alpha Server"\n\n'
        f'[server_tripcodes]\nbeta = "{CODE_B}"\n'
    )
    cfg = load_relay_config(path)
    assert set(cfg.servers) == {"alpha", "beta"}
    assert cfg.servers["alpha"].tripcode == CODE_A
    assert cfg.servers["alpha"].display_name == "Alpha Server"
    assert cfg.servers["beta"].tripcode == CODE_B
    assert cfg.servers["beta"].display_name == "beta"


def test_legacy_form_alone() -> None:
    cfg = parse_relay_config({"server_tripcodes": {"alpha": CODE_A}}, "r")
    assert cfg.servers["alpha"].tripcode == CODE_A


def test_display_name_defaults_to_name() -> None:
    cfg = parse_relay_config({"servers": [{"name": "alpha", "tripcode": CODE_A}]}, "r")
    assert cfg.servers["alpha"].display_name == "alpha"


def test_server_defaults() -> None:
    cfg = parse_server_config(_server_raw(file_server_root=_DELETE, api_key=_DELETE), "s")
    assert cfg.file_server_root is None, "no default folder: a server may serve a web app alone"
    assert cfg.web_app_url is None
    assert cfg.api_key is None


# ---- load_server_config: where the key comes from -------------------------


def _write_server_config(path: Path, key: str | None = None) -> None:
    """A valid server config at `path`, serving the folder `data` beside it."""
    root = path.parent / "data"
    root.mkdir(exist_ok=True)
    text = f'name = "alpha"\nrelay_url = "http://127.0.0.1:4000"\nfile_server_root = "{root}"\n'
    if key is not None:
        text += f'api_key = "{key}"\n'
    path.write_text(text)


@pytest.fixture
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def test_key_from_file(tmp_path: Path, no_env_key: None) -> None:
    path = tmp_path / "server.toml"
    _write_server_config(path, STRONG_KEY)
    cfg, source = load_server_config(path, _no_overrides())
    assert (cfg.api_key, source) == (STRONG_KEY, "file")


def test_key_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_key = "an-env-key-0123456789-abcdef"
    monkeypatch.setenv(API_KEY_ENV, env_key)
    path = tmp_path / "server.toml"
    _write_server_config(path)
    before = path.read_text()
    cfg, source = load_server_config(path, _no_overrides())
    assert (cfg.api_key, source) == (env_key, "env")
    assert path.read_text() == before, "an env key must not be written to the file"


def test_env_key_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_key = "an-env-key-0123456789-abcdef"
    monkeypatch.setenv(API_KEY_ENV, env_key)
    path = tmp_path / "server.toml"
    _write_server_config(path, STRONG_KEY)
    cfg, source = load_server_config(path, _no_overrides())
    assert (cfg.api_key, source) == (env_key, "env")


def test_weak_env_key_is_refused_without_echo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "secretpassword")
    path = tmp_path / "server.toml"
    _write_server_config(path)
    with pytest.raises(ConfigError) as info:
        load_server_config(path, _no_overrides())
    message = str(info.value)
    assert API_KEY_ENV in message and "weak" in message
    assert "secretpassword" not in message


def test_overrides_beat_the_file(tmp_path: Path, no_env_key: None) -> None:
    path = tmp_path / "server.toml"
    _write_server_config(path, STRONG_KEY)
    (tmp_path / "srv").mkdir()
    cfg, _ = load_server_config(path, {"name": "other", "relay_url": None,
                                       "file_server_root": str(tmp_path / "srv")})
    assert cfg.name == "other"
    assert cfg.relay_url == "http://127.0.0.1:4000"
    assert cfg.file_server_root == str(tmp_path / "srv")


def test_bad_override_is_a_config_error(tmp_path: Path, no_env_key: None) -> None:
    path = tmp_path / "server.toml"
    _write_server_config(path, STRONG_KEY)
    with pytest.raises(ConfigError, match="relay_url"):
        load_server_config(path, {"name": None, "relay_url": "notaurl", "file_server_root": None})


def test_generated_key_is_saved_private_and_reused(tmp_path: Path, no_env_key: None) -> None:
    path = tmp_path / "server.toml"
    _write_server_config(path)
    path.chmod(0o644)
    cfg, source = load_server_config(path, _no_overrides())
    assert source == "generated"
    assert cfg.api_key and tripcode.is_strong(cfg.api_key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert is_private(path)
    assert cfg.api_key in path.read_text()
    raw = read_toml(path)
    assert raw["api_key"] == cfg.api_key
    assert parse_server_config(raw, str(path)).api_key == cfg.api_key

    again, source2 = load_server_config(path, _no_overrides())
    assert source2 == "file"
    assert again.api_key == cfg.api_key


def test_generated_key_appended_to_file_without_trailing_newline(tmp_path: Path, no_env_key: None) -> None:
    path = tmp_path / "server.toml"
    (tmp_path / "data").mkdir()
    path.write_text(f'name = "alpha"\nrelay_url = "http://127.0.0.1:4000"\n'
                    f'file_server_root = "{tmp_path / "data"}"')  # no final newline
    cfg, source = load_server_config(path, _no_overrides())
    assert source == "generated"
    assert read_toml(path)["api_key"] == cfg.api_key


def test_no_key_generated_when_config_is_invalid(tmp_path: Path, no_env_key: None) -> None:
    path = tmp_path / "server.toml"
    path.write_text('name = "a b"\nrelay_url = "http://127.0.0.1:4000"\n')
    before = path.read_text()
    with pytest.raises(ConfigError):
        load_server_config(path, _no_overrides())
    assert path.read_text() == before


KEY_LINES = "# Generated by ptth_server.py. Keep it secret: it proves this server's name.\napi_key = \"K\"\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("", KEY_LINES),
    ('name = "a"\n', 'name = "a"\n' + KEY_LINES),
    ('name = "a"', 'name = "a"\n' + KEY_LINES),  # no final newline
    ('# top\nname = "a"  # why\n\n# about t\n[t]\nx = 1\n',
     '# top\nname = "a"  # why\n' + KEY_LINES + '\n# about t\n[t]\nx = 1\n'),
    ('# only tables\n\n[t]\nx = 1\n', KEY_LINES + '# only tables\n\n[t]\nx = 1\n'),
    ('a = 1\n# api_key = "paste one here"\n\n[t]\n',
     'a = 1\n# api_key = "paste one here"\n' + KEY_LINES + '\n[t]\n'),
    ('a = [\n  [1],\n  [2],\n]\n[[t]]\nx = 1\n', 'a = [\n  [1],\n  [2],\n]\n' + KEY_LINES + '[[t]]\nx = 1\n'),
    ('t = {x = 1}\r\n[u]\r\n', 't = {x = 1}\r\n' + KEY_LINES + '[u]\r\n'),
    ('s = """\n[not a table]\n"""\n[t]\n', 's = """\n[not a table]\n"""\n' + KEY_LINES + '[t]\n'),
    ('a.b = 1\nc = 2\n[t]\n', 'a.b = 1\nc = 2\n' + KEY_LINES + '[t]\n'),  # a dotted key is a key
    ('x = 1\n[a.b]\ny = 2\n', 'x = 1\n' + KEY_LINES + '[a.b]\ny = 2\n'),  # a table in a dotted one
])
def test_generated_key_is_a_top_level_key_in_any_layout(text: str, expected: str) -> None:
    """The key goes after the last top-level key (or the placeholder), before any table; the
    rest of the file is kept byte for byte, and it means what it did plus the key."""
    new_text = _with_top_level_key(text, "api_key", "K")
    assert new_text == expected
    assert tomllib.loads(new_text) == {**tomllib.loads(text), "api_key": "K"}


def test_generated_key_in_the_example_config(tmp_path: Path, no_env_key: None) -> None:
    example = SERVER_EXAMPLE.read_text()
    path = tmp_path / "server.toml"
    path.write_text(example)
    (tmp_path / "data").mkdir()
    cfg, source = load_server_config(path, {"name": None, "relay_url": None,
                                            "file_server_root": str(tmp_path / "data")})
    assert source == "generated"
    assert cfg.forwarded_ports == {"ssh": ("127.0.0.1", 22)}
    text = path.read_text()
    assert text.replace(KEY_LINES.replace('"K"', f'"{cfg.api_key}"'), "") == example
    assert read_toml(path)["api_key"] == cfg.api_key


def test_generated_key_keeps_crlf_lines(tmp_path: Path, no_env_key: None) -> None:
    path = tmp_path / "server.toml"
    (tmp_path / "data").mkdir()
    original = f'name = "alpha"\r\nrelay_url = "http://127.0.0.1:4000"\r\nfile_server_root = "{tmp_path / "data"}"\r\n'
    path.write_bytes(original.encode())
    cfg, _ = load_server_config(path, _no_overrides())
    assert path.read_bytes().startswith(original.encode())
    assert read_toml(path)["api_key"] == cfg.api_key


def test_is_private(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    path.chmod(0o600)
    assert is_private(path)
    path.chmod(0o640)
    assert not is_private(path)


def test_readme_documents_every_key() -> None:
    readme = (REPO / "README.md").read_text()
    for key in (*SERVER_KEYS, *RELAY_KEYS, *SERVER_ENTRY_KEYS, *SCRAPER_KEY_KEYS, *CLIENT_KEYS, *CLIENT_ENTRY_KEYS,
                *QUIC_SERVER_KEYS, *QUIC_CLIENT_KEYS, *DASHBOARD_KEYS):
        assert f"`{key.name}`" in readme or f"[[{key.name}]]" in readme or f"[{key.name}]" in readme, key.name


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-12-31T00:00:00Z", "2026-12-31T00:00:00+00:00"),
    ("2026-12-31T02:00:00+02:00", "2026-12-31T00:00:00+00:00"),
    ("2026-12-31T00:00:00", "2026-12-31T00:00:00+00:00"),  # no offset: UTC
    ("2026-12-31", "2026-12-31T00:00:00+00:00"),  # a date: its midnight, UTC
])
def test_scraper_key_times_become_utc(value: str, expected: str) -> None:
    raw = tomllib.loads(f'[[scraper_keys]]\nname = "k"\nhash = "{CODE_A}"\nnot_after = {value}\n')
    cfg = parse_relay_config(raw, "r")
    assert cfg.scraper_keys[0].not_after is not None
    assert cfg.scraper_keys[0].not_after.isoformat() == expected


@pytest.mark.parametrize(("text", "words"), [
    ('enable_scraper_api = "yes"', ["enable_scraper_api", "boolean"]),
    ("metrics = 1", ["metrics", "boolean"]),
    ('[[scraper_keys]]\nname = "k"\nhash = "nope"', ["hash", "tripcode"]),
    ('[[scraper_keys]]\nname = "k"', ["hash", "missing"]),
    (f'[[scraper_keys]]\nname = "k"\nhash = "{CODE_A}"\nnot_after = "tomorrow"', ["not_after", "date-time"]),
    (f'[[scraper_keys]]\nname = "k"\nhash = "{CODE_A}"\nexpires = 2026-01-01', ["expires", "unknown"]),
])
def test_bad_scraper_and_ops_keys(text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_config(tomllib.loads(text), "relay.toml")
    for word in words:
        assert word in str(info.value)


def test_unwritable_audit_log_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f'audit_log = "{tmp_path}/no/such/dir/audit.jsonl"\n')
    with pytest.raises(ConfigError, match="audit_log"):
        load_relay_config(path)
    path.write_text(f'audit_log = "{tmp_path}/audit.jsonl"\n')
    assert load_relay_config(path).audit_log == f"{tmp_path}/audit.jsonl"


# ---- the relay's [[clients]] table (from tests/e2e/test_client_cli.py, where the relay refusing to start
# ---- with a bad one is checked through gunicorn) ----------------------------------------------------------

def _tripcode(key: str) -> str:
    """Independent of ptth_lib on purpose: base64 of BLAKE3 of the UTF-8 key."""
    return base64.b64encode(blake3.blake3(key.encode()).digest()).decode()


CODE_A = _tripcode("client-a-key-0123456789abcdef")
CODE_B = _tripcode("client-b-key-0123456789abcdef")

BAD_CLIENTS = [
    ("missing allow", [{"name": "laptop", "tripcode": CODE_A}], ["[[clients]] #1", "allow", "missing"]),
    ("missing tripcode", [{"name": "laptop", "allow": ["srv:ssh"]}], ["tripcode", "missing"]),
    ("missing name", [{"tripcode": CODE_A, "allow": ["srv:ssh"]}], ["name", "missing"]),
    ("allow without port", [{"name": "laptop", "tripcode": CODE_A, "allow": ["srv"]}],
     ["allow", "'srv'", "SERVER:PORTNAME"]),
    ("allow empty port", [{"name": "laptop", "tripcode": CODE_A, "allow": ["srv:"]}], ["allow", "'srv:'"]),
    ("allow bad port", [{"name": "laptop", "tripcode": CODE_A, "allow": ["srv:a.b"]}], ["allow", "'srv:a.b'"]),
    ("allow bad server", [{"name": "laptop", "tripcode": CODE_A, "allow": ["a b:ssh"]}], ["allow", "'a b:ssh'"]),
    ("allow all servers", [{"name": "laptop", "tripcode": CODE_A, "allow": ["*:ssh"]}], ["allow", "'*:ssh'"]),
    ("allow not a list", [{"name": "laptop", "tripcode": CODE_A, "allow": "srv:ssh"}], ["allow", "list"]),
    ("allow entry not a string", [{"name": "laptop", "tripcode": CODE_A, "allow": [5]}], ["allow", "5"]),
    ("duplicate name", [{"name": "laptop", "tripcode": CODE_A, "allow": []},
                        {"name": "laptop", "tripcode": CODE_B, "allow": []}], ["'laptop'", "twice"]),
    ("same tripcode", [{"name": "laptop", "tripcode": CODE_A, "allow": []},
                       {"name": "phone", "tripcode": CODE_A, "allow": []}], ["'phone'", "tripcode", "own key"]),
    ("unknown key", [{"name": "laptop", "tripcode": CODE_A, "allow": [], "alow": ["srv:ssh"]}],
     ["[[clients]] #1", "'alow'", "unknown"]),
    ("bad tripcode", [{"name": "laptop", "tripcode": "not-a-tripcode", "allow": []}], ["tripcode"]),
    ("bad name", [{"name": "my laptop", "tripcode": CODE_A, "allow": []}], ["name"]),
    ("not a table", ["laptop"], ["clients", "table"]),
    ("second entry bad", [{"name": "laptop", "tripcode": CODE_A, "allow": []},
                          {"name": "phone", "tripcode": CODE_B}], ["[[clients]] #2", "allow"]),
]


@pytest.mark.parametrize(("clients", "words"), [(c, w) for _, c, w in BAD_CLIENTS],
                         ids=[i for i, _, _ in BAD_CLIENTS])
def test_bad_clients_table(clients: list[object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_config({"clients": clients}, "relay.toml")
    message = str(info.value)
    assert message.startswith("relay.toml: ")
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_good_clients_table() -> None:
    """The counterpart of the cases above: each bad one differs from a table that works."""
    clients = [{"name": "laptop", "tripcode": CODE_A, "allow": ["srv:ssh", "srv2:*"]},
               {"name": "phone", "tripcode": CODE_B, "allow": []}]
    cfg = parse_relay_config({"clients": clients}, "relay.toml")
    assert cfg.clients["laptop"].may_reach("srv", "ssh")
    assert cfg.clients["laptop"].may_reach("srv2", "anything")
    assert not cfg.clients["laptop"].may_reach("srv", "http")
    assert not cfg.clients["phone"].may_reach("srv", "ssh")
