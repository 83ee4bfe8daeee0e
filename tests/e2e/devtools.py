"""Headless Chromium driven over its DevTools protocol, on a pipe: no port, no WebSocket client, no selenium.

`--remote-debugging-pipe` makes Chromium read protocol messages from its
fd 3 and write answers and events to its fd 4, each a JSON text ended by a
NUL byte (what Puppeteer's `pipe: true` does). `Browser` starts it with the
flags test_edge.py uses for its pages, opens one tab and sends commands to it;
`decode_png` reads the screenshots back (zlib only: no Pillow in the tests).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Flags of the headless pages in test_edge.py: nothing but the page talks to the network.
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class DevToolsError(Exception):
    """A command answered with an error, or no answer came in time."""


class Browser:
    """One headless Chromium with one tab; `call` sends a command to the tab (or, `browser=True`, to Chromium)."""

    def __init__(self, chromium: str, profile: Path, log: Path, width: int = 900, height: int = 700) -> None:
        to_chromium_r, self._to_chromium = os.pipe()
        self._from_chromium, from_chromium_w = os.pipe()
        # posix_spawn puts the pipes on fds 3 and 4 without running Python in the child
        # (subprocess would need preexec_fn, unsafe beside threads); setsid: its helpers die with it.
        with log.open("ab") as out:
            self.pid = os.posix_spawn(
                chromium,
                [chromium, *HEADLESS_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                 "--remote-debugging-pipe", "about:blank"],
                os.environ,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, out.fileno(), 2),
                              (os.POSIX_SPAWN_DUP2, to_chromium_r, 3), (os.POSIX_SPAWN_DUP2, from_chromium_w, 4)],
                setsid=True)
        os.close(to_chromium_r)
        os.close(from_chromium_w)
        self.events: list[dict[str, Any]] = []
        self._answers: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
            self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                      browser=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                data = os.read(self._from_chromium, 1 << 20)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._answers[-1] = {"error": {"message": "Chromium closed its pipe"}}
                    self._cond.notify_all()
                return
            pending += data
            *messages, pending = pending.split(b"\0")
            with self._cond:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cond.notify_all()

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30,
             browser: bool = False) -> dict[str, Any]:
        """Send one command; its result, or DevToolsError with the protocol's message."""
        with self._cond:
            self._next_id += 1
            call_id = self._next_id
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self._session
        os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while call_id not in self._answers:
                if -1 in self._answers:
                    raise DevToolsError(f"{method}: {self._answers[-1]['error']['message']}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DevToolsError(f"{method}: no answer in {timeout} s")
                self._cond.wait(left)
            answer = self._answers.pop(call_id)
        if "error" in answer:
            raise DevToolsError(f"{method}: {answer['error'].get('message')}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the tab (promises awaited, returned by value)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression[:60]!r} threw: {result['exceptionDetails'].get('text')} "
                                f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, done: Callable[[Any], bool], timeout: float) -> Any:
        """Evaluate `expression` until `done(value)`; the last value (in time or not).

        A navigation in between (a form submitted) destroys the context an
        evaluation runs in: that error is a try again.
        """
        deadline = time.monotonic() + timeout
        value = None
        while True:
            try:
                value = self.evaluate(expression)
                if done(value):
                    return value
            except DevToolsError:
                pass
            if time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def events_named(self, method: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e["params"] for e in self.events if e.get("method") == method]

    def close(self) -> None:
        """Ask Chromium to quit, give it 10 s, then kill its session (its helpers with it)."""
        try:
            os.write(self._to_chromium, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(self.pid, signal.SIGKILL)  # what is left of its session: the zygote, renderers
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped above
        for fd in (self._to_chromium, self._from_chromium):
            try:
                os.close(fd)
            except OSError:
                pass


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows of RGB(A) pixels of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if zlib.crc32(kind + chunk) != struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]:
            raise ValueError(f"bad CRC in {kind!r}")
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            up_left = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 255
        # Drop alpha: a screenshot is opaque.
        rows.append(bytes(line) if bpp == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3))
        previous = line
    return width, height, rows
