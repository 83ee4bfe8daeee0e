"""A folder as a .zip, streamed while it is built: memory stays bounded whatever the folder's size.

zipstream-ng writes each file's header, then its data as it is read, then a
data descriptor with the CRC and sizes; the central directory goes at the
end. Nothing is seeked nor buffered whole, so the archive leaves as it is
made. The folder is walked lazily too: one file is queued and written before
the next folder entry is even looked at, and what is held grows only with
the number of entries (the central directory needs one record per entry, some
hundred bytes each), never with their size. Files of 4 GiB and more get ZIP64
records (zipstream-ng decides from each file's size).

Files are stored, not compressed: what people keep in a shared folder
(photos, video, archives) does not shrink, and deflating would cost the
server's CPU on every download.

What goes in is exactly what the file server would serve: `resolve` (the file
server's own rule) gives the real path of a child or None, so a symlink
leading out of the root, a broken one, or a name no URL reaches is left out.
A symlink inside the root is followed, except into a folder the walk is
already inside (a loop).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import zipstream

logger = logging.getLogger(__name__)

# Read size: the file server's chunk, for the same reasons (file_server.CHUNK_BYTES).
READ_BYTES = 256 * 1024

Resolve = Callable[[Path, str], "Path | None"]


def zip_folder(folder: Path, top: str, resolve: Resolve) -> Iterator[bytes]:
    """Yield a zip of the real folder `folder`, every entry under `top/` in the archive.

    `resolve(real_parent, name)` returns the real path of the child `name`, or
    None when the file server would not serve it.
    """
    zs = zipstream.ZipStream(compress_type=zipstream.ZIP_STORED)
    for arcname, path, size in _walk(folder, top, resolve):
        if path is None:
            zs.add(None, arcname + "/")
        else:
            chunks = _read(path, size)
            if chunks is None:
                continue
            zs.add(chunks, arcname, size=size)
        yield from zs.file()
    yield from zs.footer()


def _walk(folder: Path, top: str, resolve: Resolve) -> Iterator[tuple[str, Path | None, int]]:
    """(arcname, real path or None for a folder, size) for every entry, depth first, names sorted.

    A stack of folder iterators, so a deep or wide tree costs one list of names per level.
    """
    yield top, None, 0
    stack: list[tuple[str, Path, Iterator[str]]] = [(top, folder, iter(_names(folder)))]
    inside = {folder}
    while stack:
        arc_parent, parent, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            inside.discard(parent)
            continue
        real = resolve(parent, name)
        if real is None:
            continue
        try:
            st = os.stat(real)
        except OSError:  # vanished, or a broken symlink
            continue
        arcname = f"{arc_parent}/{_arc_text(name)}"
        if stat.S_ISDIR(st.st_mode):
            if real in inside:
                logger.debug("zip: not following a loop at %r", arcname)
                continue
            yield arcname, None, 0
            stack.append((arcname, real, iter(_names(real))))
            inside.add(real)
        elif stat.S_ISREG(st.st_mode):
            yield arcname, real, st.st_size


def _names(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries)
    except OSError:
        return []


def _arc_text(name: str) -> str:
    """A name as the archive stores it (UTF-8): undecodable bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _read(path: Path, size: int) -> Iterator[bytes] | None:
    """Open `path` now (None if it cannot be), to read at most `size` bytes as the zip is written."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    file = open(fd, "rb", buffering=0)  # noqa: SIM115 - owns fd; closed by the generator
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        file.close()
        return None
    return _chunks(file, size)


def _chunks(file: IO[bytes], size: int) -> Iterator[bytes]:
    """Yield the file's first `size` bytes (fewer if it shrank: the zip records what was read)."""
    try:
        remaining = size
        while remaining > 0:
            chunk = file.read(min(READ_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        file.close()
