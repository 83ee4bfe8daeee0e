"""Config files: TOML in, frozen dataclasses out, every key declared once.

Each key is declared in one table below with its type, default, check and a
one-line doc; `tests/test_config.py` checks that `conf/*.example.toml` shows
every key. Unknown keys are errors, so a typo never silently falls back to a
default. Errors are `ConfigError` with one line naming the file and the key.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Comment, Table

from ptth_lib.errors import ConfigError
from ptth_lib.relay import trust
from ptth_lib.wire import tripcode

# Server names appear in URL paths unescaped, so keep them to URL-safe characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,63}\Z")

# Forwarded port names (the spec's opaque server ports) are URL path segments too.
PORT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")

_REQUIRED = object()

_TYPE_NAMES: dict[Any, str] = {
    str: "string", bool: "boolean (true or false)", list: "list of tables", dict: "table",
    (int, float): "number", (datetime, date): "TOML date-time such as 2026-12-31T00:00:00Z",
}


@dataclass(frozen=True)
class _Key:
    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _check_name(value: str) -> str | None:
    if _NAME_RE.match(value):
        return None
    return "must be 1-64 characters of A-Z a-z 0-9 . _ ~ - (it is part of URLs)"


def _check_label(value: str) -> str | None:
    if 0 < len(value) <= 64 and value.isprintable():
        return None
    return "must be 1-64 printable characters"


def _check_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        parts = None
    if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
        return None
    return "must be an http:// or https:// URL such as http://127.0.0.1:4000"


def _check_tripcode(value: str) -> str | None:
    if tripcode.is_valid(value):
        return None
    return "must be a tripcode (44 characters of base64, from ptth_server.py --print-tripcode)"


def _check_timeout(value: float) -> str | None:
    if 1 <= value <= 3600:
        return None
    return "must be a number of seconds from 1 to 3600"


def _check_listen_timeout(value: float) -> str | None:
    # ptth_server waits 330 s for a listen answer (server_loop.LISTEN_READ_TIMEOUT_SECS).
    if 1 <= value <= 300:
        return None
    return "must be a number of seconds from 1 to 300"


def _check_idle_timeout(value: float) -> str | None:
    if value == 0 or 10 <= value <= 7 * 24 * 3600:
        return None
    return "must be 0 (never) or a number of seconds from 10 to 604800 (a week)"


def _check_port_name(value: str) -> str | None:
    if PORT_NAME_RE.match(value):
        return None
    return "must be 1-64 characters of A-Z a-z 0-9 _ - (it is part of URLs)"


def _check_forwarded_ports(value: dict[str, Any]) -> str | None:
    for name, address in value.items():
        if _check_port_name(name):
            return f"has a bad port name {name!r}: {_check_port_name(name)}"
        if not isinstance(address, str) or parse_address(address) is None:
            return f"{name!r} must be a string HOST:PORT such as \"127.0.0.1:22\", not {address!r}"
    return None


def _check_allow(value: list[Any]) -> str | None:
    for entry in value:
        server, sep, port = entry.partition(":") if isinstance(entry, str) else ("", "", "")
        if not sep or _check_name(server) or (port != "*" and _check_port_name(port)):
            return f"has {entry!r}: each entry must be \"SERVER:PORTNAME\" or \"SERVER:*\""
    return None


def _check_forward_specs(value: list[Any]) -> str | None:
    for entry in value:
        if not isinstance(entry, str) or parse_forward(entry) is None:
            return f"has {entry!r}: each entry must be \"LOCALPORT:SERVER:PORTNAME\", e.g. \"2200:myserver:ssh\""
    return None


def _check_networks(value: list[Any]) -> str | None:
    if not all(isinstance(v, str) for v in value):
        return "must be a list of strings such as [\"127.0.0.1/32\", \"::1/128\"]"
    try:
        trust.parse_networks(value)
    except ValueError as e:
        return f"has {e}"
    return None


def _check_requests_per_address(value: int) -> str | None:
    if 1 <= value <= 10_000:
        return None
    return "must be a whole number from 1 to 10000"


def _check_key(value: str) -> str | None:
    if not tripcode.is_sendable(value):
        return "must be printable ASCII with no spaces (it travels in an HTTP header)"
    if tripcode.is_strong(value):
        return None
    return (
        f"is too weak: use at least {tripcode.MIN_API_KEY_CHARS} random characters "
        "(delete the line and ptth_server.py will generate one)"
    )


SERVER_KEYS = (
    _Key("name", str, _REQUIRED, "the name this server registers under at the relay", _check_name),
    _Key("api_key", str, None, "secret key; only its tripcode goes in the relay config", _check_key),
    _Key("relay_url", str, _REQUIRED, "base URL of the relay, e.g. http://127.0.0.1:4000", _check_url),
    _Key("file_server_root", str, "./data", "folder served under /files/"),
    _Key("forwarded_ports", dict, {}, "[forwarded_ports] table: port name = \"HOST:PORT\" clients may reach",
         _check_forwarded_ports),
    _Key("quic", dict, None, "[quic] table: also serve the forwarded ports through a QUIC relay "
         "(relay, relay_fingerprint or ca_file)"),
)

QUIC_SERVER_KEYS = (
    _Key("relay", str, _REQUIRED, "the QUIC relay's HOST:PORT (UDP), e.g. relay.example.com:30380",
         lambda v: None if parse_address(v) else "must be HOST:PORT, e.g. relay.example.com:30380"),
    _Key("relay_fingerprint", str, None, "SHA-256 of the relay's certificate, as ptth_quic_relay.py prints it",
         lambda v: None if normalize_fingerprint(v) else "must be 64 hex digits (colons allowed), as "
         "ptth_quic_relay.py prints it"),
    _Key("ca_file", str, None, "CA certificates (PEM) to check the relay's certificate with, instead of a "
         "fingerprint"),
)
_RELAY_FINGERPRINT, _CA_FILE = QUIC_SERVER_KEYS[1:]
_API_KEY_FILE = _Key("api_key_file", str, None, "file holding the client's API key (or set $PTTH_CLIENT_API_KEY)")
_BIND = _Key("bind", str, "127.0.0.1", "address the local ports are bound on")
_FORWARD = _Key("forward", list, [], "LOCALPORT:SERVER:PORTNAME entries, one per local port", _check_forward_specs)

# ptth_client: relay_url forwards over HTTP, quic_relay (with relay_fingerprint or ca_file, and name) over QUIC.
CLIENT_KEYS = (
    _Key("relay_url", str, None, "base URL of the relay, e.g. http://127.0.0.1:4000: forward over HTTP",
         _check_url),
    _Key("quic_relay", str, None, "or the QUIC relay's HOST:PORT (UDP), e.g. relay.example.com:30380: "
         "forward over QUIC", QUIC_SERVER_KEYS[0].check),
    _RELAY_FINGERPRINT,
    _CA_FILE,
    _Key("name", str, None, "over QUIC: this client's name in the relay's [[clients]]", _check_name),
    _API_KEY_FILE,
    _BIND,
    _FORWARD,
)
# The keys of ptth_quic_client.py, the older QUIC-only alias: `relay` is ptth_client's quic_relay.
QUIC_CLIENT_KEYS = (
    QUIC_SERVER_KEYS[0], _RELAY_FINGERPRINT, _CA_FILE,
    _Key("name", str, _REQUIRED, "this client's name in the relay's [[clients]]", _check_name),
    _API_KEY_FILE, _BIND, _FORWARD,
)

RELAY_KEYS = (
    _Key("listen_timeout_secs", (int, float), 30, "how long a server's listen waits before 204",
         _check_listen_timeout),
    _Key("request_timeout_secs", (int, float), 30, "how long a client waits for a server to answer", _check_timeout),
    _Key("servers", list, [], "[[servers]] tables: name, tripcode, optional display_name"),
    _Key("server_tripcodes", dict, {}, "older form: a table of name = tripcode"),
    _Key("enable_scraper_api", bool, False, "serve the scraper API under /scraper/ (else 404)"),
    _Key("scraper_keys", list, [], "[[scraper_keys]] tables: name, hash, optional not_before, not_after"),
    _Key("metrics", bool, True, "serve Prometheus metrics at /metrics"),
    _Key("audit_log", str, None, "file to append audit events to, as JSON lines (default: off)"),
    _Key("trust_x_forwarded_for", bool, False,
         "older form of trusted_proxies = [\"127.0.0.1/32\", \"::1/128\"] (a proxy on this machine)"),
    _Key("trusted_proxies", list, [], "addresses of proxies in front (nginx) whose X-Forwarded-For is "
         "believed, e.g. [\"127.0.0.1/32\"]", _check_networks),
    _Key("operator_addresses", list, ["127.0.0.1/32", "::1/128"], "client addresses served /metrics, "
         "/frontend/audit_log and /frontend/unregistered_servers ([] for nobody)", _check_networks),
    _Key("servers_alias", bool, True, "redirect the spec's older /servers/NAME/... URLs to "
         "/frontend/servers/NAME/... (false: 404)"),
    _Key("requests_per_address", int, 16, "requests one client address (an IPv6 /64) may have in flight "
         "at one server; more wait their turn at the relay", _check_requests_per_address),
    _Key("clients", list, [], "[[clients]] tables for TCP port forwarding: name, tripcode, allow"),
    _Key("quic_bind", str, "0.0.0.0:30380", "UDP HOST:PORT for ptth_quic_relay.py (port 0: any free port)",
         lambda v: None if parse_address(v.removesuffix(":0") + ":1" if v.endswith(":0") else v)
         else "must be HOST:PORT, e.g. 0.0.0.0:30380"),
    _Key("quic_cert_file", str, "ptth_quic_relay.crt", "ptth_quic_relay.py's certificate (PEM); made on first start"),
    _Key("quic_key_file", str, "ptth_quic_relay.key", "its private key (PEM, mode 0600); made on first start"),
    _Key("tcp_idle_timeout_secs", (int, float), 3600,
         "a forwarded TCP connection with no bytes either way for this long is closed (0: never)",
         _check_idle_timeout),
)

CLIENT_ENTRY_KEYS = (
    _Key("name", str, _REQUIRED, "the client's name, shown in logs and to servers", _check_name),
    _Key("tripcode", str, _REQUIRED, "the client's tripcode, from ptth_client.py --print-tripcode",
         _check_tripcode),
    _Key("allow", list, _REQUIRED, "what it may reach: \"SERVER:PORTNAME\" or \"SERVER:*\" entries",
         _check_allow),
)

SCRAPER_KEY_KEYS = (
    _Key("name", str, _REQUIRED, "a label for the key, shown in the audit log", _check_label),
    _Key("hash", str, _REQUIRED, "the key's tripcode, from ptth_relay.py --new-scraper-key", _check_tripcode),
    _Key("not_before", (datetime, date), None, "the key is refused before this time"),
    _Key("not_after", (datetime, date), None, "the key is refused after this time"),
)

SERVER_ENTRY_KEYS = (
    _Key("name", str, _REQUIRED, "the server's name", _check_name),
    _Key("tripcode", str, _REQUIRED, "the server's tripcode", _check_tripcode),
    _Key("display_name", str, None, "a friendlier name for the server list"),
    _Key("trusted", bool, False, "its pages run on the relay's origin, unsandboxed (only for servers "
         "you run yourself)"),
)


@dataclass(frozen=True)
class QuicRelayTarget:
    """Where a proxy finds the QUIC relay, and how it knows it is the right one."""

    host: str
    port: int
    fingerprint: str | None  # the pinned SHA-256 of the relay's certificate
    ca_file: str | None  # or CAs to check it with


@dataclass(frozen=True)
class ServerConfig:
    name: str
    api_key: str | None
    relay_url: str
    file_server_root: str
    # port name -> (host, port): the only places the server ever connects to for a client
    forwarded_ports: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    quic: QuicRelayTarget | None = None


@dataclass(frozen=True)
class RegisteredClient:
    name: str
    tripcode: str
    allow: frozenset[str]  # "SERVER:PORTNAME" and "SERVER:*"

    def may_reach(self, server: str, port: str) -> bool:
        """Tell whether this client may connect to `port` on `server`."""
        return f"{server}:{port}" in self.allow or f"{server}:*" in self.allow


@dataclass(frozen=True)
class Forward:
    """One local port of ptth_client and what it reaches."""

    local_port: int
    server: str
    port: str


@dataclass(frozen=True)
class ClientConfig:
    """ptth_client's settings: exactly one of relay_url (over HTTP) and quic (over QUIC)."""

    api_key: str
    bind: str
    forwards: tuple[Forward, ...]
    relay_url: str | None = None
    quic: QuicRelayTarget | None = None
    name: str = ""  # over QUIC: the client's [[clients]] name (the HTTP relay knows it by its key)


@dataclass(frozen=True)
class RegisteredServer:
    name: str
    tripcode: str
    display_name: str
    trusted: bool = False  # its pages are not sandboxed (trust.SANDBOX_CSP)


@dataclass(frozen=True)
class ScraperKey:
    name: str
    hash: str
    not_before: datetime | None  # aware, UTC
    not_after: datetime | None


@dataclass(frozen=True)
class RelayConfig:
    listen_timeout_secs: float
    request_timeout_secs: float
    servers: Mapping[str, RegisteredServer]
    enable_scraper_api: bool = False
    scraper_keys: tuple[ScraperKey, ...] = ()
    metrics: bool = True
    audit_log: str | None = None
    trusted_proxies: tuple[trust.Network, ...] = ()
    operator_addresses: tuple[trust.Network, ...] = trust.LOOPBACK
    servers_alias: bool = True
    requests_per_address: int = 16
    clients: Mapping[str, RegisteredClient] = field(default_factory=dict)
    tcp_idle_timeout_secs: float = 3600.0
    quic_bind: str = "0.0.0.0:30380"
    quic_cert_file: str = "ptth_quic_relay.crt"
    quic_key_file: str = "ptth_quic_relay.key"


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _check_known(keys: tuple[_Key, ...], raw: Mapping[str, Any], where: str) -> None:
    known = {k.name for k in keys}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{where}: unknown key {name!r} (known keys: {', '.join(sorted(known))})")


def _apply(keys: tuple[_Key, ...], raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check `raw` against `keys` and fill in defaults; `where` prefixes errors."""
    _check_known(keys, raw, where)
    out: dict[str, Any] = {}
    for key in keys:
        if key.name not in raw:
            if key.default is _REQUIRED:
                raise ConfigError(f"{where}: missing key {key.name!r} ({key.doc})")
            out[key.name] = key.default
            continue
        value = raw[key.name]
        if (isinstance(value, bool) and key.type is not bool) or not isinstance(value, key.type):
            expected = _TYPE_NAMES.get(key.type, "value of another type")
            raise ConfigError(f"{where}: {key.name!r} must be a {expected}, not {value!r}")
        problem = key.check(value) if key.check else None
        if problem:
            raise ConfigError(f"{where}: {key.name!r} {problem}")
        out[key.name] = value
    return out


def parse_server_config(raw: Mapping[str, Any], where: str) -> ServerConfig:
    """Validate a server config (file contents merged with flags)."""
    values = _apply(SERVER_KEYS, raw, where)
    ports = values.pop("forwarded_ports")
    quic_raw = values.pop("quic")
    quic = None
    if quic_raw is not None:
        q = _apply(QUIC_SERVER_KEYS, quic_raw, f"{where}: [quic]")
        quic = _quic_target(q["relay"], q["relay_fingerprint"], q["ca_file"],
                            f"{where}: [quic] needs relay_fingerprint (as ptth_quic_relay.py prints it) or "
                            "ca_file, to know the relay is the right one")
    return ServerConfig(**values, forwarded_ports={name: _must(parse_address(a)) for name, a in ports.items()},
                        quic=quic)


_HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
_COLON_HEX_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){31}\Z")


def _quic_target(relay: str, fingerprint: str | None, ca_file: str | None, neither: str) -> QuicRelayTarget:
    """The checked QUIC relay settings; `neither` is the error when there is no way to check the relay."""
    if fingerprint is None and ca_file is None:
        raise ConfigError(neither)
    host, port = _must(parse_address(relay))
    return QuicRelayTarget(host, port, normalize_fingerprint(fingerprint) if fingerprint else None, ca_file)


def normalize_fingerprint(text: str) -> str | None:
    """A certificate fingerprint as a user may paste it (any case, colons, "sha256:"), as 64
    lowercase hex digits; None if it is not one."""
    value = text.strip().lower().removeprefix("sha256:")
    if _COLON_HEX_RE.match(value):
        value = value.replace(":", "")
    return value if _HEX64_RE.match(value) else None


def parse_address(value: str) -> tuple[str, int] | None:
    """Split "HOST:PORT" (IPv6 as "[::1]:PORT") into (host, port 1-65535), or None."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def parse_forward(value: str) -> Forward | None:
    """Parse "LOCALPORT:SERVER:PORTNAME", or None if it is not one."""
    parts = value.split(":")
    if len(parts) != 3:
        return None
    local, server, port = parts
    if not (local.isascii() and local.isdigit() and int(local) < 65536):  # 0: any free port
        return None
    if _check_name(server) or _check_port_name(port):
        return None
    return Forward(int(local), server, port)


def _must(value: Any) -> Any:
    assert value is not None  # the key's check has accepted it
    return value


def parse_relay_config(raw: Mapping[str, Any], where: str) -> RelayConfig:
    """Validate a relay config; both ways of listing servers are accepted."""
    values = _apply(RELAY_KEYS, raw, where)
    entries: list[Mapping[str, Any]] = []
    for i, entry in enumerate(values["servers"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: servers[{i}] must be a [[servers]] table")
        entries.append(_apply(SERVER_ENTRY_KEYS, entry, f"{where}: [[servers]] #{i + 1}"))
    for name, code in values["server_tripcodes"].items():
        entries.append(_apply(SERVER_ENTRY_KEYS, {"name": name, "tripcode": code}, f"{where}: [server_tripcodes]"))
    servers: dict[str, RegisteredServer] = {}
    for e in entries:
        if e["name"] in servers:
            raise ConfigError(f"{where}: server {e['name']!r} is listed twice")
        servers[e["name"]] = RegisteredServer(e["name"], e["tripcode"], e["display_name"] or e["name"],
                                              e["trusted"])
    scraper_keys = []
    for i, entry in enumerate(values["scraper_keys"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: scraper_keys[{i}] must be a [[scraper_keys]] table")
        k = _apply(SCRAPER_KEY_KEYS, entry, f"{where}: [[scraper_keys]] #{i + 1}")
        scraper_keys.append(ScraperKey(k["name"], k["hash"], _as_utc(k["not_before"]), _as_utc(k["not_after"])))
    clients: dict[str, RegisteredClient] = {}
    for i, entry in enumerate(values["clients"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: clients[{i}] must be a [[clients]] table")
        c = _apply(CLIENT_ENTRY_KEYS, entry, f"{where}: [[clients]] #{i + 1}")
        if c["name"] in clients:
            raise ConfigError(f"{where}: client {c['name']!r} is listed twice")
        if any(other.tripcode == c["tripcode"] for other in clients.values()):
            raise ConfigError(f"{where}: client {c['name']!r} has the tripcode of another client: "
                              "each client needs its own key")
        clients[c["name"]] = RegisteredClient(c["name"], c["tripcode"], frozenset(c["allow"]))
    return RelayConfig(
        listen_timeout_secs=float(values["listen_timeout_secs"]),
        request_timeout_secs=float(values["request_timeout_secs"]),
        servers=servers,
        enable_scraper_api=values["enable_scraper_api"],
        scraper_keys=tuple(scraper_keys),
        metrics=values["metrics"],
        audit_log=values["audit_log"],
        trusted_proxies=trust.parse_networks(values["trusted_proxies"])
        + (trust.LOOPBACK if values["trust_x_forwarded_for"] else ()),
        operator_addresses=trust.parse_networks(values["operator_addresses"]),
        servers_alias=values["servers_alias"],
        requests_per_address=values["requests_per_address"],
        clients=clients,
        tcp_idle_timeout_secs=float(values["tcp_idle_timeout_secs"]),
        quic_bind=values["quic_bind"],
        quic_cert_file=values["quic_cert_file"],
        quic_key_file=values["quic_key_file"],
    )


def _as_utc(value: datetime | date | None) -> datetime | None:
    """TOML times to aware UTC datetimes: a date means its midnight, no offset means UTC."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.combine(value, time(0))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def load_relay_config(path: str | os.PathLike[str]) -> RelayConfig:
    """Read and validate a relay config file, including that its audit log is writable."""
    config = parse_relay_config(read_toml(path), str(path))
    if config.audit_log is not None:
        log = Path(config.audit_log)
        writable = os.access(log, os.W_OK) if log.exists() else os.access(log.parent, os.W_OK | os.X_OK)
        if log.is_dir() or not writable:
            raise ConfigError(f"{path}: 'audit_log' {config.audit_log!r} is not a file the relay can write")
    return config


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
    `file_server_root`: a folder, and not one that holds a config file with a
    key in it (see `_check_root`).
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
        _check_root(cfg, path, key_in_file=key_in_file or cfg.api_key is None)
    if cfg.api_key is None:
        cfg = replace(cfg, api_key=_save_new_key(path))
        source = "generated"
    return cfg, source


def _check_root(config: ServerConfig, config_path: str | os.PathLike[str], key_in_file: bool) -> None:
    """The root must be a folder, and must not hold the config file if that has (or gets) a key."""
    if not Path(config.file_server_root).is_dir():
        raise ConfigError(f"file_server_root {config.file_server_root!r} is not a folder: create it or "
                          "point file_server_root (or --file-server-root) at the folder to serve")
    if key_in_file and Path(config_path).resolve().is_relative_to(Path(config.file_server_root).resolve()):
        raise ConfigError(f"{config_path} holds the API key and lies inside file_server_root "
                          f"{config.file_server_root!r}, so anyone could download it: move one of them")


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
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=".ptth_server.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:  # mkstemp's mode is 0600 already
                f.write(new_text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, real)
        except BaseException:
            os.unlink(tmp)
            raise
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


# Environment variable that may hold ptth_client's API key instead of a file.
CLIENT_API_KEY_ENV = "PTTH_CLIENT_API_KEY"


def load_client_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any]) -> ClientConfig:
    """ptth_client's settings: the config file (if any), then flags, then the key.

    `overrides` holds command-line values (None or [] for flags not given);
    --forward flags replace the file's list. The key comes from
    $PTTH_CLIENT_API_KEY or from the file named by api_key_file, never from argv.
    relay_url means forwarding over HTTP; quic_relay over QUIC, which needs
    relay_fingerprint or ca_file, and name.
    """
    raw, where = _client_raw(path, overrides)
    _check_known(CLIENT_KEYS, raw, where)
    if "relay_url" not in raw and "quic_relay" not in raw:
        raise ConfigError(f"{where}: no relay URL: give --relay-url URL or relay_url in --config FILE "
                          "(or --quic-relay HOST:PORT, to forward over QUIC)")
    if "relay_url" in raw and "quic_relay" in raw:
        raise ConfigError(f"{where}: give relay_url (forwarding over HTTP) or quic_relay (over QUIC), not both")
    values = _apply(CLIENT_KEYS, raw, where)
    if values["relay_url"] is not None:
        quic_only = [k for k in ("relay_fingerprint", "ca_file", "name") if values[k] is not None]
        if quic_only:
            raise ConfigError(f"{where}: {quic_only[0]!r} is for quic_relay only (relay_url forwards over HTTP)")
        forwards = _forwards(values["forward"], where)  # before the key: a config mistake comes first
        return ClientConfig(read_client_key(values["api_key_file"], where), values["bind"], forwards,
                            relay_url=values["relay_url"])
    return _quic_client_config(values, values["quic_relay"], where)


def load_quic_client_config(path: str | None, overrides: Mapping[str, Any]) -> ClientConfig:
    """ptth_quic_client's settings (QUIC_CLIENT_KEYS: `relay` for quic_relay), as load_client_config."""
    raw, where = _client_raw(path, overrides)
    _check_known(QUIC_CLIENT_KEYS, raw, where)
    for key, flag in (("relay", "--relay HOST:PORT"), ("name", "--name NAME")):
        if key not in raw:
            raise ConfigError(f"{where}: no {key}: give {flag} or {key} in --config FILE")
    values = _apply(QUIC_CLIENT_KEYS, raw, where)
    return _quic_client_config(values, values["relay"], where)


def _client_raw(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    raw = read_toml(path) if path is not None else {}
    raw.update({k: v for k, v in overrides.items() if v})
    return raw, str(path) if path is not None else "command line"


def _quic_client_config(values: Mapping[str, Any], relay: str, where: str) -> ClientConfig:
    target = _quic_target(relay, values["relay_fingerprint"], values["ca_file"],
                          f"{where}: give relay_fingerprint (--relay-fingerprint, as ptth_quic_relay.py printed it) "
                          "or ca_file (--ca-file), to know the relay is the right one")
    if values["name"] is None:
        raise ConfigError(f"{where}: no name: give --name NAME or name in --config FILE (this client's "
                          "[[clients]] name at the relay)")
    forwards = _forwards(values["forward"], where)
    return ClientConfig(read_client_key(values["api_key_file"], where), values["bind"], forwards, quic=target,
                        name=values["name"])


def load_quic_end_server_config(path: str) -> ServerConfig:
    """ptth_quic_end_server's settings: ptth_server's config, which must have [quic] and [forwarded_ports]."""
    config, _ = load_server_config(path, {}, serves_files=False)  # no file_server_root
    if config.quic is None:
        raise ConfigError(f"{path}: no [quic] table: add relay and relay_fingerprint (or ca_file)")
    if not config.forwarded_ports:
        raise ConfigError(f"{path}: no [forwarded_ports]: nothing to serve")
    return config


def _forwards(specs: list[str], where: str) -> tuple[Forward, ...]:
    forwards = tuple(_must(parse_forward(spec)) for spec in specs)
    if not forwards:
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


def is_private(path: str | os.PathLike[str]) -> bool:
    """Tell whether a file is unreadable by group and others."""
    return (Path(path).stat().st_mode & 0o077) == 0
