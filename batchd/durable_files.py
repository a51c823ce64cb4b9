"""Small filesystem primitives that durability rests on: atomic replacement and fsync."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from batchd.safe_fs import FILE_MODE, new_file


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(dest: Path) -> Path:
    """The hidden temp name beside `dest` that `atomic_file` writes through."""
    return dest.with_name(f".{dest.name}.tmp")


def open_temp(temp: Path, mode: int = FILE_MODE) -> IO[bytes]:
    """Create a fixed temp name afresh (O_EXCL|O_NOFOLLOW, exactly `mode`), buffered for streaming.

    A leftover of batchd's own from an interrupted write is replaced; anything else found at
    the name (a planted symlink) is moved aside, never written through.
    """
    return new_file(temp, mode, replace_own=True, buffering=1 << 20)


@contextmanager
def atomic_file(dest: Path, mode: int = FILE_MODE) -> Iterator[IO[bytes]]:
    """Write `dest` through a hidden temp name beside it: fsync, rename, fsync the folder.

    A reader sees the old content or the new, never a mix. The temp name is
    fixed, so a write repeated after a crash replaces its own leftover
    rather than adding another; on an error the temp file is removed. The new
    file gets exactly `mode`, whatever the umask.
    """
    temp = temp_name(dest)
    # Opened before the try: a name that could not be taken is not ours to remove.
    out = open_temp(temp, mode)
    try:
        with out as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def write_atomic(dest: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace `dest` with `data` atomically and durably."""
    with atomic_file(dest, mode) as stream:
        stream.write(data)
