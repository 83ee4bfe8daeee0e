"""PTTH's optional parts, the pip extras `ptth[quic]` and `ptth[cluster]`, and the modules each brings.

The relay, the server and the client over HTTP need none of them, and never
import them. A setting that needs a missing one is refused with one line that
says what to install, rather than with an ImportError's traceback.
pyproject.toml declares the extras; tests/unit/test_packaging.py checks that it
names these packages.
"""

from __future__ import annotations

import importlib.util

from ptth_lib.errors import ConfigError

# Extra -> the modules it installs (each the import name of its package).
EXTRAS = {
    "quic": ("qh3", "cryptography"),  # QUIC forwarding: the QUIC relay, [quic], --quic-relay
    "cluster": ("redis",),  # the relay as a cluster (redis_url)
}


def require_extra(extra: str, what: str) -> None:
    """Raise ConfigError, naming `what` needs it, unless every module of `extra` is installed."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        packages = f"packages {' and '.join(missing)}, which are" if len(missing) > 1 else f"package {missing[0]}, which is"
        raise ConfigError(f"{what} needs the Python {packages} not installed: install PTTH with its {extra} extra "
                          f"(pip install 'ptth[{extra}]'), or requirements.txt")
