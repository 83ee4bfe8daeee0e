"""Tests for the client program's settings (config.load_client_config, load_quic_client_config).

ptth_client forwards over HTTP with `relay_url` and over QUIC with
`quic_relay` (plus `relay_fingerprint` or `ca_file`, and `name`);
ptth_quic_client, the alias, names the QUIC relay `relay`. In-process: the
command line's wording of the same errors is in tests/e2e/test_client_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ptth_lib.config import (
    ClientConfig,
    Forward,
    QuicRelayTarget,
    load_client_config,
    load_quic_client_config,
    load_quic_end_server_config,
)
from ptth_lib.errors import ConfigError

KEY = "a-strong-client-key-0123456789abcdef"
FINGERPRINT = "3f" * 32


@pytest.fixture(autouse=True)
def client_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTTH_CLIENT_API_KEY", KEY)


def flags(**given: Any) -> dict[str, Any]:
    """Every ptth_client flag, None unless given (as argparse leaves them)."""
    names = ("relay_url", "quic_relay", "relay_fingerprint", "ca_file", "name", "api_key_file", "bind", "forward")
    return {n: given.get(n) for n in names}


def test_relay_url_means_http() -> None:
    config = load_client_config(None, flags(relay_url="https://relay.example.com", forward=["2200:alpha:ssh"]))
    assert config == ClientConfig(KEY, "127.0.0.1", (Forward(2200, "alpha", "ssh"),),
                                  relay_url="https://relay.example.com")


def test_quic_relay_means_quic() -> None:
    config = load_client_config(None, flags(quic_relay="relay.example.com:30380",
                                            relay_fingerprint=f"SHA256:{FINGERPRINT.upper()}", name="laptop",
                                            forward=["30381:alpha:ssh"]))
    assert config.relay_url is None and config.name == "laptop"
    assert config.quic == QuicRelayTarget("relay.example.com", 30380, FINGERPRINT, None)


def test_quic_relay_from_a_file_with_a_ca_file(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text('quic_relay = "[::1]:30380"\nca_file = "/etc/ssl/ca.pem"\nname = "laptop"\n'
                    'forward = ["0:alpha:ssh"]\nbind = "::1"\n')
    config = load_client_config(path, flags())
    assert config.quic == QuicRelayTarget("::1", 30380, None, "/etc/ssl/ca.pem") and config.bind == "::1"


@pytest.mark.parametrize(("given", "words"), [
    ({}, ["no relay URL", "--relay-url", "--quic-relay"]),
    ({"relay_url": "http://127.0.0.1:4000", "quic_relay": "127.0.0.1:30380"}, ["not both"]),
    ({"relay_url": "http://127.0.0.1:4000", "name": "laptop"}, ["'name'", "quic_relay only"]),
    ({"relay_url": "http://127.0.0.1:4000", "relay_fingerprint": FINGERPRINT}, ["'relay_fingerprint'"]),
    ({"quic_relay": "127.0.0.1:30380", "name": "laptop"}, ["relay_fingerprint", "--relay-fingerprint",
                                                          "ca_file"]),
    ({"quic_relay": "127.0.0.1:30380", "relay_fingerprint": FINGERPRINT}, ["no name", "--name"]),
    ({"quic_relay": "127.0.0.1", "relay_fingerprint": FINGERPRINT, "name": "x"}, ["'quic_relay'", "HOST:PORT"]),
    ({"quic_relay": "127.0.0.1:30380", "relay_fingerprint": "abc", "name": "x"}, ["'relay_fingerprint'",
                                                                                  "64 hex digits"]),
    ({"quic_relay": "127.0.0.1:30380", "relay_fingerprint": FINGERPRINT, "name": "a b"}, ["'name'"]),
], ids=["neither", "both", "name-with-http", "fingerprint-with-http", "no-fingerprint", "no-name", "no-port",
        "bad-fingerprint", "bad-name"])
def test_transport_mistakes_are_one_line(given: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_client_config(None, flags(forward=["0:alpha:ssh"], **given))
    message = str(caught.value)
    assert message.startswith("command line: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_the_alias_calls_the_quic_relay_relay(tmp_path: Path) -> None:
    path = tmp_path / "ptth_quic_client.toml"
    path.write_text(f'relay = "127.0.0.1:30380"\nrelay_fingerprint = "{FINGERPRINT}"\nname = "laptop"\n'
                    'forward = ["30381:alpha:ssh"]\n')
    config = load_quic_client_config(str(path), {"relay": None, "forward": None})
    assert config == ClientConfig(KEY, "127.0.0.1", (Forward(30381, "alpha", "ssh"),),
                                  quic=QuicRelayTarget("127.0.0.1", 30380, FINGERPRINT, None), name="laptop")
    path.write_text('quic_relay = "127.0.0.1:30380"\n')  # ptth_client's name is not the alias's
    with pytest.raises(ConfigError, match="unknown key 'quic_relay'"):
        load_quic_client_config(str(path), {})


@pytest.mark.parametrize(("missing", "words"), [("relay", ["no relay", "--relay HOST:PORT"]),
                                                 ("name", ["no name", "--name NAME"])])
def test_the_alias_names_its_own_flags(missing: str, words: list[str]) -> None:
    given = {"relay": "127.0.0.1:30380", "relay_fingerprint": FINGERPRINT, "name": "laptop",
             "forward": ["0:a:b"]}
    del given[missing]
    with pytest.raises(ConfigError) as caught:
        load_quic_client_config(None, given)
    for word in words:
        assert word in str(caught.value)


def test_the_end_server_needs_quic_and_forwarded_ports(tmp_path: Path) -> None:
    path = tmp_path / "ptth_server.toml"
    base = 'name = "alpha"\napi_key = "a-strong-server-key-0123456789"\nrelay_url = "http://127.0.0.1:1/"\n'
    path.write_text(base)
    with pytest.raises(ConfigError, match=r"no \[quic\] table"):
        load_quic_end_server_config(str(path))
    path.write_text(base + f'[quic]\nrelay = "127.0.0.1:30380"\nrelay_fingerprint = "{FINGERPRINT}"\n')
    with pytest.raises(ConfigError, match=r"no \[forwarded_ports\]"):
        load_quic_end_server_config(str(path))
    path.write_text(base + '[forwarded_ports]\nssh = "127.0.0.1:22"\n'
                    f'[quic]\nrelay = "127.0.0.1:30380"\nrelay_fingerprint = "{FINGERPRINT}"\n')
    config = load_quic_end_server_config(str(path))
    assert config.quic == QuicRelayTarget("127.0.0.1", 30380, FINGERPRINT, None)
    assert dict(config.forwarded_ports) == {"ssh": ("127.0.0.1", 22)}


# ---- mistakes in --forward and in the config file (one-line errors; tests/e2e/test_client_cli.py runs
# ---- ptth_client.py on one of each, for the exit code and the line on stderr) -------------------------

MALFORMED_FORWARDS = ["", "2200", "2200:alpha", "2200:alpha:echo:extra", ":alpha:echo", "x22:alpha:echo",
                      "70000:alpha:echo", "65536:alpha:echo", "2200::echo", "2200:a b:echo", "2200:al/pha:echo",
                      "2200:-alpha:echo", "2200:" + "a" * 65 + ":echo", "2200:alpha:", "2200:alpha:e.cho",
                      "2200:alpha:e cho", "2200:alpha:*", "2200:alpha:" + "p" * 65]


def one_line(caught: pytest.ExceptionInfo[ConfigError]) -> str:
    """The error as ptth_client prints it: one line, short enough to read."""
    line = f"ptth_client: {caught.value}"
    assert "\n" not in line and "\r" not in line and len(line) < 400, line
    return line


@pytest.mark.parametrize("spec", MALFORMED_FORWARDS, ids=lambda s: repr(s)[:40])
def test_malformed_forward(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_client_config(None, flags(relay_url="http://127.0.0.1:4000", forward=[spec]))
    line = one_line(caught)
    assert repr(spec) in line, "the message names the bad entry"
    assert "LOCALPORT:SERVER:PORTNAME" in line


@pytest.mark.parametrize("specs", [
    ["2200:alpha:echo", "2200:alpha:ssh"],
    ["2200:alpha:echo", "2201:beta:echo", "2200:beta:ssh"],
    ["2200:alpha:echo", "02200:alpha:ssh"],
])
def test_same_local_port_twice(specs: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_client_config(None, flags(relay_url="http://127.0.0.1:4000", forward=specs))
    assert "twice" in one_line(caught)


def test_port_zero_twice_is_fine() -> None:
    """0 means any free port, so it may appear more than once."""
    config = load_client_config(None, flags(relay_url="http://127.0.0.1:4000", forward=["0:alpha:echo",
                                                                                      "0:alpha:ssh"]))
    assert [(f.local_port, f.port) for f in config.forwards] == [(0, "echo"), (0, "ssh")]


BAD_CONFIG_FILES = [
    ('relay_url = "http://127.0.0.1:4000"\nbnd = "127.0.0.1"\n', ["bnd", "unknown", "bind"]),
    ('relay_url = "http://127.0.0.1:4000"\nforwards = ["0:alpha:echo"]\n', ["forwards", "unknown"]),
    ('relay_url = "http://127.0.0.1:4000"\napi_key = "do-not-put-keys-here-0123456789"\n',
     ["api_key", "unknown"]),
    ('relay_url = "http://127.0.0.1:4000"\nforward = "0:alpha:echo"\n', ["forward", "list"]),
    ('relay_url = "http://127.0.0.1:4000"\nforward = [2200]\n', ["forward", "2200"]),
    ('relay_url = "http://127.0.0.1:4000"\nforward = ["2200:alpha"]\n', ["forward", "'2200:alpha'"]),
    ('relay_url = "http://127.0.0.1:4000"\nforward = []\n', ["nothing to forward"]),
    ('relay_url = 4000\nforward = ["0:alpha:echo"]\n', ["relay_url", "string"]),
    ('relay_url = "ftp://127.0.0.1:4000"\nforward = ["0:alpha:echo"]\n', ["relay_url", "http://"]),
    ('relay_url = "http://127.0.0.1:4000"\nbind = 127\nforward = ["0:alpha:echo"]\n', ["bind", "string"]),
    ('relay_url = "http://127.0.0.1:4000"\napi_key_file = 5\nforward = ["0:alpha:echo"]\n',
     ["api_key_file", "string"]),
    ('forward = ["0:alpha:echo"]\n', ["relay URL"]),
]
BAD_CONFIG_IDS = ["typo", "forwards", "api_key", "forward-string", "forward-number", "forward-short",
                  "forward-empty", "url-number", "url-ftp", "bind-number", "key-file-number", "no-url"]


@pytest.mark.parametrize(("text", "words"), BAD_CONFIG_FILES, ids=BAD_CONFIG_IDS)
def test_bad_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, words: list[str]) -> None:
    monkeypatch.delenv("PTTH_CLIENT_API_KEY")  # as run from a shell without a key: the file is at fault
    path = tmp_path / "client.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_client_config(str(path), flags())
    line = one_line(caught)
    assert str(path) in line
    assert "do-not-put-keys-here-0123456789" not in line, "the key must never be printed"
    for word in words:
        assert word in line, (word, line)
