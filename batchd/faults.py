"""What is failing around the daemon right now, and why.

The daemon's rooms meet faults from outside (the database down or read-only, a full disk, a
peer gone) where they happen: each reports the fault under its own name when its work fails
and clears it when that work next succeeds. Nothing here decides to retry: the rooms back off
as they always do; this only keeps the current picture, which `/healthz` answers with (503
while anything fails) and systemd's `STATUS=` line shows, and logs each change once.

`classify` tells such outside faults apart from the provider's answers and from errors no step
expects (bugs), which are the only ones counted against a job.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from enum import StrEnum

import structlog

from batchd import metrics
from batchd.providers.errors import ProviderError
from batchd.store import is_database_error

log = structlog.get_logger("batchd.faults")


class Kind(StrEnum):
    """How a failure is handled (in order of seriousness)."""

    #: the provider said no or could not be reached: the step backs off (ProviderError)
    PROVIDER = "provider"
    #: the database failed (down, locked, read-only): waited out, never counted against a job
    DATABASE = "database"
    #: the filesystem failed (full, read-only, I/O error): waited out, never counted against a job
    DISK = "disk"
    #: anything else: a bug; counted against the job, which is parked past a bound
    UNEXPECTED = "unexpected"


def classify(exc: BaseException) -> Kind:
    """What kind of failure `exc` is (a group of them: the most serious kind among them)."""
    if isinstance(exc, BaseExceptionGroup):
        kinds = {classify(inner) for inner in exc.exceptions}
        return next(kind for kind in reversed(Kind) if kind in kinds)
    if isinstance(exc, ProviderError):
        return Kind.PROVIDER
    if is_database_error(exc):
        return Kind.DATABASE
    if isinstance(exc, OSError):
        return Kind.DISK
    return Kind.UNEXPECTED


def describe(exc: BaseException) -> str:
    """One line for a person: `No space left on device (ENOSPC): /var/lib/batchd/...`."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or type(exc).__name__} ({name}){where}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Faults:
    """The faults the daemon meets now, by the work that met them (`scheduler`, `intake`, ...)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        #: where → (since, why)
        self._now: dict[str, tuple[float, str]] = {}

    def report(self, where: str, exc: BaseException) -> None:
        """`where` failed because of `exc` (logged when the reason is new)."""
        why = f"{classify(exc).value}: {describe(exc)}"
        before = self._now.get(where)
        if before is not None and before[1] == why:
            return
        self._now[where] = (before[0] if before else self._clock(), why)
        metrics.fault(where, True)
        log.warning("fault.raised", where=where, reason=why)

    def clear(self, where: str) -> None:
        """The work at `where` succeeded again."""
        before = self._now.pop(where, None)
        if before is not None:
            metrics.fault(where, False)
            log.info("fault.cleared", where=where, after_s=round(self._clock() - before[0], 3))

    def current(self) -> dict[str, str]:
        """What fails now: where → why."""
        return {where: why for where, (_since, why) in sorted(self._now.items())}

    def summary(self) -> str:
        """`failing: intake (disk: No space left on device (ENOSPC)); ...`, or "" when all is well."""
        if not self._now:
            return ""
        return "failing: " + "; ".join(f"{where} ({why})" for where, why in self.current().items())
