"""What the file server's tests share, in-process (tests/unit) and with processes (tests/e2e).

`root` is the fixture both use: a served folder with a secret file beside
it, outside; a test module takes it by importing `served_root`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ptth_lib.server.file_server import FileResponse, serve

SECRET = b"TOP-SECRET-5f1b7c0e-must-never-be-served"


def fetch(root: Path, uri: str, method: str = "GET", **headers: str) -> tuple[FileResponse, bytes]:
    """Serve one request and drain its body (which closes the file)."""
    response = serve(
        root, method, uri, {name.replace("_", "-"): value for name, value in headers.items()}
    )
    return response, b"".join(response.body)


def header(response: FileResponse, name: str) -> str | None:
    values = [value for key, value in response.headers if key == name]
    assert len(values) <= 1, f"duplicate header {name}"
    return values[0] if values else None


def hrefs(page: bytes) -> list[str]:
    """The entry links of a listing (class "entry"): the plain links a mirror follows, in order."""
    return re.findall(r'<a class="entry[^"]*" href="([^"]*)"', page.decode("utf-8"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_links(folder: Path) -> None:
    """Links of every kind in `folder` (inside a served root whose parent holds secret.txt)."""
    (folder / "sub").mkdir()
    (folder / "inside.txt").write_bytes(b"inside\n")
    (folder / "link-in.txt").symlink_to("inside.txt")
    (folder / "link-in-dir").symlink_to("sub")
    (folder / "link-out.txt").symlink_to(folder.parent.parent / "secret.txt")  # outside the root
    (folder / "link-out-dir").symlink_to(folder.parent.parent)
    (folder / "broken").symlink_to("nowhere")
    (folder / "loop").symlink_to("loop")
    (folder / "sub" / "up").symlink_to("../../..")  # out of the root, through a subfolder
    (folder / "back\\slash.txt").write_bytes(b"no URL reaches this name\n")


@pytest.fixture(name="root")
def served_root(tmp_path: Path) -> Path:
    """A served root with a secret file next to it (outside)."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    served = tmp_path / "root"
    served.mkdir()
    (served / "a.txt").write_bytes(b"alpha\n")
    (served / "sub").mkdir()
    (served / "sub" / "inner.txt").write_bytes(b"inner\n")
    return served
