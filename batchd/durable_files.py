"""Small filesystem primitives that durability rests on: atomic replacement and fsync."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(dest: Path) -> Iterator[IO[bytes]]:
    """Write `dest` through a hidden temp name beside it: fsync, rename, fsync the folder.

    A reader sees the old content or the new, never a mix. The temp name is
    fixed, so a write repeated after a crash overwrites its own leftover
    rather than adding another; on an error the temp file is removed.
    """
    temp = dest.with_name(f".{dest.name}.tmp")
    try:
        with temp.open("wb", buffering=1 << 20) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        temp.replace(dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def write_atomic(dest: Path, data: bytes) -> None:
    """Replace `dest` with `data` atomically and durably."""
    with atomic_file(dest) as stream:
        stream.write(data)
