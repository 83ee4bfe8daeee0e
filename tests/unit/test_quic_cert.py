"""Tests for ptth_lib.forward.quic.cert: the QUIC relay's certificate and the proxies' pin."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import ssl
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import QuicErrorCode
from qh3.tls import AlertDescription

from ptth_lib.errors import ConfigError
from ptth_lib.forward.quic import cert
from ptth_lib.forward.quic.cert import (
    RelayIdentity,
    client_configuration,
    fingerprint_of,
    load_or_create,
    matches,
    parse_fingerprint,
    peer_certificate_der,
    server_configuration,
)

ALPN = "ptth-test"
CLIENT_ADDR = ("127.0.0.1", 40000)
RELAY_ADDR = ("127.0.0.1", 4433)
OTHER_FINGERPRINT = "ab" * 32


@pytest.fixture
def identity(tmp_path: Path) -> RelayIdentity:
    return load_or_create(str(tmp_path / "relay.crt"), str(tmp_path / "relay.key"))


def _der(cert_path: str) -> bytes:
    return x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).public_bytes(
        serialization.Encoding.DER)


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# ---- making and loading the identity ---------------------------------------


def test_generation_writes_both_files(tmp_path: Path, umask_077: None) -> None:
    cert_path, key_path = tmp_path / "relay.crt", tmp_path / "relay.key"
    ident = load_or_create(str(cert_path), str(key_path))
    assert ident == RelayIdentity(str(cert_path), str(key_path), ident.fingerprint, created=True)
    # Exact modes whatever the umask: the key private, the certificate public.
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) == 0o644
    assert len(ident.fingerprint) == 64 and ident.fingerprint == ident.fingerprint.lower()
    int(ident.fingerprint, 16)
    assert ident.fingerprint == fingerprint_of(_der(str(cert_path)))
    assert b"PRIVATE KEY" in key_path.read_bytes()
    assert b"PRIVATE" not in cert_path.read_bytes()


def test_generated_certificate_contents(identity: RelayIdentity) -> None:
    certificate = x509.load_pem_x509_certificate(Path(identity.cert_path).read_bytes())
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ptth-relay", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert certificate.issuer == certificate.subject
    now = datetime.now(UTC)
    assert certificate.not_valid_before_utc <= now
    assert certificate.not_valid_after_utc - now > timedelta(days=3649)
    assert certificate.not_valid_after_utc - now < timedelta(days=3651)
    certificate.verify_directly_issued_by(certificate)  # self-signed, by the key in relay.key


def test_generation_with_another_host_name(tmp_path: Path) -> None:
    ident = load_or_create(str(tmp_path / "c"), str(tmp_path / "k"), hostname="relay.example.org")
    certificate = x509.load_pem_x509_certificate(Path(ident.cert_path).read_bytes())
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["relay.example.org", "localhost"]


def test_generation_with_an_ip_address(tmp_path: Path) -> None:
    ident = load_or_create(str(tmp_path / "c"), str(tmp_path / "k"), hostname="192.0.2.7")
    certificate = x509.load_pem_x509_certificate(Path(ident.cert_path).read_bytes())
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("127.0.0.1")]


@pytest.mark.parametrize("hostname", ["", "has space", "-dash.example", "a..b", "x" * 64, "é.example"])
def test_bad_host_name_makes_no_files(tmp_path: Path, hostname: str) -> None:
    with pytest.raises(ConfigError, match="bad host name"):
        load_or_create(str(tmp_path / "c"), str(tmp_path / "k"), hostname=hostname)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_fingerprint_matches_openssl(identity: RelayIdentity) -> None:
    out = subprocess.run(
        ["openssl", "x509", "-in", identity.cert_path, "-noout", "-fingerprint", "-sha256"],
        check=True, capture_output=True, text=True).stdout
    # "sha256 Fingerprint=AB:CD:..." (OpenSSL 3) or "SHA256 Fingerprint=..." (1.1)
    assert parse_fingerprint(out.split("=", 1)[1]) == identity.fingerprint


def test_loading_again_gives_the_same_identity(identity: RelayIdentity) -> None:
    again = load_or_create(identity.cert_path, identity.key_path)
    assert again.fingerprint == identity.fingerprint
    assert again.created is False


def test_mismatched_key_and_certificate(tmp_path: Path) -> None:
    a = load_or_create(str(tmp_path / "a.crt"), str(tmp_path / "a.key"))
    b = load_or_create(str(tmp_path / "b.crt"), str(tmp_path / "b.key"))
    with pytest.raises(ConfigError, match="is not the key of"):
        load_or_create(a.cert_path, b.key_path)


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_one_file_missing(identity: RelayIdentity, missing: str) -> None:
    gone = identity.cert_path if missing == "cert" else identity.key_path
    os.unlink(gone)
    with pytest.raises(ConfigError, match="does not"):
        load_or_create(identity.cert_path, identity.key_path)
    assert not os.path.exists(gone)  # nothing regenerated behind the user's back


@pytest.mark.parametrize("which, content, reason", [
    ("cert", b"garbage\n", "holds no PEM certificate"),
    ("cert", b"", "holds no PEM certificate"),
    ("cert", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "holds no PEM certificate"),
    ("key", b"garbage\n", "not a PEM private key"),
    ("key", b"", "not a PEM private key"),
])
def test_garbage_files(identity: RelayIdentity, which: str, content: bytes, reason: str) -> None:
    Path(identity.cert_path if which == "cert" else identity.key_path).write_bytes(content)
    with pytest.raises(ConfigError, match=reason):
        load_or_create(identity.cert_path, identity.key_path)


def test_unreadable_file_is_a_config_error(identity: RelayIdentity, tmp_path: Path) -> None:
    os.unlink(identity.key_path)
    os.mkdir(identity.key_path)  # exists, but cannot be read as a file
    with pytest.raises(ConfigError, match="cannot read"):
        load_or_create(identity.cert_path, identity.key_path)


def test_encrypted_key(identity: RelayIdentity) -> None:
    key = serialization.load_pem_private_key(Path(identity.key_path).read_bytes(), password=None)
    Path(identity.key_path).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError, match="encrypted"):
        load_or_create(identity.cert_path, identity.key_path)


def _self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
    now = datetime.now(UTC)
    return x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(
        key.public_key()).serial_number(1).not_valid_before(now).not_valid_after(
        now + timedelta(days=1)).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_key_qh3_cannot_sign_with(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    (tmp_path / "c").write_bytes(_self_signed(key))
    (tmp_path / "k").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="cannot sign"):
        load_or_create(str(tmp_path / "c"), str(tmp_path / "k"))


def test_certificate_with_a_blank_line_after_it_loads(identity: RelayIdentity) -> None:
    # aioquic's PEM splitter refused this; qh3's reads it as cryptography does.
    with open(identity.cert_path, "ab") as f:
        f.write(b"\n")
    assert load_or_create(identity.cert_path, identity.key_path).fingerprint == identity.fingerprint


def test_certificate_with_chain_is_pinned_by_its_leaf(identity: RelayIdentity, tmp_path: Path) -> None:
    extra = load_or_create(str(tmp_path / "x.crt"), str(tmp_path / "x.key"))
    with open(identity.cert_path, "ab") as f:
        f.write(Path(extra.cert_path).read_bytes())
    assert load_or_create(identity.cert_path, identity.key_path).fingerprint == identity.fingerprint


def test_readable_key_is_warned_about(identity: RelayIdentity, caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(identity.key_path, 0o644)
    with caplog.at_level(logging.WARNING, logger=cert.__name__):
        load_or_create(identity.cert_path, identity.key_path)
    assert "readable by others" in caplog.text


def test_key_is_not_left_alone_if_the_certificate_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        load_or_create(str(tmp_path / "no-such-dir" / "relay.crt"), str(tmp_path / "relay.key"))
    assert list(tmp_path.iterdir()) == []


# ---- fingerprints ----------------------------------------------------------

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize("text", [
    HEX,
    HEX.upper(),
    ":".join(HEX[i:i + 2] for i in range(0, 64, 2)),
    ":".join(HEX[i:i + 2] for i in range(0, 64, 2)).upper(),
    "sha256:" + HEX,
    "SHA256:" + HEX.upper(),
    "  " + HEX + "\n",
])
def test_parse_fingerprint_accepts(text: str) -> None:
    assert parse_fingerprint(text) == HEX


@pytest.mark.parametrize("text", [
    "",
    HEX[:-1],
    HEX + "0",
    HEX[:-1] + "g",
    "sha1:" + HEX,
    "sha256:" + HEX[:40],
    HEX[:40],  # a SHA-1 fingerprint
    "0:123" + HEX[4:],  # colons, but not between pairs
    ":".join(HEX[i:i + 2] for i in range(0, 64, 2)) + ":",
    HEX[:32] + ":" + HEX[32:],
    HEX[:32] + " " + HEX[32:],
    "\u0661" * 64,  # Arabic-Indic digits are digits, but not hex
])
def test_parse_fingerprint_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="ptth_quic_relay.py printed") as info:
        parse_fingerprint(text)
    assert "\n" not in str(info.value)


def test_matches(identity: RelayIdentity) -> None:
    der = _der(identity.cert_path)
    assert matches(der, identity.fingerprint)
    assert not matches(der, OTHER_FINGERPRINT)
    assert not matches(der, "")
    assert not matches(der, "\u00e9" * 64)
    assert not matches(der + b"\x00", identity.fingerprint)


# ---- QUIC configurations ---------------------------------------------------


def test_pinned_client_configuration(identity: RelayIdentity) -> None:
    config = client_configuration(ALPN, identity.fingerprint, None)
    assert config.is_client and config.alpn_protocols == [ALPN]
    assert config.verify_mode == ssl.CERT_NONE


def test_ca_file_client_configuration(identity: RelayIdentity) -> None:
    config = client_configuration(ALPN, None, identity.cert_path, "localhost")
    assert config.verify_mode == ssl.CERT_REQUIRED
    assert config.cafile == identity.cert_path
    assert config.server_name == "localhost"


def test_default_client_configuration() -> None:
    config = client_configuration(ALPN, None, None, "relay.example.org")
    assert config.verify_mode == ssl.CERT_REQUIRED
    assert (config.cafile, config.capath, config.cadata) == (None, None, None)  # qh3: the system's CAs


def test_client_configuration_refuses_bad_input(identity: RelayIdentity, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ptth_quic_relay.py printed"):
        client_configuration(ALPN, "not a fingerprint", None)
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        client_configuration(ALPN, None, str(tmp_path / "junk.pem"), "localhost")
    with pytest.raises(ConfigError, match="cannot read"):
        client_configuration(ALPN, None, str(tmp_path / "missing.pem"), "localhost")
    # Checking by CA without a name to check would accept any CA-signed certificate.
    with pytest.raises(ValueError, match="server_name"):
        client_configuration(ALPN, None, identity.cert_path)
    with pytest.raises(ValueError, match="server_name"):
        client_configuration(ALPN, None, None)


def test_server_configuration(identity: RelayIdentity) -> None:
    config = server_configuration(ALPN, identity)
    assert not config.is_client and config.alpn_protocols == [ALPN]
    assert config.certificate is not None and config.certificate.public_bytes() == _der(identity.cert_path)
    assert config.private_key is not None


# ---- an in-memory handshake --------------------------------------------------


def _handshake(client_config: QuicConfiguration, identity: RelayIdentity
               ) -> tuple[QuicConnection, QuicConnection]:
    """Run a client and the relay against each other, passing datagrams by hand."""
    client = QuicConnection(configuration=client_config)
    relay = QuicConnection(configuration=server_configuration(ALPN, identity),
                           original_destination_connection_id=client.original_destination_connection_id)
    now = 1000.0
    assert peer_certificate_der(client) is None  # no TLS context before connect()
    client.connect(RELAY_ADDR, now=now)
    assert peer_certificate_der(client) is None  # handshake under way
    for _ in range(100):
        moved = False
        for data, _addr in client.datagrams_to_send(now=now):
            relay.receive_datagram(data, CLIENT_ADDR, now=now)
            moved = True
        for data, _addr in relay.datagrams_to_send(now=now):
            client.receive_datagram(data, RELAY_ADDR, now=now)
            moved = True
        if not moved:
            break
        now += 0.005
    return client, relay


def _events(conn: QuicConnection) -> list[events.QuicEvent]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def _completed(conn: QuicConnection) -> bool:
    return any(isinstance(e, events.HandshakeCompleted) for e in _events(conn))


def _refused_certificate(client: QuicConnection) -> bool:
    """Whether the client failed the handshake with a bad_certificate alert."""
    seen = _events(client)
    assert not any(isinstance(e, events.HandshakeCompleted) for e in seen)
    # A closing connection reports ConnectionTerminated when its close timer fires.
    timer = client.get_timer()
    assert timer is not None
    client.handle_timer(now=timer)
    seen += _events(client)
    return any(isinstance(e, events.ConnectionTerminated)
               and e.error_code == QuicErrorCode.CRYPTO_ERROR + AlertDescription.bad_certificate
               for e in seen)


def test_pinned_handshake(identity: RelayIdentity) -> None:
    client, relay = _handshake(client_configuration(ALPN, identity.fingerprint, None), identity)
    assert _completed(client)
    der = peer_certificate_der(client)
    assert der == _der(identity.cert_path)
    assert matches(der, identity.fingerprint)
    assert not matches(der, OTHER_FINGERPRINT)
    assert peer_certificate_der(relay) is None  # proxies present no certificate


def test_pinned_handshake_to_another_relay_is_caught_by_the_pin(
        identity: RelayIdentity, tmp_path: Path) -> None:
    # CERT_NONE lets the handshake finish with an impostor; the pin check must catch it.
    impostor = load_or_create(str(tmp_path / "i.crt"), str(tmp_path / "i.key"))
    client, _relay = _handshake(client_configuration(ALPN, identity.fingerprint, None), impostor)
    assert _completed(client)
    der = peer_certificate_der(client)
    assert der is not None and not matches(der, identity.fingerprint)


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1", "ptth-relay"])
def test_ca_file_handshake(identity: RelayIdentity, server_name: str) -> None:
    # The relay's self-signed certificate works as its own CA file.
    client, _relay = _handshake(
        client_configuration(ALPN, None, identity.cert_path, server_name), identity)
    assert _completed(client)
    assert peer_certificate_der(client) == _der(identity.cert_path)


def test_ca_file_handshake_checks_the_name(identity: RelayIdentity) -> None:
    client, _relay = _handshake(
        client_configuration(ALPN, None, identity.cert_path, "relay.example.org"), identity)
    assert _refused_certificate(client)
    assert peer_certificate_der(client) is None


def test_ca_file_handshake_checks_the_issuer(identity: RelayIdentity, tmp_path: Path) -> None:
    other = load_or_create(str(tmp_path / "o.crt"), str(tmp_path / "o.key"))
    client, _relay = _handshake(client_configuration(ALPN, None, other.cert_path, "localhost"),
                                identity)
    assert _refused_certificate(client)


def test_default_cas_refuse_a_self_signed_relay(identity: RelayIdentity) -> None:
    client, _relay = _handshake(client_configuration(ALPN, None, None, "localhost"), identity)
    assert _refused_certificate(client)


def test_module_has_a_small_surface() -> None:
    public = {n for n in vars(cert) if not n.startswith("_") and callable(getattr(cert, n))
              and getattr(getattr(cert, n), "__module__", "") == cert.__name__}
    assert public == {"RelayIdentity", "load_or_create", "fingerprint_of", "parse_fingerprint",
                      "matches", "peer_certificate_der", "client_configuration",
                      "server_configuration"}
