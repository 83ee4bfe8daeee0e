"""Config files: TOML in, frozen dataclasses out, every key declared once.

One module per program's settings (`relay`, `server`, `client`), on the
declarations and checks they share (`keys`); `tests/unit/test_config.py`
checks that `conf/*.example.toml` shows every key and README names it.
The names programs use are here.
"""

from ptth_lib.config.client import (
    CLIENT_API_KEY_ENV,
    CLIENT_KEYS,
    QUIC_CLIENT_KEYS,
    ClientConfig,
    load_client_config,
    load_quic_client_config,
    read_client_key,
    write_new_key_file,
)
from ptth_lib.config.keys import (
    Forward,
    QuicRelayTarget,
    is_private,
    normalize_fingerprint,
    parse_address,
    parse_forward,
    read_toml,
)
from ptth_lib.config.relay import (
    CLIENT_ENTRY_KEYS,
    DASHBOARD_KEYS,
    RELAY_CONFIG_ENV,
    RELAY_KEYS,
    SCRAPER_KEY_KEYS,
    SERVER_ENTRY_KEYS,
    DashboardConfig,
    RegisteredClient,
    RegisteredServer,
    RelayConfig,
    ScraperKey,
    load_relay_config,
    parse_relay_config,
    relay_config_path,
)
from ptth_lib.config.server import (
    API_KEY_ENV,
    QUIC_SERVER_KEYS,
    SERVER_KEYS,
    ServerConfig,
    load_quic_end_server_config,
    load_server_config,
    parse_server_config,
)
from ptth_lib.wire.names import NAME_RE, PORT_NAME_RE

__all__ = [
    "API_KEY_ENV", "CLIENT_API_KEY_ENV", "CLIENT_ENTRY_KEYS", "CLIENT_KEYS", "DASHBOARD_KEYS", "NAME_RE", "PORT_NAME_RE",
    "QUIC_CLIENT_KEYS", "QUIC_SERVER_KEYS", "RELAY_CONFIG_ENV", "RELAY_KEYS", "SCRAPER_KEY_KEYS", "SERVER_ENTRY_KEYS", "SERVER_KEYS",
    "ClientConfig", "DashboardConfig", "Forward", "QuicRelayTarget", "RegisteredClient", "RegisteredServer", "RelayConfig",
    "ScraperKey", "ServerConfig", "is_private", "load_client_config", "load_quic_client_config",
    "load_quic_end_server_config", "load_relay_config", "load_server_config", "normalize_fingerprint",
    "parse_address", "parse_forward", "parse_relay_config", "parse_server_config", "read_client_key", "read_toml",
    "relay_config_path", "write_new_key_file",
]
