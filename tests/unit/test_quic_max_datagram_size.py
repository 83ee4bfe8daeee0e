"""The max_datagram_size settings: the relay's, ptth_client's, ptth_quic_client's and the [quic] table's.

Each end of a QUIC connection sets the largest packet it sends; a value no
UDP path can carry is a one-line ConfigError naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_client_config import client_key, flags  # noqa: F401 - client_key: the key every test here uses

from ptth_lib.config import (
    load_client_config,
    load_quic_client_config,
    load_quic_end_server_config,
    parse_relay_config,
)
from ptth_lib.errors import ConfigError
from ptth_lib.forward.quic import driver
from ptth_lib.forward.quic.cert import client_configuration

FINGERPRINT = "3f" * 32
SERVER = ('name = "alpha"\napi_key = "a-strong-server-key-0123456789"\nrelay_url = "http://127.0.0.1:1/"\n'
          '[forwarded_ports]\nssh = "127.0.0.1:22"\n'
          f'[quic]\nrelay = "127.0.0.1:30380"\nrelay_fingerprint = "{FINGERPRINT}"\n')


def test_the_default_fits_a_common_path() -> None:
    assert parse_relay_config({}, "relay.toml").quic_max_datagram_size == 1350
    config = load_client_config(None, flags(quic_relay="127.0.0.1:30380", relay_fingerprint=FINGERPRINT,
                                                   name="laptop", forward=["0:alpha:ssh"]))
    assert config.quic is not None and config.quic.max_datagram_size == 1350


def test_every_end_may_set_it(tmp_path: Path) -> None:
    assert parse_relay_config({"quic_max_datagram_size": 9000}, "relay.toml").quic_max_datagram_size == 9000
    path = tmp_path / "client.toml"
    path.write_text(f'quic_relay = "127.0.0.1:30380"\nrelay_fingerprint = "{FINGERPRINT}"\nname = "laptop"\n'
                    'forward = ["0:alpha:ssh"]\nquic_max_datagram_size = 1452\n')
    quic = load_client_config(path, flags()).quic
    assert quic is not None and quic.max_datagram_size == 1452
    path.write_text(f'relay = "127.0.0.1:30380"\nrelay_fingerprint = "{FINGERPRINT}"\nname = "laptop"\n'
                    'forward = ["0:alpha:ssh"]\nmax_datagram_size = 1200\n')
    quic = load_quic_client_config(str(path), {})
    assert quic.quic is not None and quic.quic.max_datagram_size == 1200
    path = tmp_path / "ptth_server.toml"
    path.write_text(SERVER + "max_datagram_size = 65507\n")
    quic = load_quic_end_server_config(str(path)).quic
    assert quic is not None and quic.max_datagram_size == 65507
    config = driver.configure(client_configuration(driver.ALPN, FINGERPRINT, None), 9000)
    assert config.max_datagram_size == 9000


@pytest.mark.parametrize("value", [0, 1199, 65508, 1 << 20, True])
def test_a_size_no_path_carries_is_a_one_line_error(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as relay:
        parse_relay_config({"quic_max_datagram_size": value}, "relay.toml")
    path = tmp_path / "ptth_server.toml"
    path.write_text(SERVER + f"max_datagram_size = {str(value).lower()}\n")
    with pytest.raises(ConfigError) as server:
        load_quic_end_server_config(str(path))
    for caught, key in ((relay, "quic_max_datagram_size"), (server, "max_datagram_size")):
        message = str(caught.value)
        assert "\n" not in message and key in message, message
        if value is not True:
            assert "1200 to 65507 bytes" in message, message


def test_the_driver_refuses_a_bad_size() -> None:
    with pytest.raises(ValueError, match="max_datagram_size must be 1200 to 65507 bytes"):
        driver.configure(client_configuration(driver.ALPN, FINGERPRINT, None), 1000)
