"""ptth_client.toml as a desktop app edits it: the relay, the forwards and the key file.

The app and `python ptth_client.py --config FILE` share one file, which the
user may also edit by hand. tomllib only reads, and writing a dict back would
lose every comment; so the file is edited with tomlkit, which keeps what the
user wrote (comments above keys and inside the `forward` array, inline
comments, blank lines, quoting, unknown keys) and changes only the values the
app changes. The CLI still reads the file with tomllib (save() checks that
tomllib reads back exactly what was edited). The checks are
the CLI's own (CLIENT_KEYS), reported per field for a form, and `to_config`
loads the saved file exactly as the CLI does. No Tk and no sockets here.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Array, Comment, Table
from tomlkit.toml_document import TOMLDocument

from ptth_lib.config.client import (
    CLIENT_KEYS,
    ClientConfig,
    _read_key_file,
    load_client_config,
    write_new_key_file,
)
from ptth_lib.config.keys import (
    Forward,
    check_name,
    check_port_name,
    normalize_fingerprint,
    parse_forward,
    write_atomically,
)
from ptth_lib.errors import ConfigError
from ptth_lib.wire import tripcode

# The key file ensure_key makes beside the config file when api_key_file is unset.
DEFAULT_KEY_FILE_NAME = "ptth_client.key"

_KEYS = {k.name: k for k in CLIENT_KEYS}
_ORDER = [k.name for k in CLIENT_KEYS]  # where a new key goes: among its neighbours in this order
_QUIC_ONLY = ("relay_fingerprint", "ca_file", "name")


def default_config_path() -> Path:
    """$XDG_CONFIG_HOME/ptth/ptth_client.toml, else ~/.config/ptth/ptth_client.toml."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG spec says to ignore it
        base = str(Path.home() / ".config")
    return Path(base) / "ptth" / "ptth_client.toml"


@dataclass(frozen=True)
class RelaySettings:
    """The relay keys of ptth_client.toml as a form shows them: "" for an absent key."""

    relay_url: str = ""
    quic_relay: str = ""
    relay_fingerprint: str = ""
    ca_file: str = ""
    name: str = ""


def forward_spec(f: Forward) -> str:
    """`f` as the `forward` list writes it: "LOCALPORT:SERVER:PORTNAME"."""
    return f"{f.local_port}:{f.server}:{f.port}"


class ClientFile:
    """One ptth_client.toml, parsed with tomlkit; edits stay in memory until `save()`."""

    def __init__(self, path: str | os.PathLike[str], doc: TOMLDocument, exists: bool, crlf: bool = False):
        self.path = Path(path)
        self.exists = exists  # False until a missing file (a first run) is saved
        self._doc = doc
        self._crlf = crlf

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClientFile:
        """The file at `path`, or an empty document if there is none; ConfigError if it cannot be read."""
        try:
            with open(path, encoding="utf-8", newline="") as f:  # newline="": a CRLF file stays CRLF
                text = f.read()
        except FileNotFoundError:
            return cls(path, tomlkit.document(), exists=False)
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        try:
            tomllib.loads(text)  # the CLI's parser first, for the CLI's own error
            doc = tomlkit.parse(text)
        except (tomllib.TOMLDecodeError, TOMLKitError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        return cls(path, doc, exists=True, crlf="\r\n" in text)

    def as_string(self) -> str:
        """The file's text as save() would write it."""
        text = self._doc.as_string()
        return text.replace("\r\n", "\n").replace("\n", "\r\n") if self._crlf else text

    # The relay.

    def relay(self) -> RelaySettings:
        """The relay keys; "" for a key that is absent (or not a string)."""
        return RelaySettings(**{f.name: self._str(f.name) or "" for f in fields(RelaySettings)})

    def set_relay(self, settings: RelaySettings) -> dict[str, str]:
        """Check `settings` as the CLI would: {field: one-line error}; if there is none, store them.

        Values are stripped and the fingerprint normalized; keys with a value
        are set (in place when present), keys left empty are removed.
        """
        values = {f.name: getattr(settings, f.name).strip() for f in fields(RelaySettings)}
        errors: dict[str, str] = {}
        for name, value in values.items():
            check = _KEYS[name].check
            problem = check(value) if value and check else None
            if problem:
                errors[name] = problem
        if values["relay_url"] and values["quic_relay"]:
            errors["relay_url"] = errors["quic_relay"] = ("give relay_url (over HTTP) or quic_relay "
                                                          "(over QUIC), not both")
        elif values["relay_url"]:
            for name in _QUIC_ONLY:
                if values[name]:
                    errors[name] = "is for a QUIC relay only (relay_url forwards over HTTP)"
        elif values["quic_relay"]:
            if not values["relay_fingerprint"] and not values["ca_file"]:
                errors["relay_fingerprint"] = ("give the relay's certificate fingerprint (as ptth_quic_relay.py "
                                               "prints it) or a CA file, to know the relay is the right one")
            if not values["name"]:
                errors["name"] = "give this client's name in the relay's [[clients]] table"
        else:
            errors["relay_url"] = ("give the relay's URL, e.g. https://relay.example.com "
                                   "(or quic_relay, to forward over QUIC)")
        if errors:
            return errors
        if values["relay_fingerprint"]:
            values["relay_fingerprint"] = normalize_fingerprint(values["relay_fingerprint"]) or ""
        for name, value in values.items():  # set first, so that a new key can take a removed one's place
            if value and self._doc.get(name) != value:
                self._set(name, value)
        for name, value in values.items():
            if not value and name in self._doc:
                del self._doc[name]
        return {}

    # The forwards.

    def forwards(self) -> list[Forward]:
        """The `forward` entries, in order; entries that do not parse are skipped."""
        return [f for _, f in self._forward_entries()]

    def check_forward(self, local_port: str, server: str, port_name: str,
                      replacing: int | None = None) -> dict[str, str]:
        """Check a forward dialog's fields: {field: one-line error}, fields named as the arguments.

        `replacing` is the local port of the forward being edited, which may keep its port.
        """
        errors: dict[str, str] = {}
        port = local_port.strip()
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
            errors["local_port"] = "must be a port number from 1 to 65535"
        else:
            for f in self.forwards():
                if f.local_port == int(port) and f.local_port != replacing:
                    errors["local_port"] = f"is already forwarded to {f.server}:{f.port}"
                    break
        for name, value, check in (("server", server, check_name), ("port_name", port_name, check_port_name)):
            problem = check(value.strip())
            if problem:
                errors[name] = problem
        return errors

    def add_forward(self, f: Forward) -> None:
        """Append `f` to `forward` (made if absent, or if not a list). ValueError if `f` is not valid
        or its local port is taken."""
        self._check_new_forward(f, None)
        array = self._doc.get("forward")
        if not isinstance(array, Array):
            new = tomlkit.array()
            new.append(forward_spec(f))
            self._set("forward", new)
            return
        if len(array) == 1 and "\n" not in array.as_string():
            array.multiline(True)  # ["a"] becomes one entry a line when a second comes
        array.append(forward_spec(f))

    def replace_forward(self, old_local_port: int, f: Forward) -> None:
        """Put `f` in the place of the forward on `old_local_port` (KeyError if none), keeping its comment."""
        index = self._forward_index(old_local_port)
        self._check_new_forward(f, old_local_port)
        self._doc["forward"][index] = forward_spec(f)

    def remove_forward(self, local_port: int) -> None:
        """Remove the forward on `local_port` (KeyError if none); comments on their own lines stay."""
        del self._doc["forward"][self._forward_index(local_port)]

    # The key.

    @property
    def api_key_file(self) -> str | None:
        """The key file's path as the file gives it; None if absent (or not a string)."""
        return self._str("api_key_file")

    @api_key_file.setter
    def api_key_file(self, value: str | None) -> None:
        if value is None:
            self._doc.pop("api_key_file", None)
        elif self._doc.get("api_key_file") != value:
            self._set("api_key_file", value)

    def ensure_key(self) -> tuple[str, bool]:
        """The client's key and whether it was just made.

        An existing api_key_file is read (as the CLI reads it, but never from
        $PTTH_CLIENT_API_KEY). A missing one is created (mode 0600); with no
        api_key_file, ptth_client.key beside the config file is used (read if
        it is there, else created) and api_key_file set to its absolute path.
        A relative api_key_file is relative to the current folder, as for the CLI.
        """
        folder = self.path.absolute().parent
        _make_folder(folder)
        key_file = self.api_key_file or str(folder / DEFAULT_KEY_FILE_NAME)
        if os.path.exists(key_file):
            key, created = _read_key(key_file), False
        else:
            key, created = write_new_key_file(key_file), True
        self.api_key_file = key_file
        return key, created

    # Saving.

    def save(self) -> None:
        """Write the file atomically (a new file gets mode 0600, an existing one keeps its mode)."""
        text = self.as_string()
        try:
            same = tomllib.loads(text) == self._doc.unwrap()
        except tomllib.TOMLDecodeError:
            same = False
        if not same:  # a tomlkit slip must never reach the user's file
            raise ConfigError(f"{self.path}: cannot save: the edited file would not read back as edited")
        real = Path(os.path.realpath(self.path))  # a symlinked config keeps its link
        try:
            _make_folder(real.parent)
            mode = stat.S_IMODE(real.stat().st_mode) if real.exists() else 0o600
            write_atomically(real, text, mode)
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot save: {e.strerror}") from None
        self.exists = True

    def to_config(self) -> ClientConfig:
        """The saved file read exactly as `ptth_client.py --config FILE` reads it (ConfigError: its error)."""
        return load_client_config(self.path, {})

    # Helpers.

    def _str(self, name: str) -> str | None:
        value = self._doc.get(name)
        return str(value) if isinstance(value, str) else None

    def _forward_entries(self) -> list[tuple[int, Forward]]:
        array = self._doc.get("forward")
        if not isinstance(array, Array):
            return []
        entries = ((i, parse_forward(str(v)) if isinstance(v, str) else None) for i, v in enumerate(array))
        return [(i, f) for i, f in entries if f is not None]

    def _forward_index(self, local_port: int) -> int:
        for i, f in self._forward_entries():
            if f.local_port == local_port:
                return i
        raise KeyError(f"no forward on local port {local_port}")

    def _check_new_forward(self, f: Forward, replacing: int | None) -> None:
        if parse_forward(forward_spec(f)) != f:
            raise ValueError(f"not a valid forward: {f}")
        if f.local_port and any(g.local_port == f.local_port != replacing for g in self.forwards()):
            raise ValueError(f"local port {f.local_port} is already forwarded")

    def _set(self, name: str, value: Any) -> None:
        """Set a top-level key: in place if present; else under a commented-out `# name = ...` (as in
        the example config), else after the keys that come before it in CLIENT_KEYS, else above
        those that come after it (and their comments), else where tomlkit appends (before any table)."""
        if name in self._doc:
            self._doc[name] = value
            return
        body = self._doc.body
        end = next((i for i, (_, item) in enumerate(body) if isinstance(item, (Table, AoT))), len(body))
        keys = {k.key: i for i, (k, _) in enumerate(body[:end]) if k is not None}
        commented = re.compile(rf"\s*#\s*{re.escape(name)}\s*=")
        at = [i + 1 for i, (_, item) in enumerate(body[:end])
              if isinstance(item, Comment) and commented.match(item.as_string())]
        at = at or [keys[k] + 1 for k in _ORDER[:_ORDER.index(name)] if k in keys]
        later = [keys[k] for k in _ORDER[_ORDER.index(name) + 1:] if k in keys]
        if not at and later:
            at = [min(later)]
            while at[0] > 0 and isinstance(body[at[0] - 1][1], Comment):
                at[0] -= 1
        if at and max(at) < len(body):
            self._doc._insert_at(max(at), name, value)  # tomlkit (pinned) has no public insert
        else:
            self._doc.append(name, value)

def _make_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def _read_key(path: str) -> str:
    """A client key file read as read_client_key reads it, without looking at the environment."""
    key = _read_key_file(path)
    if not tripcode.is_sendable(key):
        raise ConfigError(f"{path}: the client API key must be printable ASCII with no spaces")
    if not tripcode.is_strong(key):
        raise ConfigError(f"{path}: the client API key is too weak: use at least "
                          f"{tripcode.MIN_API_KEY_CHARS} random characters")
    return key


def clients_snippet(name: str, key: str, forwards: Iterable[Forward]) -> str:
    """The [[clients]] table the relay's admin adds to ptth_relay.toml for this client.

    `allow` lists each SERVER:PORTNAME forwarded (a placeholder if none).
    ValueError if `name` is not a valid client name.
    """
    problem = check_name(name)
    if problem:
        raise ValueError(problem)
    allow = list(dict.fromkeys(f"{f.server}:{f.port}" for f in forwards)) or ["SERVER:PORTNAME"]
    entries = ", ".join(f'"{a}"' for a in allow)
    return f'[[clients]]\nname = "{name}"\ntripcode = "{tripcode.derive(key)}"\nallow = [{entries}]\n'
