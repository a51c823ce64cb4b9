"""Writing only where batchd means to: no symlink it did not make is ever followed.

The inbox is group-writable (DESIGN §9): a member of group batchd can plant a symlink, or a
folder of symlinks, wherever batchd would write. So:

* every folder batchd writes into is checked, on a descriptor opened with O_NOFOLLOW, to be a
  real directory owned by batchd (or root); an impostor (a symlink, a file, a folder someone
  else owns) is moved aside beside itself as `NAME.planted-<time>-<random>`, logged, and
  replaced: never written through, never deleted;
* every file batchd creates is opened with O_CREAT|O_EXCL|O_NOFOLLOW, which refuses whatever
  already sits at the name (a dangling symlink included);
* a file batchd was given (a claimed submission, a spec's data file) is opened with O_NOFOLLOW
  and checked on the open descriptor to be a regular file, so a swap after a check cannot
  make batchd read something else.

Modes are explicit, whatever the umask: folders 2750 and files 0640 (group batchd reads,
nobody else), private files 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger("batchd.fs")

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "NAME_MAX",
    "PRIVATE_MODE",
    "NotRegularFile",
    "PlantedEntry",
    "check_within",
    "create_new",
    "fit_name",
    "make_dirs",
    "move_aside",
    "new_file",
    "open_folder",
    "open_regular",
    "real_dir",
]

#: Folders batchd makes: the owner writes, group batchd reads (setgid keeps the group), nobody else.
DIR_MODE = 0o2750
#: Files batchd makes: the owner writes, group batchd reads.
FILE_MODE = 0o640
#: Secrets and the database: the service user alone.
PRIVATE_MODE = 0o600
#: The longest file name, in bytes, on the filesystems batchd runs on (ext4, xfs, btrfs, NFS).
NAME_MAX = 255

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: opening a FIFO must not wait for a writer; cleared once the file is known regular.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotRegularFile(ValueError):
    """A file batchd was given is a symlink, a folder, a FIFO or a device: it is never read."""


class PlantedEntry(OSError):
    """Something batchd did not make sits where it must write, and could not be moved aside."""


def _trusted(uid: int) -> bool:
    # Root's entries cannot be planted by a group member; an operator running a command as root
    # (`batchd retry`) may have made one.
    return uid in (os.geteuid(), 0)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "special file"


def fit_name(name: str, *, extra: int = 0) -> str:
    """`name`, its stem cut short (extension kept) so that it and `extra` more bytes fit NAME_MAX."""
    budget = NAME_MAX - extra
    if len(name.encode()) <= budget:
        return name
    stem, dot, ext = name.rpartition(".")
    suffix = f".{ext}" if dot and stem and len(ext.encode()) < budget // 2 else ""
    if not suffix:
        stem = name
    room = budget - len(suffix.encode())
    return stem.encode()[:room].decode("utf-8", "ignore") + suffix


def move_aside(path: Path, why: str) -> Path:
    """Rename what sits at `path` (never following it) to `NAME.planted-<time>-<random>` beside it.

    Nothing is deleted: whoever planted it finds it there, and the log says where it went.
    """
    try:
        kind = _kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        return path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    tail = f".planted-{stamp}-{secrets.token_hex(3)}"
    aside = path.with_name(fit_name(path.name, extra=len(tail)) + tail)
    os.rename(path, aside)
    log.warning("fs.planted_moved_aside", path=str(path), moved_to=str(aside), kind=kind, why=why)
    return aside


def real_dir(path: Path, mode: int = DIR_MODE, *, tighten: bool = True) -> Path:
    """Make sure `path` is a real directory owned by batchd (or root), creating it with `mode`.

    Its parent must already be checked. An impostor at `path` is moved aside and replaced.
    With `tighten`, a folder batchd owns gets `mode` if its permissions differ (a folder an
    older release made under a loose umask).
    """
    made = False
    for _ in range(3):
        try:
            fd = os.open(path, _DIR)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode)
                made = True
            continue
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            move_aside(path, "batchd writes into a folder of this name")
            continue
        try:
            st = os.fstat(fd)
            owner = None if _trusted(st.st_uid) else st.st_uid
            # mkdir's mode passed through the umask (and may lack setgid); fchmod's does not.
            if owner is None and (made or tighten) and st.st_uid == os.geteuid() and _differs(st.st_mode, mode):
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        if owner is None:
            return path
        move_aside(path, f"a folder batchd writes into, owned by uid {owner}")
    raise PlantedEntry(errno.EEXIST, "something keeps taking the place of a folder batchd writes into", str(path))


def _differs(current: int, wanted: int) -> bool:
    # Setgid aside: the kernel drops it for a group the process is not in, and it only decides
    # the group of new entries.
    return stat.S_IMODE(current) & ~stat.S_ISGID != wanted & ~stat.S_ISGID


def make_dirs(root: Path, parts: Iterable[str], mode: int = DIR_MODE) -> Path:
    """`root/parts...`, each level below `root` checked (or made) by `real_dir`.

    `root` itself is the operator's (the inbox or the outbox, from the config): it must be a
    directory, and is made with `mode` when missing.
    """
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(mode)
    path = root
    for part in parts:
        path = real_dir(path / part, mode)
    return path


def remove_own_files(folder: Path, keep: Collection[str] = ()) -> None:
    """Remove the regular files directly in `folder` (one of batchd's own folders, its parents
    checked by the caller), all but those named in `keep`; then the folder, once empty.

    The folder is opened without following a symlink, its files are unlinked through that
    descriptor, and nothing else is touched: no sub-folder, no entry of another kind.
    A missing folder is nothing to do.
    """
    try:
        fd = os.open(folder, _DIR)
    except FileNotFoundError:
        return
    try:
        with os.scandir(fd) as entries:
            doomed = [e.name for e in entries if e.name not in keep and e.is_file(follow_symlinks=False)]
        for name in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
        with os.scandir(fd) as entries:
            empty = next(entries, None) is None
    finally:
        os.close(fd)
    if empty:
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_within(root: Path, path: Path) -> None:
    """Raise PlantedEntry unless every folder from `root` down to `path` is a real directory
    owned by batchd (or root) and `path` itself is not a symlink: a file batchd made under the
    inbox, read back by its path (an upload copy, a shard), is the file batchd made.

    A `path` outside `root` is not checked.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return
    current = root
    for i, part in enumerate(parts):
        current = current / part
        st = os.lstat(current)
        last = i == len(parts) - 1
        if stat.S_ISLNK(st.st_mode) or not (last or (stat.S_ISDIR(st.st_mode) and _trusted(st.st_uid))):
            log.error("fs.planted_refused", path=str(current), kind=_kind(st.st_mode), uid=st.st_uid, reading=str(path))
            raise PlantedEntry(errno.ELOOP, "batchd does not follow what it did not make", str(current))


def create_new(path: Path, mode: int = FILE_MODE, *, replace_own: bool = False) -> int:
    """Create `path` (O_CREAT|O_EXCL|O_NOFOLLOW) with exactly `mode`; return the descriptor.

    With `replace_own` (a fixed temporary name): a leftover of batchd's own (a regular file it
    owns, with no other link) is removed first; anything else at the name is moved aside.
    Without it, FileExistsError says the name is taken.
    """
    for _ in range(3):
        try:
            fd = os.open(path, _CREATE, mode)
        except FileExistsError:
            if not replace_own:
                raise
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
                # Our own temp file from a write a crash interrupted.
                path.unlink()
            else:
                move_aside(path, "batchd writes a temporary file of this name")
            continue
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise PlantedEntry(errno.EEXIST, "something keeps taking a name batchd creates", str(path))


def new_file(path: Path, mode: int = FILE_MODE, *, replace_own: bool = False, buffering: int = -1) -> IO[bytes]:
    """`create_new`, as a binary stream."""
    return os.fdopen(create_new(path, mode, replace_own=replace_own), "wb", buffering=buffering)


def open_folder(root: Path, parts: Iterable[str], *, make: int | None = None) -> int:
    """A descriptor of `root/parts…`, reached folder by folder without following a symlink;
    with `make` (a mode), missing folders are created. Raises NotRegularFile naming the part
    that is a symlink or not a folder: in the inbox, group members may plant either."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if make is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, make, dir_fd=fd)
            try:
                inner = os.open(part, _DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotRegularFile(f"{part}: not a folder (symlinks are not followed)") from None
                raise
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Path, *, dir_fd: int | None = None) -> int:
    """Open a file batchd was given, for reading, without following a symlink; return the descriptor.

    Raises NotRegularFile for a symlink, a folder, a FIFO or a device: checked on the open
    descriptor, so what is read is what was checked.
    """
    try:
        fd = os.open(path, _READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(f"{path.name} is a symlink") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path.name} is a {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
