"""Jobs: one row per submission, and the named transitions of its life cycle (DESIGN §2).

Every write names what changes (a method per transition, a typed record for its values),
checks the move against `lifecycle.may_move`, and applies only while the job is still in
the state the caller read (else StaleState): a repeated or raced step never writes twice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, fields
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from batchd import lifecycle
from batchd.models import BatchStatus, Job, JobState, NewEvent
from batchd.store.database import Database, StaleState, guard
from batchd.store.deliveries import insert_events
from batchd.store.due import IDS_PER_QUERY, due_when_new, refresh_due
from batchd.store.rows import job_from_row
from batchd.store.schema import LIVE_STATES, jobs, remote_batches, waiting_in_pack
from batchd.store.signals import Signal, bump
from batchd.store.writes import Ending, NewJob, NextCheck, RejectedJob


class IllegalTransition(ValueError):
    """A write that the job life cycle never allows (a bug in the caller, not a race)."""


def check_move(before: JobState, after: JobState) -> None:
    if not lifecycle.may_move(before, after):
        raise IllegalTransition(f"a job never moves from {before.value} to {after.value}")


class JobStore:
    """The `jobs` table: reads, inserts and the life cycle's transitions."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------ reads

    def get(self, job_id: str) -> Job | None:
        with self._db.read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return job_from_row(row._mapping) if row else None

    def ids(self) -> set[str]:
        """Every job id, for matching against claim folders in one query."""
        with self._db.read() as conn:
            return {str(r[0]) for r in conn.execute(select(jobs.c.id)).all()}

    def existing(self, job_ids: Collection[str]) -> set[str]:
        """Those of `job_ids` that have a row."""
        found: set[str] = set()
        wanted = list(job_ids)
        with self._db.read() as conn:
            for start in range(0, len(wanted), IDS_PER_QUERY):
                chunk = wanted[start : start + IDS_PER_QUERY]
                found.update(str(r[0]) for r in conn.execute(select(jobs.c.id).where(jobs.c.id.in_(chunk))))
        return found

    def find(self, ref: str) -> list[Job]:
        """Jobs matching an id, a unique id prefix, or a name (newest first)."""
        with self._db.read() as conn:
            exact = conn.execute(select(jobs).where(jobs.c.id == ref)).first()
            if exact:
                return [job_from_row(exact._mapping)]
            # Ids are lower-case hex: SQLite's LIKE ignores case and PostgreSQL's does not, so the
            # prefix is lowered to find the same jobs on both.
            rows = conn.execute(
                select(jobs)
                .where(or_(jobs.c.id.startswith(ref.lower(), autoescape=True), jobs.c.name == ref))
                .order_by(jobs.c.created_at.desc())
            ).all()
        return [job_from_row(r._mapping) for r in rows]

    def select(self, states: Sequence[JobState] | None = None, *, packs: bool = False) -> list[Job]:
        """Every job (or those in `states`), oldest first; batchd's own packs only with `packs`."""
        query = select(jobs).order_by(jobs.c.created_at, jobs.c.id)
        if not packs:
            query = query.where(jobs.c.pack_members.is_(None))
        if states:
            query = query.where(jobs.c.state.in_([s.value for s in states]))
        with self._db.read() as conn:
            return [job_from_row(r._mapping) for r in conn.execute(query)]

    def live(self, owner: str | None = None) -> list[Job]:
        """Every job not yet in a terminal state (with `owner`: only those that daemon holds).

        For commands and tests: the scheduler reads only what is due (`due`).
        """
        query = select(jobs).where(jobs.c.state.in_(LIVE_STATES)).order_by(jobs.c.created_at, jobs.c.id)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with self._db.read() as conn:
            return [job_from_row(r._mapping) for r in conn.execute(query)]

    def due(self, owner: str, until: float, *, limit: int, skip: Collection[str] = ()) -> list[Job]:
        """Up to `limit` of `owner`'s jobs due by `until`, earliest first, leaving out `skip` (jobs
        with a step running): read from the due index, whatever the number of jobs that wait."""
        # The skipped ones are at most len(skip) of the first rows: asking for that many more
        # finds `limit` others whenever there are, without sending the skip list to the database.
        ids = (
            select(jobs.c.id)
            .where(jobs.c.owner == owner, jobs.c.due_at <= until)
            .order_by(jobs.c.due_at, jobs.c.id)
            .limit(limit + len(skip))
        )
        with self._db.read() as conn:
            wanted = [str(r[0]) for r in conn.execute(ids) if r[0] not in skip][:limit]
            if not wanted:
                return []
            rows = conn.execute(select(jobs).where(jobs.c.id.in_(wanted)).order_by(jobs.c.due_at, jobs.c.id))
            return [job_from_row(r._mapping) for r in rows]

    def provider_names_in_use(self) -> set[str]:
        """The configured providers that jobs not yet ended went to (a reload may not drop them)."""
        query = select(jobs.c.provider_name).where(jobs.c.state.in_(LIVE_STATES)).distinct()
        with self._db.read() as conn:
            return {str(r[0]) for r in conn.execute(query)}

    def next_due(self, owner: str, after: float) -> float | None:
        """When `owner`'s next job falls due after `after` (None: none will by itself)."""
        with self._db.read() as conn:
            found = conn.execute(
                select(func.min(jobs.c.due_at)).where(jobs.c.owner == owner, jobs.c.due_at > after)
            ).scalar()
        return None if found is None else float(found)

    def count_in_flight(self, owner: str, *, cap: int) -> int:
        """How many of `owner`'s jobs the provider holds now, counted up to `cap` at most."""
        in_flight = [s.value for s in lifecycle.IN_FLIGHT]
        query = (
            select(jobs.c.id)
            .where(jobs.c.owner == owner, jobs.c.due_at.is_not(None), jobs.c.state.in_(in_flight))
            .limit(cap)
        )
        with self._db.read() as conn:
            return len(conn.execute(query).all())

    # ------------------------------------------------------------ sweeps (see store/due.py)

    def take_for_sweep(self, owner: str, until: float, hold: float, *, skip: Collection[str] = ()) -> int:
        """Move `owner`'s in-flight jobs due by `until` (but `skip`) out of the due reads, to
        `hold`: a list sweep polls them all, page by page (`held`), and `release_held` gives each
        job not written meanwhile its due time back. Returns how many were taken.

        The one write that sets `due_at` to something other than the life cycle's answer: while
        a sweep holds a job, the scheduler's ticks must not read it (or page past it) again.
        Should the daemon die meanwhile, the jobs are due at `hold` (for whoever holds them then):
        a poll late by at most that long, never a job forgotten.
        """
        in_flight = [s.value for s in lifecycle.IN_FLIGHT]
        query = update(jobs).where(
            jobs.c.owner == owner,
            jobs.c.due_at <= until,
            jobs.c.state.in_(in_flight),
            jobs.c.cancel_requested.is_(False),
            # A job a provider's webhook hinted at is polled on its own at once (see `hint`).
            jobs.c.hinted_at.is_(None),
        )
        if skip:
            query = query.where(jobs.c.id.not_in(sorted(skip)))
        with self._db.write() as conn:
            return int(conn.execute(query.values(due_at=hold)).rowcount)

    def held(self, owner: str, hold: float, *, after: str, limit: int) -> list[Job]:
        """The next page (by id, after `after`) of the jobs a sweep took at `hold`."""
        query = (
            select(jobs)
            .where(jobs.c.owner == owner, jobs.c.due_at == hold, jobs.c.id > after)
            .order_by(jobs.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [job_from_row(r._mapping) for r in conn.execute(query)]

    def release_held(self, owner: str, hold: float) -> int:
        """Every job a sweep took at `hold` and did not write: its due time from the life cycle again."""
        with self._db.write() as conn:
            ids = [
                str(r[0]) for r in conn.execute(select(jobs.c.id).where(jobs.c.owner == owner, jobs.c.due_at == hold))
            ]
            refresh_due(conn, ids, self._db.now())
        return len(ids)

    def waiting(self) -> tuple[int, list[str]]:
        """The live jobs that still have work (not parked), and the ids of the parked ones."""
        live = jobs.c.state.in_(LIVE_STATES)
        with self._db.read() as conn:
            working = conn.execute(select(func.count()).where(live, jobs.c.parked_at.is_(None))).scalar() or 0
            parked = [str(r[0]) for r in conn.execute(select(jobs.c.id).where(live, jobs.c.parked_at.is_not(None)))]
        return int(working), sorted(parked)

    def counts_by_state(self) -> dict[str, int]:
        """Jobs by state, batchd's own packs left out (their files are counted)."""
        query = select(jobs.c.state, func.count()).where(jobs.c.pack_members.is_(None)).group_by(jobs.c.state)
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return {str(state): int(n) for state, n in rows}

    # ------------------------------------------------------------ inserts

    def insert(self, new: NewJob) -> Job:
        """A new job in state `received` (held by `new.hold`'s daemon, if given).

        Idempotent: when a job of that id exists (another daemon recorded the same claim
        first), that job is returned as it is.
        """
        # A job nobody holds (a command made it: `batchd retry`) wakes the daemons to claim it.
        wake = None if new.hold else Signal.JOBS
        return self._insert(_received(new), (), wake=wake)

    def insert_many(self, news: Sequence[NewJob]) -> list[Job]:
        """New jobs as `insert` makes them, all in one transaction (a burst of files: one commit,
        not one per file); in the order given. Idempotent as `insert`: should one of them exist
        already, each is inserted on its own."""
        rows = [_received(new) for new in news]
        if len({frozenset(row) for row in rows}) > 1:
            return [self.insert(new) for new in news]  # held and unheld jobs mixed: not one statement
        now = self._db.now()
        ids = [row["id"] for row in rows]
        rows = [{"created_at": now, "updated_at": now, **row} for row in rows]
        # New jobs have no remote batches: their due times come from the rows themselves (a burst
        # is not read back a second time for them).
        rows = [{**row, "due_at": due_when_new(job_from_row(row), now)} for row in rows]
        try:
            with self._db.write() as conn:
                conn.execute(insert(jobs), rows)
                if any(new.hold is None for new in news):
                    bump(conn, Signal.JOBS)
                found = {
                    str(r.id): job_from_row(r._mapping) for r in conn.execute(select(jobs).where(jobs.c.id.in_(ids)))
                }
        except IntegrityError:
            return [self.insert(new) for new in news]
        return [found[job_id] for job_id in ids]

    def insert_rejected(self, rejected: RejectedJob, events: Sequence[NewEvent]) -> Job:
        """A rejected file, finished at once, and its `batch.rejected` event, in one transaction.

        Idempotent as `insert`: when the job exists, it is returned and no event is added.
        """
        # Created and finished at the same moment: a finish time before the creation time
        # (two readings of the clock) reads as a bug to anyone looking at it.
        values = {**asdict(rejected), "state": JobState.REJECTED.value, "created_at": rejected.finished_at}
        # Its event is held until the file is in rejected/ (`release_held`): a receiver told of
        # the rejection finds the file and its report there.
        return self._insert(values, events, held=True)

    def _insert(
        self, values: dict[str, Any], events: Sequence[NewEvent], *, wake: Signal | None = None, held: bool = False
    ) -> Job:
        now = self._db.now()
        values = {"created_at": now, "updated_at": now, "metadata": {}, **values}
        try:
            with self._db.write() as conn:
                conn.execute(insert(jobs).values(**values))
                refresh_due(conn, [values["id"]], now)
                insert_events(conn, values["id"], events, now, held=held)
                if wake is not None:
                    bump(conn, wake)
                row = conn.execute(select(jobs).where(jobs.c.id == values["id"])).one()
        except IntegrityError:
            # The same id recorded meanwhile (two daemons finishing one claim): that job stands.
            existing = self.get(values["id"])
            if existing is None:
                raise
            return existing
        return job_from_row(row._mapping)

    def take_pack_files(self, pack_id: str, owner: str) -> list[Job]:
        """The files still waiting in a pack, held by `owner` from now on (at a new fence), for the
        pack's holder to settle them: a file is never claimed on its own while in a pack, so
        whoever holds the pack holds its files. Fenced by the pack itself."""
        now = self._db.now()
        waiting = waiting_in_pack(pack_id)
        with self._db.write() as conn:
            guard(conn, pack_id)
            conn.execute(update(jobs).where(waiting).values(owner=owner, fence=jobs.c.fence + 1, updated_at=now))
            rows = conn.execute(select(jobs).where(waiting).order_by(jobs.c.created_at, jobs.c.id))
            return [job_from_row(r._mapping) for r in rows]

    # ------------------------------------------------------------ transitions

    def request_cancel(self, job_id: str) -> Job:
        """The operator asks for a cancel; the daemon carries it out. StaleState once the job has ended."""
        now = self._db.now()
        with self._db.write() as conn:
            changed = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(LIVE_STATES))
                .values(cancel_requested=True, updated_at=now)
            ).rowcount
            if changed != 1:
                raise StaleState(f"job {job_id} has ended (or does not exist): nothing to cancel")
            refresh_due(conn, [job_id], now)
            _cancel_pack_if_all(conn, job_id, now)
            bump(conn, Signal.JOBS)
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
        return job_from_row(row._mapping)

    def record_answer(self, job_id: str, *, expect: JobState, check: NextCheck) -> Job:
        """The provider answered: the job's new state, and when to look again; failures are reset."""
        if check.state.terminal:
            raise IllegalTransition(f"{check.state.value} is an ending: a job ends through finish()")
        return self._move(job_id, expect, next_check_values(check))

    def back_off(self, job_id: str, *, expect: JobState, attempts: int, next_check_at: float, error: str) -> Job:
        """A step failed: the job stays where it is and is tried again at `next_check_at`."""
        return self._move(job_id, expect, {"attempts": attempts, "next_check_at": next_check_at, "last_error": error})

    def record_unexpected(
        self,
        job_id: str,
        *,
        expect: JobState,
        attempts: int,
        failures: int,
        next_check_at: float,
        error: str,
        park: bool,
    ) -> Job:
        """A step failed in a way no step expects (a bug): counted, backed off, and with `park` the
        job is taken out of the scheduler until an operator resumes it (`resume`)."""
        values: dict[str, Any] = {
            "attempts": attempts, "unexpected_failures": failures, "next_check_at": next_check_at, "last_error": error,
        }  # fmt: skip
        if park:
            values.update(parked_at=self._db.now(), parked_reason=error)
        return self._move(job_id, expect, values)

    def resume(self, job_id: str) -> Job:
        """An operator resumes a parked job: it is due now, its failure counts start afresh.
        StaleState when the job is not parked (or has ended)."""
        now = self._db.now()
        with self._db.write() as conn:
            asked = job_id
            # A file waiting in a pack shows the pack's parking: resuming it resumes the pack.
            row = conn.execute(select(jobs.c.pack_id, jobs.c.round).where(jobs.c.id == job_id)).first()
            if row is not None and row.pack_id is not None and row.round == 0:
                job_id = str(row.pack_id)
            changed = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.parked_at.is_not(None), jobs.c.state.in_(LIVE_STATES))
                .values(
                    parked_at=None,
                    parked_reason=None,
                    unexpected_failures=0,
                    attempts=0,
                    next_check_at=now,
                    updated_at=now,
                )
            ).rowcount
            if changed != 1:
                raise StaleState(f"job {asked} is not parked")
            refresh_due(conn, [job_id], now)
            bump(conn, Signal.JOBS)
            resumed = conn.execute(select(jobs).where(jobs.c.id == asked)).one()
        return job_from_row(resumed._mapping)

    def hint(self, provider_name: str, remote_id: str) -> str | None:
        """A provider's webhook says its batch `remote_id` ended: make the job that polls it due now.

        Only a batch of the provider named `provider_name`, of its job's current round, that batchd
        still polls (the job in flight, not parked) counts; returns that job's id, else None (a
        batch batchd does not know, or no longer polls). The job is marked hinted (`hinted_at`):
        the scheduler then polls it with a get of its own rather than a list sweep, and a poll
        answer read before now cannot undo the hint (PollAnswer). The event itself is never
        believed: it only makes the poll come sooner. The jobs signal wakes whichever daemon holds
        the job (on a shared PostgreSQL database, perhaps another one). Idempotent: a repeated
        delivery of the same event only makes the job due now again.
        """
        now = self._db.now()
        polled = (jobs.c.state.in_([s.value for s in lifecycle.IN_FLIGHT]), jobs.c.parked_at.is_(None))
        found = (
            select(jobs.c.id)
            .join(remote_batches, remote_batches.c.job_id == jobs.c.id)
            .where(
                remote_batches.c.remote_id == remote_id,
                remote_batches.c.round == jobs.c.round,
                remote_batches.c.status.in_([s.value for s in BatchStatus if s.live]),
                jobs.c.provider_name == provider_name,
                *polled,
            )
        )
        with self._db.write() as conn:
            job_id = conn.execute(found).scalar()
            if job_id is None:
                return None
            # The job may have moved on since it was found (PostgreSQL, another daemon's poll).
            made_due = update(jobs).where(jobs.c.id == job_id, *polled)
            if conn.execute(made_due.values(hinted_at=now, next_check_at=now, updated_at=now)).rowcount != 1:
                return None
            refresh_due(conn, [job_id], now)
            bump(conn, Signal.JOBS)
        return str(job_id)

    def record_source_changed(self, job_id: str, reason: str) -> Job:
        """The claimed file no longer matches what was submitted: say why (the first reason found stays)."""
        with self._db.write() as conn:
            guard(conn, job_id)
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.source_changed.is_(None))
                .values(source_changed=reason, updated_at=self._db.now())
            )
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise StaleState(f"job {job_id} does not exist")
        return job_from_row(row._mapping)

    def wait_for_room(self, job_id: str, *, expect: JobState, reason: str, retry_at: float) -> Job:
        """The provider refused a create for a full queue: the job (none of whose round's shards it
        holds) waits in `queued` until `retry_at`, or a wake-up, and gives its room back."""
        values = {
            "state": JobState.QUEUED, "wait_reason": reason, "admitted_at": None, "next_check_at": retry_at,
            "attempts": jobs.c.attempts + 1,
        }  # fmt: skip
        return self._move(job_id, expect, values)

    def start_cancelling(self, job_id: str, *, expect: JobState) -> Job:
        """The cancel of the job's live batches is being sent."""
        return self._move(job_id, expect, {"state": JobState.CANCELLING})

    def finish(self, job_id: str, *, expect: JobState, ending: Ending, events: Sequence[NewEvent]) -> Job:
        """The terminal transition and the webhook events it sends, in one transaction."""
        if not ending.state.terminal or ending.state is JobState.REJECTED:
            raise IllegalTransition(f"{ending.state.value} is not how an accepted job ends")
        values = {
            "state": ending.state,
            "finished_at": ending.finished_at,
            "reason": ending.reason,
            "request_counts": dict(ending.request_counts),
            "usage": dict(ending.usage),
            "cost_usd": ending.cost_usd,
            # A finished job is nobody's: `jobs`, `show` and the status page say so.
            "owner": None,
            "lease_until": None,
        }
        return self._move(job_id, expect, values, events)

    def _move(self, job_id: str, expect: JobState, values: dict[str, Any], events: Sequence[NewEvent] = ()) -> Job:
        """Apply `values` while the job is still in `expect` (else StaleState), with `events`."""
        target = values.get("state", expect)
        if target != expect:
            check_move(expect, target)
        now = self._db.now()
        with self._db.write() as conn:
            guard(conn, job_id)
            changed = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == expect.value)
                .values(**db_values(values), updated_at=now)
            ).rowcount
            if changed != 1:
                raise StaleState(f"job {job_id} is not in state {expect.value}")
            refresh_due(conn, [job_id], now)
            insert_events(conn, job_id, events, now)
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
        return job_from_row(row._mapping)

    # ------------------------------------------------------------ outbox

    def reserve_outbox(self, job_id: str, candidates: Sequence[Path], taken: Callable[[Path], bool]) -> Path:
        """Record the job's outbox folder before it is created: the first candidate that no other
        job holds and that `taken` (a look at the disk) does not report in use.

        Reserving first and creating second means a crash in between leaves a reservation
        (the restart creates the folder), never an orphan folder nobody owns.
        """
        with self._db.write() as conn:
            guard(conn, job_id)
            current = conn.execute(select(jobs.c.outbox_path).where(jobs.c.id == job_id)).scalar()
            if current:
                return Path(current)
            held = {
                str(p)
                for (p,) in conn.execute(
                    select(jobs.c.outbox_path).where(jobs.c.outbox_path.in_([str(c) for c in candidates]))
                ).all()
            }
            for candidate in candidates:
                if str(candidate) in held or taken(candidate):
                    continue
                reserved = self._try_reserve(conn, job_id, candidate)
                if reserved is not None:
                    return reserved
        raise FileExistsError(f"every outbox folder name for job {job_id} is taken: {[str(c) for c in candidates]}")

    def _try_reserve(self, conn: Connection, job_id: str, candidate: Path) -> Path | None:
        """Reserve `candidate`; None when another job took it meanwhile.

        On SQLite BEGIN IMMEDIATE keeps everyone else out since the caller read what is held.
        On PostgreSQL another transaction may take this name meanwhile: the unique index
        refuses the second (hence a savepoint, to try the next name), and a reservation of
        this same job made meanwhile is kept (hence `outbox_path IS NULL`).
        """
        try:
            with conn.begin_nested():
                reserved = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.outbox_path.is_(None))
                    .values(outbox_path=str(candidate), updated_at=self._db.now())
                ).rowcount
        except IntegrityError:
            return None
        if reserved == 1:
            return candidate
        current = conn.execute(select(jobs.c.outbox_path).where(jobs.c.id == job_id)).scalar()
        if current is None:
            raise StaleState(f"job {job_id} does not exist")
        return Path(current)


def _cancel_pack_if_all(conn: Connection, job_id: str, now: float) -> None:
    """A file in a pack shares its remote batch with other people's files: its cancel ends it
    `cancelled` when the pack's round ends, and the batch is cancelled at the provider only once
    every file still waiting in the pack asked for it (DESIGN: a cancel stops only one's own)."""
    job = job_from_row(conn.execute(select(jobs).where(jobs.c.id == job_id)).one()._mapping)
    if not job.in_pack or job.pack_id is None:
        return
    wanting = select(jobs.c.id).where(waiting_in_pack(job.pack_id), jobs.c.cancel_requested.is_(False))
    if conn.execute(wanting.limit(1)).first():
        return
    pack = update(jobs).where(jobs.c.id == job.pack_id, jobs.c.state.in_(LIVE_STATES))
    if conn.execute(pack.values(cancel_requested=True, updated_at=now)).rowcount:
        refresh_due(conn, [job.pack_id], now)


def next_check_values(check: NextCheck) -> dict[str, Any]:
    """The job columns a NextCheck sets (the contact worked: the failure count starts again)."""
    return {
        "state": check.state,
        "poll_interval_s": check.poll_interval_s,
        "next_check_at": check.next_check_at,
        "attempts": 0,
        "unexpected_failures": 0,
        "last_error": None,
    }


def db_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Enum members (job states, batch statuses) as the plain strings the columns hold."""
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in values.items()}


def _received(new: NewJob) -> dict[str, Any]:
    """The row of a new job in state `received`, held as `new.hold` says."""
    values = {f.name: getattr(new, f.name) for f in fields(new) if f.name != "hold"}
    values["metadata"] = dict(new.metadata)
    hold = asdict(new.hold) if new.hold is not None else {}
    return {**values, "state": JobState.RECEIVED.value, **hold}
