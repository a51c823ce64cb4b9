"""Claim folders: who made each one, and when one still without a job may be taken again.

A take makes `inbox/.batchd/claimed/<job id>/`, writes a marker in it naming the claimer (the
daemon's id) and only then renames the dropped file in. Until the job row is recorded the
folder is the claimer's business: another daemon sharing the inbox takes it over only once
the claimer is known to be gone (stopped, or silent for a whole `[cluster] lease_s`; a
restarted daemon's earlier incarnations are marked stopped when it registers), and a folder
with no marker (an older release) or naming a daemon the database does not know, only once
it is older than the lease. The marker's name carries the claimer (`.claimed-by.<id>`), and
taking over renames that very name away first (`.claimed-before.<id>`): of two daemons that
try at once exactly one succeeds.

A claim that cannot be handled at all (its file cannot be rejected either) is moved whole
into `inbox/.batchd/quarantine/<job id>/`, with a log event naming it.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from batchd.safe_fs import create_new, make_dirs

log = structlog.get_logger("batchd.inbox")

__all__ = [
    "MARKER",
    "ClaimFolder",
    "Taking",
    "abandoned",
    "look",
    "quarantine",
    "release",
    "submitted",
    "take_over",
    "write_marker",
]

#: The claimer's marker inside a claim folder, `.claimed-by.<claimer>` (hidden: never taken for
#: the submission itself).
MARKER = ".claimed-by."
#: A marker a takeover replaced, kept for the record (`.claimed-before.none`: the folder had none).
PREVIOUS_MARKER = ".claimed-before."
_NONE = "none"


@dataclass(frozen=True)
class ClaimFolder:
    """A claim folder without a job row, as recovery finds it."""

    id: str
    path: Path
    #: the daemon its marker names; None without a (readable) marker
    claimer: str | None
    #: seconds since the folder last changed (an entry added, renamed or removed)
    age_s: float


class Taking(Collection[str]):
    """The claims this process is working on now (takes run in several threads at once)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, claim_id: str) -> Iterator[None]:
        with self._lock:
            self._ids.add(claim_id)
        try:
            yield
        finally:
            with self._lock:
                self._ids.discard(claim_id)

    def __contains__(self, claim_id: object) -> bool:
        with self._lock:
            return claim_id in self._ids

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._ids))

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


def write_marker(claim_dir: Path, claimer: str, now: float) -> None:
    """Name the claimer inside a new claim folder (O_EXCL: FileExistsError if it is there)."""
    fd = create_new(claim_dir / f"{MARKER}{claimer}")
    with os.fdopen(fd, "wb") as out:
        out.write(json.dumps({"daemon": claimer, "claimed_at": now}).encode() + b"\n")


def _markers(claim_dir: Path, prefix: str) -> list[str]:
    return sorted(p.name[len(prefix) :] for p in claim_dir.iterdir() if p.name.startswith(prefix))


def read_claimer(claim_dir: Path) -> str | None:
    """The claimer a claim folder's marker names; None when it has none."""
    found = _markers(claim_dir, MARKER)
    return found[0] if found else None


def look(path: Path, now: float) -> ClaimFolder | None:
    """The claim folder at `path` (None unless it is a real directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return ClaimFolder(path.name, path, read_claimer(path), max(0.0, now - st.st_mtime))


def abandoned(
    folder: ClaimFolder,
    *,
    me: str,
    taking: Collection[str],
    daemons: Mapping[str, str],
    lease_s: float,
) -> bool:
    """Whether a claim folder without a job row was left by its claimer (pure).

    `me`: this process's claimer id; `taking`: the claims this process is working on now;
    `daemons`: the state of each known claimer ("running", "gone" or "stopped", as
    `batchd status` says).
    """
    if folder.claimer == me:
        return folder.id not in taking
    state = daemons.get(folder.claimer) if folder.claimer is not None else None
    if state is not None:
        return state != "running"
    # No marker (an older release), or a claimer the database does not know: only its age tells.
    return folder.age_s >= lease_s


def take_over(folder: ClaimFolder, me: str, now: float) -> bool:
    """Make this process the claimer of an abandoned folder; False when another got there first."""
    old = folder.claimer or _NONE
    try:
        if folder.claimer is not None:
            # Exactly one of two daemons taking over at once moves this very marker away.
            os.rename(folder.path / f"{MARKER}{old}", folder.path / f"{PREVIOUS_MARKER}{old}")
        else:
            os.close(create_new(folder.path / f"{PREVIOUS_MARKER}{old}"))
    except (FileNotFoundError, FileExistsError):
        return False
    write_marker(folder.path, me, now)
    return True


def submitted(claim_dir: Path) -> list[Path]:
    """What was claimed into a folder: its entries but batchd's own (hidden names) and a spec's `data/`."""
    entries = sorted(p for p in claim_dir.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if not stat.S_ISDIR(p.lstat().st_mode)]
    if files:
        return files
    # A folder was claimed (swapped in for a file): it is the submission, rejected as not a file.
    return [p for p in entries if p.name != "data"]


def release(claim_dir: Path) -> bool:
    """Give back a claim folder whose rename never happened: our markers, then the folder if empty.

    False when something else is left inside: it is kept (never deleted), for the caller to
    move aside.
    """
    for prefix in (MARKER, PREVIOUS_MARKER):
        for claimer in _markers(claim_dir, prefix):
            (claim_dir / f"{prefix}{claimer}").unlink(missing_ok=True)
    try:
        claim_dir.rmdir()
    except OSError as exc:
        log.warning("inbox.claim_folder_kept", path=str(claim_dir), error=str(exc))
        return False
    return True


def quarantine(inbox_dir: Path, claim_dir: Path, *, source: str | None, error: BaseException) -> Path | None:
    """Move a claim that can be neither taken nor rejected into `.batchd/quarantine/`; None if even that fails."""
    try:
        folder = make_dirs(inbox_dir, [".batchd", "quarantine"])
        dest = folder / claim_dir.name
        os.rename(claim_dir, dest)
    except OSError as exc:
        log.error(
            "inbox.claim_stuck", job_id=claim_dir.name, path=str(claim_dir), source=source, error=str(error),
            quarantine_error=str(exc),
        )  # fmt: skip
        return None
    log.error("inbox.quarantined", job_id=claim_dir.name, path=str(dest), source=source, error=str(error))
    return dest
