"""ptth_client_gui: the desktop app for people who connect: forwards in a window, no terminal needed.

`python ptth_client_gui.py [--config PATH]` opens a window that runs the same
forwarding as `ptth_client.py --config PATH` and edits that same file
(default: ~/.config/ptth/ptth_client.toml). On the first run it makes a key
and shows what to send the relay's admin.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ptth_lib.cli import add_logging_flags, setup_logging
from ptth_lib.commands import add_command_flags
from ptth_lib.config.client_file import default_config_path
from ptth_lib.errors import ConfigError

PROG = "ptth_client_gui"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(default_config_path()),
                        help="the client's config file, shared with ptth_client.py --config "
                             "(default: %(default)s; made on the first run)")
    add_logging_flags(parser)
    add_command_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("quic").setLevel(logging.WARNING)
    try:
        import tkinter
    except ImportError:
        print(f"{PROG}: Python's tkinter is missing: install it (Debian, Ubuntu: sudo apt install python3-tk)",
              file=sys.stderr)
        return 1
    from ptth_lib.gui.window import ClientWindow

    try:
        root = tkinter.Tk(className="ptth-client")
    except tkinter.TclError as e:
        print(f"{PROG}: cannot open a window: {e}", file=sys.stderr)
        return 1
    try:
        ClientWindow(root, args.config)
    except ConfigError as e:
        root.destroy()
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    root.mainloop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
