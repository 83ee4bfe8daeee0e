"""What the installed commands (`ptth-relay`, `ptth-server`, ... in pyproject.toml) answer besides their work.

Each command is an entry point's `main` (`ptth_server.main` ...), which adds
these flags to its parser: `--version` (PTTH's one version,
`ptth_lib.__version__`), `--example-config` (the commented example config,
`conf/*.example.toml`, which the wheel carries as `ptth_lib/conf/`) and
`--systemd-unit` (a unit that runs the command, from `ptth_lib.systemd`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptth_lib import __version__
from ptth_lib.systemd import unreadable_paths

# Where the example configs are: inside the installed package, or in the checkout's conf/.
_PACKAGED_EXAMPLES = Path(__file__).resolve().parent / "conf"
_CHECKOUT_EXAMPLES = Path(__file__).resolve().parent.parent / "conf"


def example_config(program: str) -> bytes:
    """The commented example config of `program` ("relay", "server", "client"), as conf/ holds it."""
    name = f"{program}.example.toml"
    for folder in (_PACKAGED_EXAMPLES, _CHECKOUT_EXAMPLES):
        if (folder / name).is_file():
            return (folder / name).read_bytes()
    raise FileNotFoundError(f"{name} is neither in {_PACKAGED_EXAMPLES} nor in {_CHECKOUT_EXAMPLES}")


class _PrintExample(argparse.Action):
    """--example-config: print the example config and exit, as --version does."""

    def __init__(self, option_strings: Sequence[str], dest: str, program: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.program = program

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        sys.stdout.buffer.write(example_config(self.program))
        sys.stdout.flush()
        parser.exit()


def add_command_flags(parser: argparse.ArgumentParser, example: str | None = None, unit: bool = False,
                      user_unit: bool = False) -> None:
    """--version; --example-config if there is an `example`; --systemd-unit if `unit` (and --user if `user_unit`)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    if example is not None:
        parser.add_argument("--example-config", action=_PrintExample, program=example,
                            help=f"print a commented example config (conf/{example}.example.toml) and exit")
    if unit:
        parser.add_argument("--systemd-unit", action="store_true",
                            help="print a systemd unit that runs this command with --config (and the other "
                                 "flags given), and exit")
    if user_unit:
        parser.add_argument("--user", action="store_true",
                            help="with --systemd-unit: a user unit (systemctl --user), run in this folder")


def command_argv() -> list[str]:
    """This command as a unit starts it: an installed command's absolute path, or python and the script."""
    argv0 = sys.argv[0]
    if argv0.endswith(".py"):
        return [sys.executable, os.path.abspath(argv0)]
    return [os.path.abspath(argv0 if os.sep in argv0 else shutil.which(argv0) or argv0)]


def print_unit(text: str, prog: str, read_by_unit: Sequence[str] = ()) -> int:
    """Print a unit; first warn (stderr) about each of `read_by_unit` its own user could not read."""
    for path in unreadable_paths(read_by_unit):
        print(f"{prog}: warning: the unit's own user cannot read {path}, in a home folder: "
              "install PTTH and its configs elsewhere (README, systemd)", file=sys.stderr)
    sys.stdout.write(text)
    return 0
