"""systemd units for the installed commands: the text `--systemd-unit` prints. No I/O.

A system unit runs its command as a user systemd makes for it (`DynamicUser=`),
which can read what others may read and write only its state folder
(`StateDirectory=`, also its working folder, so relative paths in a config land
there) and, for the relay, /var/log/ptth (`audit_log`). The server's config
holds its API key, so systemd hands it a copy that only that user can read
(`LoadCredential=`, systemd 247 or later); the relay's config holds no secret
and is read where it is, so that the relay sees it change. A user unit
(`systemctl --user`) runs as its user, in the folder the unit was made in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

# The relay holds a connection per parked listen, per response in flight and per
# client, up to worker_connections (ptth_lib/relay/gunicorn_settings.py) for each
# worker, plus its files and peer links: far above that, at no cost when unused.
RELAY_LIMIT_NOFILE = 65536

# A server or client holds a few connections per request or forwarded connection
# in flight (up to 2,000 WebSockets and 1,024 forwarded connections a server).
LIMIT_NOFILE = 16384

# Restart a crashed program after this long, rather than systemd's 100 ms, which can
# exhaust its start limit while, say, the network comes up.
RESTART_SECS = 5

# The relay answers parked listens at once on SIGTERM and lets downloads finish for
# gunicorn's graceful_timeout (40 s); the server lets responses finish for 10 s.
RELAY_STOP_SECS = 60

# Folders under which a system unit's own user reads nothing: home folders are
# usually closed to other users (0700 or 0750), and the unit protects them too.
_HOME_FOLDERS = ("/home", "/root")

# The server's config, as the credential LoadCredential= names and its path in the service.
_SERVER_CREDENTIAL = "ptth_server.toml"


def relay_unit(command: Sequence[str], config: str, args: Sequence[str] = ()) -> str:
    """A system unit for `ptth-relay`: `command` (absolute) with --config `config` (absolute) and `args`."""
    env_file = str(PurePosixPath(config).with_suffix(".env"))
    return _render(
        "ptth-relay", "PTTH relay", system=True,
        service=[
            ("ExecStart", _exec([*command, "--config", config, *args])),
            ("", "Optional settings from the environment: PTTH_REDIS_URL (a cluster), PTTH_ACCESS_LOG ..."),
            ("EnvironmentFile", "-" + _literal(env_file)),
            *_system_sandbox("ptth-relay", logs=True),
            ("LimitNOFILE", str(RELAY_LIMIT_NOFILE)),
            ("TimeoutStopSec", str(RELAY_STOP_SECS)),
            ("Restart", "on-failure"),
            ("RestartSec", str(RESTART_SECS)),
        ])


def server_unit(command: Sequence[str], config: str, user: bool, working_folder: str) -> str:
    """A unit for `ptth-server` with --config `config` (absolute); a user unit runs in `working_folder`."""
    if user:
        return _user_unit("ptth-server", command, "PTTH server", config, working_folder)
    credential = "${CREDENTIALS_DIRECTORY}/" + _SERVER_CREDENTIAL
    return _render(
        "ptth-server", "PTTH server", system=True,
        service=[
            ("ExecStart", f"{_exec([*command, '--config'])} {credential}"),
            ("", "The config holds the API key: the service gets a copy only its own user can read."),
            ("LoadCredential", f"{_SERVER_CREDENTIAL}:{_literal(config)}"),
            *_system_sandbox("ptth-server", logs=False),
            ("LimitNOFILE", str(LIMIT_NOFILE)),
            ("Restart", "on-failure"),
            ("RestartSec", str(RESTART_SECS)),
        ])


def client_unit(command: Sequence[str], config: str, working_folder: str) -> str:
    """A user unit for `ptth-client` with --config `config` (absolute), run in `working_folder`."""
    return _user_unit("ptth-client", command, "PTTH client (port forwarding)", config, working_folder)


def unreadable_paths(paths: Sequence[str]) -> list[str]:
    """Those of `paths` (absolute) that a system unit's own user cannot be expected to read: in home folders."""
    return [p for p in paths if any(PurePosixPath(p).is_relative_to(h) for h in _HOME_FOLDERS)]


def _user_unit(name: str, command: Sequence[str], description: str, config: str, working_folder: str) -> str:
    return _render(
        name, description, system=False,
        service=[
            ("ExecStart", _exec([*command, "--config", config])),
            ("", "Relative paths in the config are relative to the folder the unit was made in."),
            ("WorkingDirectory", _literal(working_folder)),
            ("", "A user manager sandboxes little without user namespaces (some systems turn them off)."),
            ("NoNewPrivileges", "yes"),
            ("LimitNOFILE", str(LIMIT_NOFILE)),
            ("Restart", "on-failure"),
            ("RestartSec", str(RESTART_SECS)),
        ])


def _system_sandbox(name: str, logs: bool) -> list[tuple[str, str]]:
    """A user of its own, made at each start, that can write only its state (and log) folder."""
    return [
        ("", f"A user of its own that can write only /var/lib/{name}"
             + (" and /var/log/ptth (audit_log)." if logs else ".")),
        ("DynamicUser", "yes"),
        ("StateDirectory", name),
        ("WorkingDirectory", f"%S/{name}"),
        *([("LogsDirectory", "ptth")] if logs else []),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "read-only"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
    ]


def _render(name: str, description: str, system: bool, service: list[tuple[str, str]]) -> str:
    """The unit `name`.service; a ("", text) entry of `service` is a comment line."""
    if system:
        place, systemctl = f"/etc/systemd/system/{name}.service", "sudo systemctl"
    else:
        place, systemctl = f"~/.config/systemd/user/{name}.service", "systemctl --user"
    lines = [f"# {place}, from: {name} --systemd-unit{'' if system else ' --user'} (README, systemd)",
             f"# then: {systemctl} daemon-reload && {systemctl} enable --now {name}",
             "[Unit]", f"Description={description}"]
    if system:
        lines += ["After=network-online.target", "Wants=network-online.target"]
    lines += ["", "[Service]"]
    lines += [f"# {value}" if not key else f"{key}={value}" for key, value in service]
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}"]
    return "\n".join(lines) + "\n"


def _exec(argv: Sequence[str]) -> str:
    """A command line as ExecStart= reads it: each word escaped, quoted if it holds a space or a quote.

    systemd expands no variable in the program's path (and refuses quotes and
    backslashes there), so a $ stays as it is in the first word.
    """
    words = []
    for i, arg in enumerate(argv):
        word = (_literal(arg).replace("$", "$$") if i else _literal(arg)).replace("\\", "\\\\")
        if any(c.isspace() or c in "\"'" for c in word) or not word:
            word = '"' + word.replace('"', '\\"') + '"'
        words.append(word)
    return " ".join(words)


def _literal(value: str) -> str:
    """`value` with systemd's specifiers (%) taken literally (other settings than ExecStart expand no $)."""
    return value.replace("%", "%%")
