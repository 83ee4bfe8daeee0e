"""ptth_client's settings (and its QUIC alias's): keys, `ClientConfig`, loading them, the client's key.

relay_url forwards over HTTP; quic_relay (with relay_fingerprint or
ca_file, and name) over QUIC. The key never comes from the command line:
from $PTTH_CLIENT_API_KEY or from the file api_key_file names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ptth_lib.config.keys import (
    REQUIRED,
    Forward,
    Key,
    QuicRelayTarget,
    apply_keys,
    check_forward_specs,
    check_known,
    check_name,
    check_url,
    must,
    parse_forward,
    quic_target,
    read_toml,
)
from ptth_lib.config.server import QUIC_SERVER_KEYS
from ptth_lib.errors import ConfigError
from ptth_lib.wire import tripcode

_RELAY_FINGERPRINT, _CA_FILE, _MAX_DATAGRAM_SIZE = QUIC_SERVER_KEYS[1:]


_API_KEY_FILE = Key("api_key_file", str, None, "file holding the client's API key (or set $PTTH_CLIENT_API_KEY)")


_BIND = Key("bind", str, "127.0.0.1", "address the local ports are bound on")


_FORWARD = Key("forward", list, [], "LOCALPORT:SERVER:PORTNAME entries, one per local port", check_forward_specs)


# ptth_client: relay_url forwards over HTTP, quic_relay (with relay_fingerprint or ca_file, and name) over QUIC.
CLIENT_KEYS = (
    Key("relay_url", str, None, "base URL of the relay, e.g. http://127.0.0.1:4000: forward over HTTP",
         check_url),
    Key("quic_relay", str, None, "or the QUIC relay's HOST:PORT (UDP), e.g. relay.example.com:30380: "
         "forward over QUIC", QUIC_SERVER_KEYS[0].check),
    _RELAY_FINGERPRINT,
    _CA_FILE,
    Key("name", str, None, "over QUIC: this client's name in the relay's [[clients]]", check_name),
    Key("quic_max_datagram_size", _MAX_DATAGRAM_SIZE.type, _MAX_DATAGRAM_SIZE.default,
        "over QUIC: " + _MAX_DATAGRAM_SIZE.doc, _MAX_DATAGRAM_SIZE.check),
    _API_KEY_FILE,
    _BIND,
    _FORWARD,
)


# The keys of ptth_quic_client.py, the older QUIC-only alias: `relay` is ptth_client's quic_relay.
QUIC_CLIENT_KEYS = (
    QUIC_SERVER_KEYS[0], _RELAY_FINGERPRINT, _CA_FILE,
    Key("name", str, REQUIRED, "this client's name in the relay's [[clients]]", check_name),
    _API_KEY_FILE, _BIND, _FORWARD, _MAX_DATAGRAM_SIZE,
)


@dataclass(frozen=True)
class ClientConfig:
    """ptth_client's settings: exactly one of relay_url (over HTTP) and quic (over QUIC)."""

    api_key: str
    bind: str
    forwards: tuple[Forward, ...]
    relay_url: str | None = None
    quic: QuicRelayTarget | None = None
    name: str = ""  # over QUIC: the client's [[clients]] name (the HTTP relay knows it by its key)


# Environment variable that may hold ptth_client's API key instead of a file.
CLIENT_API_KEY_ENV = "PTTH_CLIENT_API_KEY"


def load_client_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any],
                       forwards_required: bool = True) -> ClientConfig:
    """ptth_client's settings: the config file (if any), then flags, then the key.

    `overrides` holds command-line values (None or [] for flags not given);
    --forward flags replace the file's list (which the desktop app, not
    `forwards_required`, may leave empty). The key comes from
    $PTTH_CLIENT_API_KEY or from the file named by api_key_file, never from argv.
    relay_url means forwarding over HTTP; quic_relay over QUIC, which needs
    relay_fingerprint or ca_file, and name.
    """
    raw, where = _client_raw(path, overrides)
    check_known(CLIENT_KEYS, raw, where)
    if "relay_url" not in raw and "quic_relay" not in raw:
        raise ConfigError(f"{where}: no relay URL: give --relay-url URL or relay_url in --config FILE "
                          "(or --quic-relay HOST:PORT, to forward over QUIC)")
    if "relay_url" in raw and "quic_relay" in raw:
        raise ConfigError(f"{where}: give relay_url (forwarding over HTTP) or quic_relay (over QUIC), not both")
    values = apply_keys(CLIENT_KEYS, raw, where)
    if values["relay_url"] is not None:
        quic_only = [k for k in ("relay_fingerprint", "ca_file", "name") if values[k] is not None]
        if quic_only:
            raise ConfigError(f"{where}: {quic_only[0]!r} is for quic_relay only (relay_url forwards over HTTP)")
        forwards = _forwards(values["forward"], where, forwards_required)  # before the key: mistakes come first
        return ClientConfig(read_client_key(values["api_key_file"], where), values["bind"], forwards,
                            relay_url=values["relay_url"])
    return _quic_client_config(values, values["quic_relay"], where, forwards_required)


def load_quic_client_config(path: str | None, overrides: Mapping[str, Any]) -> ClientConfig:
    """ptth_quic_client's settings (QUIC_CLIENT_KEYS: `relay` for quic_relay), as load_client_config."""
    raw, where = _client_raw(path, overrides)
    check_known(QUIC_CLIENT_KEYS, raw, where)
    for key, flag in (("relay", "--relay HOST:PORT"), ("name", "--name NAME")):
        if key not in raw:
            raise ConfigError(f"{where}: no {key}: give {flag} or {key} in --config FILE")
    values = apply_keys(QUIC_CLIENT_KEYS, raw, where)
    return _quic_client_config(values, values["relay"], where)


def _client_raw(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    raw = read_toml(path) if path is not None else {}
    raw.update({k: v for k, v in overrides.items() if v})
    return raw, str(path) if path is not None else "command line"


def _quic_client_config(values: Mapping[str, Any], relay: str, where: str,
                        forwards_required: bool = True) -> ClientConfig:
    size = values["quic_max_datagram_size"] if "quic_max_datagram_size" in values else values["max_datagram_size"]
    target = quic_target(relay, values["relay_fingerprint"], values["ca_file"],
                          f"{where}: give relay_fingerprint (--relay-fingerprint, as ptth_quic_relay.py printed it) "
                          "or ca_file (--ca-file), to know the relay is the right one", size)
    if values["name"] is None:
        raise ConfigError(f"{where}: no name: give --name NAME or name in --config FILE (this client's "
                          "[[clients]] name at the relay)")
    forwards = _forwards(values["forward"], where, forwards_required)
    return ClientConfig(read_client_key(values["api_key_file"], where), values["bind"], forwards, quic=target,
                        name=values["name"])


def _forwards(specs: list[str], where: str, required: bool = True) -> tuple[Forward, ...]:
    forwards = tuple(must(parse_forward(spec)) for spec in specs)
    if not forwards and required:
        raise ConfigError(f"{where}: nothing to forward: give --forward LOCALPORT:SERVER:PORTNAME "
                          "(or forward = [...] in the config file)")
    ports = [f.local_port for f in forwards if f.local_port]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"{where}: a local port is forwarded twice in {specs}")
    return forwards


def read_client_key(key_file: str | None, where: str) -> str:
    """ptth_client's key: from $PTTH_CLIENT_API_KEY, else from `key_file`; checked for strength."""
    key = os.environ.get(CLIENT_API_KEY_ENV, "").strip()
    if not key:
        if key_file is None:
            raise ConfigError(f"{where}: no API key: give --api-key-file FILE (make one with "
                              f"ptth_client.py --new-key FILE) or set ${CLIENT_API_KEY_ENV}")
        key = _read_key_file(key_file)
    if not tripcode.is_sendable(key):
        raise ConfigError("the client API key must be printable ASCII with no spaces "
                          "(ptth_client.py --new-key FILE makes one)")
    if not tripcode.is_strong(key):
        raise ConfigError(f"the client API key is too weak: use at least {tripcode.MIN_API_KEY_CHARS} "
                          "random characters (ptth_client.py --new-key FILE makes one)")
    return key


def _read_key_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: API key file not found: make one with "
                          f"ptth_client.py --new-key {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the API key file: {getattr(e, 'strerror', None) or e}") from None
    if not key or "\n" in key:
        raise ConfigError(f"{path}: the API key file must hold one line, the key")
    return key


def write_new_key_file(path: str) -> str:
    """Create `path` (mode 0600, never overwriting) holding a fresh API key; return the key."""
    key = tripcode.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: choose another file, or use that key") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the key file: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    return key
