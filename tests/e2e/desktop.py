"""The desktop app's test harness: a virtual screen (Xvfb), typing into Tk widgets, screenshots.

The app runs for real on an X server of its own (`Display`, one per test
module): in this process, where a test drives its widgets with Tk events and
reads what they show (`pump` runs the window's event loop until a condition
holds), or as its own process driven with xdotool. `make debian-deps`
installs xvfb, xdotool and xclip; without them the tests fail, they do not skip.

Screenshots go to the test's tmp folder, and with PTTH_SAVE_SCREENSHOTS=1
also to docs/screenshots/ (the README shows desktop-*.png).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tkinter as tk
from collections.abc import Callable
from pathlib import Path

from PIL import ImageGrab
from procs import REPO

SCREENSHOTS = REPO / "docs" / "screenshots"

# Tk's names for the characters a test types that are not letters or digits.
KEYSYMS = {":": "colon", "/": "slash", ".": "period", "-": "minus", "_": "underscore", " ": "space",
           "~": "asciitilde"}


class Display:
    """An Xvfb screen of its own; `dpi` 192 is 200 % scaling."""

    def __init__(self, dpi: int = 96, size: str = "1280x800") -> None:
        for tool in ("Xvfb", "xdotool", "xclip"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing: make debian-deps installs it (xvfb, xdotool, xclip)")
        read, write = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", f"{size}x24",
                                      "-dpi", str(dpi), "-nolisten", "tcp", "-noreset"],
                                     pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write)
        with os.fdopen(read) as f:
            number = f.readline().strip()
        if not number:
            self.proc.kill()
            raise RuntimeError("Xvfb did not start")
        self.name = f":{number}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "DISPLAY": self.name}

    def clipboard(self, owner: tk.Misc) -> str:
        """What the clipboard holds, as another program pasting would get it; `owner`'s event loop
        runs meanwhile, to answer xclip's request (an X clipboard is held by the program that copied)."""
        paste = subprocess.Popen(["xclip", "-o", "-selection", "clipboard"], env=self.env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pump(owner, lambda: paste.poll() is not None, "xclip to paste", 10)
            out, err = paste.communicate()
        finally:
            paste.kill()
        assert paste.returncode == 0, err
        return out

    def xdotool(self, *args: str) -> str:
        return subprocess.run(["xdotool", *args], env=self.env(), capture_output=True, text=True, timeout=20,
                              check=True).stdout

    def screenshot(self, path: Path, box: tuple[int, int, int, int] | None = None) -> Path:
        """Save the screen (or `box`: left, top, right, bottom) as PNG at `path`, and in docs if asked."""
        image = ImageGrab.grab(bbox=box, xdisplay=self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        if os.environ.get("PTTH_SAVE_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / path.name)
        return path

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def pump(root: tk.Misc, until: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Run the window's event loop until `until()` is true; fail after `timeout` s naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        root.update()
        if until():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def settle(root: tk.Misc, secs: float = 0.3) -> None:
    """Let the window redraw for a moment (before a screenshot)."""
    end = time.monotonic() + secs
    while time.monotonic() < end:
        root.update()
        time.sleep(0.02)


def type_into(entry: tk.Misc, text: str, clear: bool = True) -> None:
    """Type `text` into an entry key by key, as a person would (select-all first when `clear`)."""
    entry.focus_force()
    entry.update()
    if clear:
        entry.delete(0, "end")  # type: ignore[attr-defined]
    for ch in text:
        entry.event_generate("<KeyPress>", keysym=KEYSYMS.get(ch, ch))
    entry.update()


def press(widget: tk.Misc, keysym: str) -> None:
    """A key pressed with `widget` focused (Return, Escape, Tab, ...)."""
    widget.focus_force()
    widget.update()
    widget.event_generate(f"<KeyPress-{keysym}>")
    widget.update()


def window_box(widget: tk.Misc) -> tuple[int, int, int, int]:
    """A toplevel's place on the screen, for a screenshot of just that window."""
    top = widget.winfo_toplevel()
    top.update_idletasks()
    x, y = top.winfo_rootx(), top.winfo_rooty()
    return x, y, x + top.winfo_width(), y + top.winfo_height()
