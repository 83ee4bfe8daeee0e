"""Tripcodes: the public fingerprint of a server's secret API key.

A tripcode is the standard base64 (with padding) of the 32-byte BLAKE3 hash of
the UTF-8 API key. The relay stores only tripcodes; a server proves it owns a
name by sending the key, which the relay hashes and compares in constant time.
"""

from __future__ import annotations

import base64
import hmac
import secrets

import blake3

# A key shorter than this is refused: the spec's own example "secretpassword"
# (14 characters) is the kind of key we must not accept.
MIN_API_KEY_CHARS = 20

# 32 random bytes as URL-safe base64: 43 characters, 256 bits.
GENERATED_KEY_BYTES = 32


def derive(api_key: str) -> str:
    """Return the tripcode of an API key."""
    digest = blake3.blake3(api_key.encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


def matches(api_key: str | None, tripcode: str) -> bool:
    """Tell whether `api_key` hashes to `tripcode`, comparing in constant time."""
    if not api_key:
        return False
    return hmac.compare_digest(derive(api_key).encode("utf-8"), tripcode.encode("utf-8"))


def is_strong(api_key: str) -> bool:
    """Tell whether an API key is long enough to use."""
    return len(api_key) >= MIN_API_KEY_CHARS


def is_sendable(api_key: str) -> bool:
    """Tell whether an API key can travel in an HTTP header as it is: printable ASCII, no spaces."""
    return api_key.isascii() and api_key.isprintable() and " " not in api_key


def generate_key() -> str:
    """Return a fresh random API key."""
    return secrets.token_urlsafe(GENERATED_KEY_BYTES)


def is_valid(tripcode: str) -> bool:
    """Tell whether a string is a well-formed tripcode (base64 of 32 bytes)."""
    try:
        raw = base64.b64decode(tripcode.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return False
    return len(raw) == 32
