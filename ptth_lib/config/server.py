"""ptth_server's config (ptth_server.toml): its keys, `ServerConfig`, loading it, and a generated key.

With no api_key anywhere, the server generates one and writes it into the
user's file where TOML keeps top-level keys (tomlkit keeps the file's
comments and layout), only after everything else has been checked.
ptth_quic_end_server.py reads the same file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Comment, Table

from ptth_lib.config.keys import (
    DEFAULT_QUIC_MAX_DATAGRAM_SIZE,
    REQUIRED,
    Key,
    QuicRelayTarget,
    apply_keys,
    check_forwarded_ports,
    check_key,
    check_max_datagram_size,
    check_name,
    check_url,
    check_web_app_url,
    must,
    normalize_fingerprint,
    parse_address,
    quic_target,
    read_toml,
    write_atomically,
)
from ptth_lib.errors import ConfigError
from ptth_lib.wire import tripcode

SERVER_KEYS = (
    Key("name", str, REQUIRED, "the name this server registers under at the relay", check_name),
    Key("api_key", str, None, "secret key; only its tripcode goes in the relay config", check_key),
    Key("relay_url", str, REQUIRED, "base URL of the relay, e.g. http://127.0.0.1:4000", check_url),
    Key("display_name", str, None, "the name the file browser's pages show (default: name)"),
    Key("file_server_root", str, None, "folder served under /files/ (this, web_app_url, or both)"),
    Key("web_app_url", str, None, "a local web app every other request goes to, e.g. http://127.0.0.1:8080",
        check_web_app_url),
    Key("forwarded_ports", dict, {}, "[forwarded_ports] table: port name = \"HOST:PORT\" clients may reach",
         check_forwarded_ports),
    Key("quic", dict, None, "[quic] table: also serve the forwarded ports through a QUIC relay "
         "(relay, relay_fingerprint or ca_file)"),
)


QUIC_SERVER_KEYS = (
    Key("relay", str, REQUIRED, "the QUIC relay's HOST:PORT (UDP), e.g. relay.example.com:30380",
         lambda v: None if parse_address(v) else "must be HOST:PORT, e.g. relay.example.com:30380"),
    Key("relay_fingerprint", str, None, "SHA-256 of the relay's certificate, as ptth_quic_relay.py prints it",
         lambda v: None if normalize_fingerprint(v) else "must be 64 hex digits (colons allowed), as "
         "ptth_quic_relay.py prints it"),
    Key("ca_file", str, None, "CA certificates (PEM) to check the relay's certificate with, instead of a "
         "fingerprint"),
    Key("max_datagram_size", int, DEFAULT_QUIC_MAX_DATAGRAM_SIZE, "the largest QUIC packet (UDP payload) sent "
         "to the relay, in bytes", check_max_datagram_size),
)


@dataclass(frozen=True)
class ServerConfig:
    name: str
    api_key: str | None
    relay_url: str
    display_name: str | None = None  # for people, in the file browser's pages; `name` if unset
    # What the server serves: a folder under /files/, a web app, or both (then the app gets
    # every request outside /files/). load_server_config refuses neither.
    file_server_root: str | None = None
    web_app_url: str | None = None
    # port name -> (host, port): the only places the server ever connects to for a client
    forwarded_ports: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    quic: QuicRelayTarget | None = None


def parse_server_config(raw: Mapping[str, Any], where: str) -> ServerConfig:
    """Validate a server config (file contents merged with flags)."""
    values = apply_keys(SERVER_KEYS, raw, where)
    ports = values.pop("forwarded_ports")
    quic_raw = values.pop("quic")
    quic = None
    if quic_raw is not None:
        q = apply_keys(QUIC_SERVER_KEYS, quic_raw, f"{where}: [quic]")
        quic = quic_target(q["relay"], q["relay_fingerprint"], q["ca_file"],
                            f"{where}: [quic] needs relay_fingerprint (as ptth_quic_relay.py prints it) or "
                            "ca_file, to know the relay is the right one", q["max_datagram_size"])
    return ServerConfig(**values, forwarded_ports={name: must(parse_address(a)) for name, a in ports.items()},
                        quic=quic)


# Environment variable that may hold the server's API key instead of the file.
API_KEY_ENV = "PTTH_API_KEY"


def load_server_config(path: str | os.PathLike[str], overrides: Mapping[str, Any],
                       serves_files: bool = True) -> tuple[ServerConfig, str]:
    """Read the server config file, apply flags and the environment, validate.

    `overrides` holds command-line values (None for flags not given). The API
    key may come from the environment variable PTTH_API_KEY; if it is found
    nowhere, one is generated and saved in the file (see `_save_new_key`),
    but only once everything else has been checked, so a config that is
    refused is never written. With `serves_files` (ptth_server), that includes
    that it serves something (`file_server_root`, `web_app_url` or both) and
    that `file_server_root`, if set, is a folder, and not one that holds a
    config file with a key in it (see `_check_root`).
    Returns the config and where its key came from: "file", "env" or "generated".
    """
    raw = read_toml(path)
    # The file holds a key even when $PTTH_API_KEY overrides it: what matters
    # for _check_root is whether the file could give a key away.
    key_in_file = "api_key" in raw
    raw.update({k: v for k, v in overrides.items() if v is not None})
    env_key = os.environ.get(API_KEY_ENV, "").strip()
    where = str(path)
    source = "file"
    if env_key:
        source = "env"
        raw["api_key"] = env_key
        where = f"{path} (api_key from ${API_KEY_ENV})"
    cfg = parse_server_config(raw, where)
    if serves_files:
        check_serves_something(cfg, str(path))
        if cfg.file_server_root is not None:
            _check_root(cfg.file_server_root, path, key_in_file=key_in_file or cfg.api_key is None)
    if cfg.api_key is None:
        cfg = replace(cfg, api_key=_save_new_key(path))
        source = "generated"
    return cfg, source


def check_serves_something(config: ServerConfig, where: str) -> None:
    """ptth_server needs a folder, a web app or both to serve; with neither it would answer only 404s."""
    if config.file_server_root is None and config.web_app_url is None:
        raise ConfigError(f"{where}: nothing to serve: set file_server_root (a folder, e.g. \"./data\"), "
                          "web_app_url (a local web app, e.g. \"http://127.0.0.1:8080\"), or both "
                          "(or --file-server-root / --web-app-url)")


def _check_root(root: str, config_path: str | os.PathLike[str], key_in_file: bool) -> None:
    """The root must be a folder, and must not hold the config file if that has (or gets) a key."""
    if not Path(root).is_dir():
        raise ConfigError(f"file_server_root {root!r} is not a folder: create it or "
                          "point file_server_root (or --file-server-root) at the folder to serve")
    if key_in_file and Path(config_path).resolve().is_relative_to(Path(root).resolve()):
        raise ConfigError(f"{config_path} holds the API key and lies inside file_server_root "
                          f"{root!r}, so anyone could download it: move one of them")


_GENERATED_KEY_COMMENT = "# Generated by ptth_server.py. Keep it secret: it proves this server's name.\n"


def _save_new_key(path: str | os.PathLike[str]) -> str:
    """Write a fresh API key into the config file, as a top-level key, and make the file private.

    The file is replaced whole (a temporary file renamed over it), so a
    failure leaves it as it was.
    """
    key = tripcode.generate_key()
    real = os.path.realpath(path)  # a symlinked config keeps its link; the file it points to changes
    try:
        with open(real, encoding="utf-8", newline="") as f:  # newline="": CRLF files stay CRLF
            new_text = _with_top_level_key(f.read(), "api_key", key)
        if new_text is None:
            raise ConfigError(f"{path}: no api_key, and cannot tell where to add a generated one: add "
                              f"api_key = \"...\" (20+ random characters) above the first [table] by hand")
        write_atomically(real, new_text)
    except OSError as e:
        raise ConfigError(f"{path}: no api_key, and cannot save a generated one: {e.strerror}") from None
    return key


def _with_top_level_key(text: str, name: str, value: str) -> str | None:
    """`text` with `name = "value"` added where TOML keeps top-level keys: before the first table.

    It goes after the last top-level key, or after a commented-out `# name = ...`
    placeholder (as in the example config) if that comes later; every other
    byte of `text` stays as it was. tomlkit, which keeps comments and layout,
    finds the place. None if the result would not mean exactly `text` plus the key.
    """
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError:
        return None
    head = tomlkit.document()  # the top-level items before the first table, rendered as in `text`
    cut = 0
    for key, item in doc.body:
        if isinstance(item, (Table, AoT)) and _renders_a_header(key, item):
            break  # a dotted key (a.b = 1) is a Table too, but written as a key
        if key is None:
            head.add(item)
        else:
            head.add(key, item)
        if key is not None or (isinstance(item, Comment)
                               and item.as_string().lstrip("# \t").startswith(f"{name} =")):
            cut = len(head.as_string())
    if not text.startswith(head.as_string()):
        return None
    before = text[:cut]
    if before and not before.endswith("\n"):
        before += "\n"  # the last line had no newline
    new_text = f"{before}{_GENERATED_KEY_COMMENT}{name} = {tomlkit.string(value).as_string()}\n{text[cut:]}"
    try:
        means_the_same = tomllib.loads(new_text) == {**tomllib.loads(text), name: value}
    except tomllib.TOMLDecodeError:
        means_the_same = False
    return new_text if means_the_same else None


def _renders_a_header(key: Any, item: Table | AoT) -> bool:
    """Tell whether a tomlkit table is written as `[name]` or `[[name]]` rather than as dotted keys."""
    alone = tomlkit.document()
    alone.add(key, item)
    return alone.as_string().lstrip().startswith("[")


def load_quic_end_server_config(path: str) -> ServerConfig:
    """ptth_quic_end_server's settings: ptth_server's config, which must have [quic] and [forwarded_ports]."""
    config, _ = load_server_config(path, {}, serves_files=False)  # no file_server_root nor web_app_url
    if config.quic is None:
        raise ConfigError(f"{path}: no [quic] table: add relay and relay_fingerprint (or ca_file)")
    if not config.forwarded_ports:
        raise ConfigError(f"{path}: no [forwarded_ports]: nothing to serve")
    return config
