"""The file a job was made from: read as one snapshot, and checked for changes afterwards.

A file written in place may still be growing when batchd takes it (its writer keeps it open
and pauses). So the inbox reads a claimed file through one descriptor, up to the size it
had when the read began, validates and copies exactly those bytes, then looks again: a file
that changed meanwhile is read again (a few times, then what is there is taken), and what
was submitted, its size and modification time, is recorded on the job. When a round of
the job ends the file is compared once more, and a change is reported on the job (a log
event, `batchd show`, job.json's `source_changed`), never silently cut short.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["SourceState", "current_change", "describe_change", "snapshot"]


@dataclass(frozen=True)
class SourceState:
    """What a source file was when it was read: enough to tell that it changed since."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> SourceState:
        return cls(st.st_size, st.st_mtime_ns)


class _Window(io.RawIOBase):
    """The first `size` bytes of an open file, read with pread (the descriptor's offset is left alone)."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def snapshot(fd: int, size: int) -> IO[bytes]:
    """A buffered stream of the first `size` bytes of the file open at `fd` (which it does not close).

    Bytes a writer appends meanwhile are not read: validation and the upload copy see the same file.
    """
    return io.BufferedReader(_Window(fd, size), buffer_size=1 << 20)


def describe_change(before: SourceState, now: os.stat_result | None) -> str | None:
    """Why the file no longer is what was submitted (`now`: its lstat, None when it is gone); None if it is."""
    if now is None:
        return "the claimed file is gone"
    if not stat.S_ISREG(now.st_mode):
        return "the claimed file was replaced by something that is not a regular file"
    if now.st_size > before.size:
        return (
            f"it grew from {before.size:,} to {now.st_size:,} bytes after it was taken:"
            f" what was written after byte {before.size:,} was not submitted"
        )
    if now.st_size < before.size:
        return f"it shrank from {before.size:,} to {now.st_size:,} bytes after it was taken"
    if now.st_mtime_ns != before.mtime_ns:
        return "it was rewritten after it was taken (same size, new modification time)"
    return None


def current_change(path: Path, before: SourceState) -> str | None:
    """`describe_change` for the file at `path` now (never following a symlink)."""
    try:
        now: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        now = None
    return describe_change(before, now)
