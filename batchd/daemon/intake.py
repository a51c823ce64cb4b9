"""Intake: taking files from the inbox as they arrive (DESIGN §3).

inotify events are hints and the periodic rescan is the truth: a renamed-in or closed file is
taken at once; a file seen being written is taken when its writer closes it, however long it
pauses (a writer that keeps a file open is not cut short after its first line); a file seen
only by a rescan once it has been quiet for `[inbox] settle_s`. Each take (claim, validate,
record) runs in a worker thread, a few at a time, and a burst is taken up to TAKE_BATCH files
per take (their jobs recorded in one transaction); what a take does is `Inbox.take_many`'s
business. Each full rescan also looks for claims another daemon (or a failed take) left
without a job (`Inbox.recover_abandoned`).
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import anyio.abc
import structlog

from batchd import metrics
from batchd.daemon.context import Context, db
from batchd.faults import Kind as FailureKind
from batchd.faults import classify as classify_failure
from batchd.faults import describe
from batchd.inbox import Inbox, Kind, classify
from batchd.models import JobState
from batchd.watch import InboxWatcher, WatchEvent

log = structlog.get_logger("batchd.daemon")

#: Takes under way at once (each in a worker thread).
MAX_CONCURRENT_TAKES = 4
#: Files one take claims and validates one after the other and records in one transaction: a
#: burst pays one commit per this many files, a lone file is taken at once.
TAKE_BATCH = 256
#: Where intake reports what it meets (Faults).
INTAKE = "intake"


class Intake:
    """Watches the inbox and takes what arrives, until `stop` is set."""

    def __init__(self, ctx: Context, inbox: Inbox, stop: anyio.Event) -> None:
        self._ctx = ctx
        self._inbox = inbox
        self._stop = stop
        self._taking: set[Path] = set()
        #: files waiting for a take, oldest first, and the takes under way
        self._queued: list[Path] = []
        #: set whenever nothing is queued (finishing steps wait on it during a burst: backlog)
        self._caught_up = anyio.Event()
        self._caught_up.set()
        self._takers = 0
        #: files inotify saw being written and not yet closed: taken at their close, not by a rescan
        self._writing: set[Path] = set()
        #: a recovery pass is running (one at a time)
        self._recovering = False
        #: takes started and not yet ended
        self.pending = 0
        #: set once intake has ended (with `once`: the first rescan's files are all taken)
        self.settled = False
        #: set once the inbox is watched: a file written from then on is seen being written
        self.watching = anyio.Event()

    def backlog(self) -> anyio.Event | None:
        """While files found wait for a take (a burst's queue), the event set once none does."""
        return self._caught_up if self._queued else None

    @property
    def drained(self) -> bool:
        """Nothing left to take: intake ended and no take is under way."""
        return self.settled and not self.pending

    async def run(self, once: bool) -> None:
        """Take files until stopped (with `once`: one rescan, then until what it found is taken)."""
        settling: dict[Path, float] = {}
        # Run again after a crash (Daemon._supervise): not settled until this run's rescan is taken,
        # and the files the crashed run had queued are found again by that rescan.
        self.settled = False
        self._taking.difference_update(self._queued)
        self.pending -= len(self._queued)
        self._queued.clear()
        self._caught_up.set()
        watcher = None if once else InboxWatcher(self._ctx.settings.inbox_dir)
        self.watching.set()
        try:
            async with anyio.create_task_group() as takes:
                await self._watch(takes, watcher, settling, once)
            self.settled = True
        finally:
            if watcher is not None:
                watcher.close()

    async def _watch(
        self, takes: anyio.abc.TaskGroup, watcher: InboxWatcher | None, settling: dict[Path, float], once: bool
    ) -> None:
        """Take files as events and rescans find them, until stopped (or, with `once`, settled)."""
        await self._rescan(takes, settling)
        next_rescan = self._ctx.clock() + self._ctx.settings.inbox.rescan_s
        while not self._stop.is_set():
            if once and not settling:
                break
            now = self._ctx.clock()
            deadline = min([next_rescan, *settling.values()])
            events: list[WatchEvent] = []
            if watcher is not None:
                events = await watcher.read(timeout=max(0.0, deadline - now), stop=self._stop)
            else:
                with anyio.move_on_after(max(0.0, deadline - now)):
                    await self._stop.wait()
            rescan = False
            for ev in events:
                if ev.kind == "ready":
                    settling.pop(ev.path, None)
                    self._writing.discard(ev.path)
                    self._start_take(takes, ev.path)
                elif ev.kind == "writing":
                    # Its writer has it open: wait for the close (the next "ready"), not a quiet time.
                    settling.pop(ev.path, None)
                    self._writing.add(ev.path)
                elif ev.kind == "changed":
                    if ev.path not in self._writing:
                        settling[ev.path] = self._ctx.clock() + self._ctx.settings.inbox.settle_s
                else:
                    # Events may have been lost (a queue overflow): closes too, so back to quiet times.
                    self._writing.clear()
                    rescan = True
            now = self._ctx.clock()
            if rescan or now >= next_rescan or any(at <= now for at in settling.values()):
                await self._rescan(takes, settling)
                if now >= next_rescan:
                    next_rescan = now + self._ctx.settings.inbox.rescan_s
                    self._start_recovery(takes)

    async def _rescan(self, takes: anyio.abc.TaskGroup, settling: dict[Path, float]) -> None:
        now = time.time()  # compared with file mtimes, which are wall-clock
        settle = self._ctx.settings.inbox.settle_s
        found = await db(self._inbox.candidates)
        log.debug("inbox.rescanned", candidates=len(found), writing=len(self._writing), settling=len(settling))
        for path in list(settling):
            if path not in found:
                del settling[path]
        self._writing.intersection_update(found)
        for path in found:
            if self._stop.is_set():
                return
            if path in self._writing:
                continue
            if classify(path) is Kind.BAD:
                self._start_take(takes, path)
                continue
            try:
                mtime = path.lstat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime >= settle:
                settling.pop(path, None)
                self._start_take(takes, path)
            else:
                # Seen only by a rescan and still changing: wait until it has been quiet for settle_s.
                settling[path] = self._ctx.clock() + (mtime + settle - now)

    def _start_recovery(self, takes: anyio.abc.TaskGroup) -> None:
        if not self._recovering:
            self._recovering = True
            takes.start_soon(self._recover_abandoned)

    async def _recover_abandoned(self) -> None:
        """Claims left without a job by a daemon that has gone, or by a take that failed."""
        try:
            jobs = await db(self._inbox.recover_abandoned)
        except Exception as exc:
            # The database, briefly: the next rescan tries again.
            log.exception("inbox.recovery_failed", error=str(exc))
            return
        finally:
            self._recovering = False
        for job in jobs:
            metrics.intake(rejected=job.state == JobState.REJECTED)
        if jobs:
            log.info("inbox.recovered_claims", jobs=len(jobs))
            self._ctx.wake()
            self._ctx.poke_deliverer()

    def _start_take(self, takes: anyio.abc.TaskGroup, path: Path) -> None:
        # An event and a rescan can name the same file; one take per path at a time.
        if path in self._taking:
            return
        self._taking.add(path)
        self.pending += 1
        if not self._queued:
            self._caught_up = anyio.Event()
        self._queued.append(path)
        if self._takers < MAX_CONCURRENT_TAKES:
            self._takers += 1
            takes.start_soon(self._take_queued)

    async def _take_queued(self) -> None:
        """Take what is queued: a lone file at once, a burst up to TAKE_BATCH files per trip."""
        try:
            while self._queued:
                batch = self._queued[:TAKE_BATCH]
                del self._queued[:TAKE_BATCH]
                if not self._queued:
                    self._caught_up.set()
                await self._take(batch)
        finally:
            self._takers -= 1

    async def _take(self, paths: list[Path]) -> None:
        try:
            jobs = await db(self._inbox.take_many, paths)
        except Exception as exc:
            # A full disk, the database or a bug must not stop intake; a file claimed without its job
            # is taken again by the recovery of claims.
            self._ctx.faults.report(INTAKE, exc)
            where = str(paths[0]) if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"
            if classify_failure(exc) is FailureKind.UNEXPECTED:
                metrics.unexpected_error(INTAKE)
                log.error("inbox.take_failed", path=where, error=describe(exc), exc_info=exc)
            else:
                log.warning("inbox.take_failed", path=where, error=describe(exc))
            return
        finally:
            self._taking.difference_update(paths)
            self.pending -= len(paths)
        self._ctx.faults.clear(INTAKE)
        for job in jobs:
            if not job.is_pack:  # batchd's own job, not a file taken
                metrics.intake(rejected=job.state == JobState.REJECTED)
        if jobs:
            self._ctx.start_new(jobs)
        if any(job.state == JobState.REJECTED for job in jobs):
            self._ctx.poke_deliverer()
