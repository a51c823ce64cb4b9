"""Small filesystem primitives that durability rests on: atomic replacement and fsync."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from batchd.safe_fs import FILE_MODE, new_file


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    _fsync(folder, os.O_DIRECTORY)


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
def atomic_file(dest: Path, mode: int = FILE_MODE, *, durable: bool = True) -> Iterator[IO[bytes]]:
    """Write `dest` through a hidden temp name beside it: fsync, rename, fsync the folder.

    A reader sees the old content or the new, never a mix. The temp name is
    fixed, so a write repeated after a crash replaces its own leftover
    rather than adding another; on an error the temp file is removed. The new
    file gets exactly `mode`, whatever the umask. Without `durable`, the fsyncs are the
    caller's: `make_durable` before anything that depends on the file is committed.
    """
    temp = temp_name(dest)
    # Opened before the try: a name that could not be taken is not ours to remove.
    out = open_temp(temp, mode)
    try:
        with out as stream:
            yield stream
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dest.parent)


#: fsyncs `make_durable` has under way at once: a filesystem commits concurrent fsyncs together
#: (ext4's journal: 640 small files in 170 ms this way, 420 ms one after the other).
SYNCS_AT_ONCE = 16
_syncing: ThreadPoolExecutor | None = None
_syncing_lock = threading.Lock()


def make_durable(paths: Sequence[Path]) -> None:
    """fsync each of `paths` (files `atomic_file` wrote without `durable`) and the folders that
    hold them, several at once: a burst of files pays about one journal commit, not two each."""
    files = list(dict.fromkeys(paths))
    folders = list(dict.fromkeys(p.parent for p in files))
    # One file: no thread hop. Files, then the folders their names were written into; list()
    # waits for each, and raises the first failure.
    run = map if len(files) <= 1 else _sync_pool().map
    list(run(_fsync, files))
    list(run(fsync_dir, folders))


def _sync_pool() -> ThreadPoolExecutor:
    global _syncing
    with _syncing_lock:
        if _syncing is None:
            _syncing = ThreadPoolExecutor(SYNCS_AT_ONCE, thread_name_prefix="batchd-fsync")
        return _syncing


def _fsync(path: Path, flags: int = os.O_NOFOLLOW) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace `dest` with `data` atomically and durably."""
    with atomic_file(dest, mode) as stream:
        stream.write(data)
