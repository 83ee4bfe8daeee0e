"""The relay's config (ptth_relay.toml): its keys, `RelayConfig`, and loading it.

Also read by ptth_quic_relay.py: the same [[servers]] and [[clients]].
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

from ptth_lib.config.keys import (
    DEFAULT_QUIC_MAX_DATAGRAM_SIZE,
    REQUIRED,
    Key,
    apply_keys,
    check_allow,
    check_basic_auth,
    check_body_limit,
    check_host_suffix,
    check_idle_timeout,
    check_label,
    check_listen_timeout,
    check_max_connections,
    check_max_datagram_size,
    check_name,
    check_networks,
    check_peer_bind,
    check_requests_per_address,
    check_timeout,
    check_tripcode,
    parse_address,
    read_toml,
)
from ptth_lib.errors import ConfigError
from ptth_lib.relay import trust

RELAY_KEYS = (
    Key("listen_timeout_secs", (int, float), 120, "how long a server's listen waits before 204 (a spec 002 "
         "server's at most 30 s)", check_listen_timeout),
    Key("request_timeout_secs", (int, float), 30, "how long a client waits for a server to answer", check_timeout),
    Key("servers", list, [], "[[servers]] tables: name, tripcode, optional display_name"),
    Key("server_tripcodes", dict, {}, "older form: a table of name = tripcode"),
    Key("enable_scraper_api", bool, False, "serve the scraper API under /scraper/ (else 404)"),
    Key("scraper_keys", list, [], "[[scraper_keys]] tables: name, hash, optional not_before, not_after"),
    Key("metrics", bool, True, "serve Prometheus metrics at /metrics"),
    Key("audit_log", str, None, "file to append audit events to, as JSON lines (default: off)"),
    Key("trust_x_forwarded_for", bool, False,
         "older form of trusted_proxies = [\"127.0.0.1/32\", \"::1/128\"] (a proxy on this machine)"),
    Key("trusted_proxies", list, [], "addresses of proxies in front (nginx) whose X-Forwarded-For is "
         "believed, e.g. [\"127.0.0.1/32\"]", check_networks),
    Key("operator_addresses", list, ["127.0.0.1/32", "::1/128"], "client addresses served /metrics, "
         "/frontend/audit_log and /frontend/unregistered_servers ([] for nobody)", check_networks),
    Key("servers_alias", bool, True, "redirect the spec's older /servers/NAME/... URLs to "
         "/frontend/servers/NAME/... (false: 404)"),
    Key("requests_per_address", int, 16, "requests one client address (an IPv6 /64) may have in flight "
         "at one server; more wait their turn at the relay", check_requests_per_address),
    Key("clients", list, [], "[[clients]] tables for TCP port forwarding: name, tripcode, allow"),
    Key("quic_bind", str, "0.0.0.0:30380", "UDP HOST:PORT for ptth_quic_relay.py (port 0: any free port)",
         lambda v: None if parse_address(v.removesuffix(":0") + ":1" if v.endswith(":0") else v)
         else "must be HOST:PORT, e.g. 0.0.0.0:30380"),
    Key("quic_cert_file", str, "ptth_quic_relay.crt", "ptth_quic_relay.py's certificate (PEM); made on first start"),
    Key("quic_key_file", str, "ptth_quic_relay.key", "its private key (PEM, mode 0600); made on first start"),
    Key("quic_max_datagram_size", int, DEFAULT_QUIC_MAX_DATAGRAM_SIZE, "the largest QUIC packet (UDP payload) "
         "ptth_quic_relay.py sends, in bytes", check_max_datagram_size),
    Key("tcp_idle_timeout_secs", (int, float), 3600,
         "a forwarded TCP connection with no bytes either way for this long is closed (0: never)",
         check_idle_timeout),
    Key("server_host_suffix", str, "", "host routing: a request for NAME plus this suffix (\".tunnel.example.com\") "
         "goes to server NAME at / (empty: off)", check_host_suffix),
    Key("max_request_body_bytes", int, 0, "request bodies larger than this get 413 (0: no limit)",
         check_body_limit),
    Key("max_connections", int, 0, "connections the relay holds at once (parked listens, visitors, responses "
         "in flight); past it, new connections get 503 with Retry-After (0: derived from the open-files limit; "
         "takes effect at a restart)", check_max_connections),
    Key("redis_url", str, None, "run as a cluster of workers and hosts sharing this Redis, e.g. "
         "\"redis://:PASSWORD@10.0.0.2:6379/0\" (env PTTH_REDIS_URL wins; default: one process, no Redis)"),
    Key("peer_bind", str, "127.0.0.1:41000-41099", "cluster mode: where each worker listens for the others, "
         "HOST:PORT or HOST:LOW-HIGH (a worker takes the first free port)", check_peer_bind),
    Key("dashboard", dict, {}, "[dashboard] table: the live dashboard at /frontend/dashboard (default: off)"),
)


DASHBOARD_KEYS = (
    Key("enabled", bool, False, "serve the dashboard at /frontend/dashboard (false: 404)"),
    Key("basic_auth", list, [], "who may see it: \"USER:HASH\" entries, hashes from "
         "ptth_relay.py --hash-password", check_basic_auth),
)

# The environment variable that overrides redis_url (so that a password can stay out of the file).
REDIS_URL_ENV = "PTTH_REDIS_URL"

# Where the relay's programs (ptth_relay, ptth-relay, gunicorn's hooks, ptth_quic_relay) find their
# config when no --config names it.
RELAY_CONFIG_ENV = "PTTH_RELAY_CONFIG"
DEFAULT_RELAY_CONFIG = "./ptth_relay.toml"


def relay_config_path() -> str:
    """The relay config file named by $PTTH_RELAY_CONFIG, else ./ptth_relay.toml."""
    return os.environ.get(RELAY_CONFIG_ENV, DEFAULT_RELAY_CONFIG)


CLIENT_ENTRY_KEYS = (
    Key("name", str, REQUIRED, "the client's name, shown in logs and to servers", check_name),
    Key("tripcode", str, REQUIRED, "the client's tripcode, from ptth_client.py --print-tripcode",
         check_tripcode),
    Key("allow", list, REQUIRED, "what it may reach: \"SERVER:PORTNAME\" or \"SERVER:*\" entries",
         check_allow),
)


SCRAPER_KEY_KEYS = (
    Key("name", str, REQUIRED, "a label for the key, shown in the audit log", check_label),
    Key("hash", str, REQUIRED, "the key's tripcode, from ptth_relay.py --new-scraper-key", check_tripcode),
    Key("not_before", (datetime, date), None, "the key is refused before this time"),
    Key("not_after", (datetime, date), None, "the key is refused after this time"),
)


SERVER_ENTRY_KEYS = (
    Key("name", str, REQUIRED, "the server's name", check_name),
    Key("tripcode", str, REQUIRED, "the server's tripcode", check_tripcode),
    Key("display_name", str, None, "a friendlier name for the server list"),
    Key("trusted", bool, False, "its pages run on the relay's origin, unsandboxed (only for servers "
         "you run yourself)"),
    Key("basic_auth", list, [], "visitors must log in: \"USER:HASH\" entries, hashes from "
         "ptth_relay.py --hash-password", check_basic_auth),
)


@dataclass(frozen=True)
class RegisteredClient:
    name: str
    tripcode: str
    allow: frozenset[str]  # "SERVER:PORTNAME" and "SERVER:*"

    def may_reach(self, server: str, port: str) -> bool:
        """Tell whether this client may connect to `port` on `server`."""
        return f"{server}:{port}" in self.allow or f"{server}:*" in self.allow


@dataclass(frozen=True)
class RegisteredServer:
    name: str
    tripcode: str
    display_name: str
    trusted: bool = False  # its pages are not sandboxed (trust.SANDBOX_CSP)
    # Visitors must log in (basic_auth.py): (user, werkzeug password hash) pairs.
    basic_auth: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DashboardConfig:
    enabled: bool = False
    # Who may see it (basic_auth.py): (user, werkzeug password hash) pairs; never empty when enabled.
    basic_auth: tuple[tuple[str, str], ...] = ()


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
    quic_max_datagram_size: int = DEFAULT_QUIC_MAX_DATAGRAM_SIZE
    server_host_suffix: str = ""  # lowercase, with its leading dot; "" is off
    max_request_body_bytes: int = 0  # 0: no limit
    max_connections: int = 0  # 0: derived from the open-files limit (relay/capacity.py)
    redis_url: str | None = None  # cluster mode (CLUSTER.md); None: one process, no Redis
    peer_bind: str = "127.0.0.1:41000-41099"
    dashboard: DashboardConfig = DashboardConfig()


def parse_relay_config(raw: Mapping[str, Any], where: str) -> RelayConfig:
    """Validate a relay config; both ways of listing servers are accepted."""
    values = apply_keys(RELAY_KEYS, raw, where)
    entries: list[Mapping[str, Any]] = []
    for i, entry in enumerate(values["servers"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: servers[{i}] must be a [[servers]] table")
        entries.append(apply_keys(SERVER_ENTRY_KEYS, entry, f"{where}: [[servers]] #{i + 1}"))
    for name, code in values["server_tripcodes"].items():
        entries.append(apply_keys(SERVER_ENTRY_KEYS, {"name": name, "tripcode": code}, f"{where}: [server_tripcodes]"))
    servers: dict[str, RegisteredServer] = {}
    for e in entries:
        if e["name"] in servers:
            raise ConfigError(f"{where}: server {e['name']!r} is listed twice")
        servers[e["name"]] = RegisteredServer(e["name"], e["tripcode"], e["display_name"] or e["name"],
                                              e["trusted"], tuple(_split_login(entry) for entry in e["basic_auth"]))
    suffix = values["server_host_suffix"].lower()
    if suffix:
        seen: dict[str, str] = {}
        for name in servers:
            other = seen.setdefault(name.lower(), name)
            if other != name:
                raise ConfigError(f"{where}: servers {other!r} and {name!r} differ only in case: with "
                                  "server_host_suffix, host names (which ignore case) could not tell them apart")
    scraper_keys = []
    for i, entry in enumerate(values["scraper_keys"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: scraper_keys[{i}] must be a [[scraper_keys]] table")
        k = apply_keys(SCRAPER_KEY_KEYS, entry, f"{where}: [[scraper_keys]] #{i + 1}")
        scraper_keys.append(ScraperKey(k["name"], k["hash"], _as_utc(k["not_before"]), _as_utc(k["not_after"])))
    clients: dict[str, RegisteredClient] = {}
    for i, entry in enumerate(values["clients"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: clients[{i}] must be a [[clients]] table")
        c = apply_keys(CLIENT_ENTRY_KEYS, entry, f"{where}: [[clients]] #{i + 1}")
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
        quic_max_datagram_size=values["quic_max_datagram_size"],
        server_host_suffix=suffix,
        max_request_body_bytes=values["max_request_body_bytes"],
        max_connections=values["max_connections"],
        redis_url=os.environ.get(REDIS_URL_ENV) or values["redis_url"],
        peer_bind=values["peer_bind"],
        dashboard=_dashboard(values["dashboard"], where),
    )


def _dashboard(raw: Mapping[str, Any], where: str) -> DashboardConfig:
    """The [dashboard] table; enabled without users is refused (nobody could log in)."""
    d = apply_keys(DASHBOARD_KEYS, raw, f"{where}: [dashboard]")
    if d["enabled"] and not d["basic_auth"]:
        raise ConfigError(f"{where}: [dashboard] is enabled but 'basic_auth' lists nobody: add \"USER:HASH\" "
                          "entries (hashes from `python ptth_relay.py --hash-password`)")
    return DashboardConfig(d["enabled"], tuple(_split_login(entry) for entry in d["basic_auth"]))


def _split_login(entry: str) -> tuple[str, str]:
    user, _, password_hash = entry.partition(":")
    return user, password_hash


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
