"""Taking again the claims that a take left without a job: at start-up, and on every full rescan.

A claim folder without a job row is normal for a moment (a take between its rename and its
commit, here or in another daemon sharing the inbox) and a leftover after a crash. Which
one it is, `claims.abandoned` decides from the folder's marker and the `daemons` table;
only an abandoned claim is taken over and finished. Each claim is handled on its own:
whatever goes wrong with one is logged and that claim waits for the next pass, while the
others go on.

Start-up looks at every claim folder. Later passes, on each full rescan, look again at the
claims they had to leave (a live claimer's, or one that failed for a passing reason), and at
every claim folder when a daemon has stopped or gone silent since the last look: its
claims in progress are now abandoned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from pathlib import Path

import structlog

from batchd import claims
from batchd.claims import ClaimFolder, Taking
from batchd.config import Settings
from batchd.models import Job
from batchd.store import Store

log = structlog.get_logger("batchd.inbox")

__all__ = ["ClaimRecovery"]


class ClaimRecovery:
    """Finds abandoned claim folders and hands each to `settle` (the inbox's take, after the claim)."""

    def __init__(
        self,
        *,
        store: Store,
        settings: Callable[[], Settings],
        inbox_dir: Callable[[], Path],
        me: str,
        taking: Taking,
        settle: Callable[[str, Path], Job | None],
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._settings = settings
        self._inbox_dir = inbox_dir
        self._me = me
        self._taking = taking
        self._settle = settle
        self._clock = clock
        #: claims left for a later pass (a live claimer's, or one that failed for a passing reason)
        self._deferred: set[str] = set()
        self._lock = threading.Lock()
        #: the daemons known to have stopped or gone at the last full pass (None: none made yet)
        self._departed: set[str] | None = None

    def defer(self, claim_id: str) -> None:
        """Look at this claim again at the next pass (a take of ours that failed for a passing reason)."""
        with self._lock:
            self._deferred.add(claim_id)

    def _undefer(self, claim_ids: Collection[str]) -> None:
        with self._lock:
            self._deferred.difference_update(claim_ids)

    def everything(self) -> list[Job]:
        """Every claim folder without a job row (start-up)."""
        # Read before the folders are listed: a daemon leaving after this is seen at the next pass.
        self._departed = self._store.cluster.departed(now=self._store.now(), lease_s=self._lease_s)
        known = self._store.jobs.ids()
        try:
            names = [p.name for p in self._root.iterdir()]
        except FileNotFoundError:
            return []
        return self._recover({n for n in names if n not in known})

    def abandoned(self) -> list[Job]:
        """The claims left for later, or every claim folder when a daemon has left since the last look."""
        departed = self._store.cluster.departed(now=self._store.now(), lease_s=self._lease_s)
        # A daemon that stalled past its lease and came back leaves the set: when it goes again,
        # it counts as new.
        seen, self._departed = self._departed, departed
        if seen is None or not departed <= seen:
            return self.everything()
        with self._lock:
            waiting = set(self._deferred)
        if not waiting:
            return []
        recorded = self._store.jobs.existing(waiting)
        self._undefer(recorded)
        return self._recover(waiting - recorded)

    @property
    def _root(self) -> Path:
        return self._inbox_dir() / ".batchd" / "claimed"

    @property
    def _lease_s(self) -> float:
        return self._settings().cluster.lease_s

    def _recover(self, claim_ids: Collection[str]) -> list[Job]:
        now = self._clock()
        root = self._root
        folders = [f for f in (claims.look(root / i, now) for i in sorted(claim_ids)) if f is not None]
        self._undefer(set(claim_ids) - {f.id for f in folders})
        claimers = {f.claimer for f in folders if f.claimer is not None}
        daemons = self._store.cluster.states(claimers, now=self._store.now(), lease_s=self._lease_s)
        jobs: list[Job] = []
        for folder in folders:
            if not claims.abandoned(folder, me=self._me, taking=self._taking, daemons=daemons, lease_s=self._lease_s):
                with self._lock:
                    first_look = folder.id not in self._deferred
                    self._deferred.add(folder.id)
                if first_look:
                    log.info("inbox.claim_in_progress", job_id=folder.id, claimer=folder.claimer)
                continue
            try:
                job = self._recover_one(folder)
            except Exception as exc:
                # Not this claim's fault (the database, a full disk) or a bug: it waits for the next pass.
                log.exception("inbox.claim_deferred", job_id=folder.id, error=str(exc))
                self.defer(folder.id)
                continue
            self._undefer([folder.id])
            if job is not None:
                jobs.append(job)
        return jobs

    def _recover_one(self, folder: ClaimFolder) -> Job | None:
        with self._taking.hold(folder.id):
            if self._store.jobs.get(folder.id) is not None:
                return None  # recorded meanwhile
            if not claims.take_over(folder, self._me, self._clock()):
                log.info("inbox.claim_taken_by_another", job_id=folder.id)
                return None
            entries = claims.submitted(folder.path)
            if not entries:
                # A claim whose rename never happened: our marker, an empty folder. Anything else
                # found there is nobody's submission: moved aside, never deleted.
                if not claims.release(folder.path):
                    error = OSError("no submission in it, and it is not empty")
                    claims.quarantine(self._inbox_dir(), folder.path, source=None, error=error)
                return None
            log.warning(
                "inbox.recovering_claim", job_id=folder.id, source=entries[0].name, claimer=folder.claimer,
                age_s=round(folder.age_s, 3),
            )  # fmt: skip
            return self._settle(folder.id, entries[0])
