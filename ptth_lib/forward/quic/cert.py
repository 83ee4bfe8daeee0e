"""The QUIC relay's TLS identity, and how proxies check it.

The QUIC relay needs a certificate. Out of the box it makes a self-signed one
(EC P-256, 10 years) and prints its fingerprint: the SHA-256 of the DER
certificate as 64 lowercase hex digits. Proxies then either pin that
fingerprint or, for a certificate from a real CA, verify it the usual way.
No sockets here; the qh3 internal `peer_certificate_der` needs is
quic_adapter's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from ptth_lib.config import is_private, normalize_fingerprint
from ptth_lib.errors import ConfigError
from ptth_lib.forward.quic.quic_adapter import peer_certificate

logger = logging.getLogger(__name__)

# Long enough that nobody has to renew a pinned certificate, which would mean
# re-pinning every proxy; the pin, not the dates, is what proxies trust.
CERT_VALID_DAYS = 3650

# Backdate the start a little so that a proxy whose clock is behind still
# accepts the certificate when it verifies dates (CA mode).
CERT_BACKDATE_SECONDS = 3600

_FINGERPRINT_HINT = "expected the SHA-256 fingerprint ptth_quic_relay.py printed (64 hex digits)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")

# The key types a relay can sign a handshake with that a qh3 2.1.0 proxy accepts (the
# signature algorithms a qh3 client offers by default: no EdDSA, no P-521); EC only on these curves.
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True)
class RelayIdentity:
    """The relay's certificate and key files, and the fingerprint proxies pin."""

    cert_path: str
    key_path: str
    fingerprint: str
    created: bool  # True if load_or_create generated the files just now


def load_or_create(cert_path: str, key_path: str, hostname: str = "ptth-relay") -> RelayIdentity:
    """Load the relay's certificate and key, or make a self-signed pair if neither exists.

    `hostname` goes into a new certificate's names, with localhost and
    127.0.0.1. Both files must exist, or neither; anything else, or files that
    do not parse or do not belong together, is a ConfigError.
    """
    has_cert, has_key = os.path.exists(cert_path), os.path.exists(key_path)
    if has_cert and has_key:
        return RelayIdentity(cert_path, key_path, _load(cert_path, key_path), created=False)
    if has_cert or has_key:
        there, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
        raise ConfigError(
            f"{there} exists but {missing} does not: restore it, or move both away "
            "to make a new self-signed certificate (proxies must then pin its new fingerprint)")
    cert_pem, key_pem = _generate(hostname)
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(cert_path, cert_pem, 0o644)
    except ConfigError:
        os.unlink(key_path)  # never leave a key without its certificate
        raise
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return RelayIdentity(cert_path, key_path, fingerprint_of(der), created=True)


def fingerprint_of(cert_der: bytes) -> str:
    """The SHA-256 of a DER certificate, as 64 lowercase hex digits."""
    return hashlib.sha256(cert_der).hexdigest()


def parse_fingerprint(text: str) -> str:
    """Normalize a fingerprint as a user may paste it: any case, colons, "sha256:" prefix."""
    value = normalize_fingerprint(text)
    if value is None:
        shown = repr(text) if len(text) <= 120 else repr(text[:117]) + "..."
        raise ConfigError(f"bad relay fingerprint {shown}: {_FINGERPRINT_HINT}")
    return value


def matches(cert_der: bytes, fingerprint: str) -> bool:
    """Tell whether a DER certificate has this fingerprint (as parse_fingerprint returns it)."""
    return hmac.compare_digest(fingerprint_of(cert_der).encode(), fingerprint.encode("utf-8"))


def peer_certificate_der(quic_connection: QuicConnection) -> bytes | None:
    """The certificate the peer presented, as DER, once the handshake is complete.

    None before the handshake completes, or if the peer sent no certificate
    (a server does not when a session ticket resumes the session: proxies must
    not use session tickets with a pinned relay).
    """
    cert = peer_certificate(quic_connection)
    return None if cert is None else cert.public_bytes(serialization.Encoding.DER)


def client_configuration(alpn: str, fingerprint: str | None, ca_file: str | None,
                         server_name: str | None = None) -> QuicConfiguration:
    """QUIC settings for a proxy connecting to the relay.

    - With `fingerprint` (and no `ca_file`), qh3 checks nothing about the
      certificate but that the relay holds its key (CertificateVerify): the
      caller MUST compare `peer_certificate_der(conn)` with the pin using
      `matches` once the handshake completes, and close the connection on a
      mismatch, before sending anything secret (the PeerHello's API key).
    - With `ca_file`, the relay's certificate must chain to a certificate in
      that PEM file (which may be the relay's self-signed certificate itself)
      and name `server_name`.
    - With neither, it must chain to the system's CAs (certifi's if the
      system has none) and name `server_name`.

    `server_name` (the relay's host name or IP address) is sent as SNI when it
    is a name. It is required when checking by CA: without it qh3 would
    check the chain but not the name, so any certificate from a trusted CA
    would pass. With both a fingerprint and a CA file, both are checked.
    """
    config = QuicConfiguration(alpn_protocols=[alpn], is_client=True, server_name=server_name)
    if fingerprint is not None:
        parse_fingerprint(fingerprint)  # fail now, not after the handshake
    if ca_file is None and fingerprint is not None:
        config.verify_mode = ssl.CERT_NONE
        return config
    if server_name is None:
        raise ValueError("server_name is required to verify the relay's certificate by CA")
    config.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        _load_certificates(ca_file, "CA file")  # qh3 reads it only during the handshake
        config.load_verify_locations(cafile=ca_file)
    # With no CA file, qh3 uses the system's CAs (ssl.create_default_context's).
    return config


def server_configuration(alpn: str, identity: RelayIdentity) -> QuicConfiguration:
    """QUIC settings for the relay, serving its certificate."""
    config = QuicConfiguration(alpn_protocols=[alpn], is_client=False)
    config.load_cert_chain(identity.cert_path, identity.key_path)
    return config


def _load(cert_path: str, key_path: str) -> str:
    """Check that the files parse and belong together; return the fingerprint."""
    certs = _load_certificates(cert_path, "certificate file")
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise ConfigError(f"{key_path}: cannot read the relay's key: {e.strerror}") from None
    except TypeError:
        raise ConfigError(f"{key_path}: the key is encrypted: store it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{key_path}: not a PEM private key ({e})"[:300]) from None
    if not _is_usable_key(key):
        raise ConfigError(
            f"{key_path}: PTTH's QUIC (qh3) cannot sign with this key type: use EC P-256 or P-384, "
            "or RSA")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        raise ConfigError(f"{key_path} is not the key of {cert_path}: give the matching pair")
    if not is_private(key_path):
        logger.warning("relay key is readable by others: chmod 600 %s", key_path)
    now = datetime.now(UTC)
    if not certs[0].not_valid_before_utc <= now <= certs[0].not_valid_after_utc:
        logger.warning("relay certificate %s is outside its validity dates; "
                       "proxies that verify by CA will refuse it", cert_path)
    try:
        # qh3 splits PEM files its own way (tls.load_pem_x509_certificates),
        # stricter than cryptography: a blank line after a certificate breaks it.
        QuicConfiguration(is_client=False).load_cert_chain(cert_path, key_path)
    except (OSError, ValueError, TypeError, IndexError, UnsupportedAlgorithm) as e:
        raise ConfigError(
            f"{cert_path}: qh3 cannot load it ({type(e).__name__}): keep only PEM "
            "certificate blocks, each ending in a newline, with no blank lines") from None
    return fingerprint_of(certs[0].public_bytes(serialization.Encoding.DER))


def _load_certificates(path: str, what: str) -> list[x509.Certificate]:
    """Read a PEM file of certificates, the leaf first."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{path}: the {what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return certs


def _is_usable_key(key: object) -> bool:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return isinstance(key.curve, _EC_CURVES)
    return isinstance(key, rsa.RSAPrivateKey)


def _generate(hostname: str) -> tuple[bytes, bytes]:
    """A new self-signed certificate and its key, both PEM.

    No extended key usage: qh3 takes a self-issued certificate that names TLS
    server use for a leaf, never for a CA, so a proxy could not use the relay's
    certificate as its own CA file (ca_file) if it had one.
    """
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([hostname, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _HOSTNAME_RE.match(host):
                raise ConfigError(
                    f"bad host name {host!r} for the relay's certificate: "
                    "expected a DNS name such as relay.example.org, or an IP address") from None
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=CERT_BACKDATE_SECONDS))
        .not_valid_after(now + timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode` (whatever the umask); never replace a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} appeared while making the relay's certificate: try again") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot create it: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
    except OSError as e:
        os.unlink(path)
        raise ConfigError(f"{path}: cannot write it: {e.strerror}") from None
