"""Remote batches: each job's shards and follow-up rounds, and what the provider said of each.

A row is the committed intent to create a batch before it is the batch: `pending` (planned),
`creating` (uploaded, the create may be under way), then the provider's status once bound.
Each write is a compare-and-set on what the caller read, so two racing steps cannot both
proceed (StaleState for the loser).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    func,
    literal,
    or_,
    select,
    update,
)

from batchd.models import BatchStatus, FileFate, FileKind, JobState, RemoteBatch, RemoteBatchRecord
from batchd.store.database import Database, StaleState, fenced, guard
from batchd.store.due import IDS_PER_QUERY, refresh_due
from batchd.store.jobs import check_move, db_values, next_check_values
from batchd.store.rows import remote_from_row
from batchd.store.schema import LIVE_STATES, MIGRATION_LOCK, jobs, remote_batches
from batchd.store.writes import NextCheck, PollAnswer, ShardPlan

#: Rows in the order a job's rounds and shards are read everywhere.
_ORDER = (remote_batches.c.round, remote_batches.c.shard, remote_batches.c.id)


class RemoteBatchStore:
    """The `remote_batches` table: plans, creates, bindings and poll answers."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------ reads

    def of_job(self, job_id: str) -> list[RemoteBatchRecord]:
        """Every remote batch of one job, every round, in order."""
        with self._db.read() as conn:
            rows = conn.execute(select(remote_batches).where(remote_batches.c.job_id == job_id).order_by(*_ORDER)).all()
        return [remote_from_row(r._mapping) for r in rows]

    def by_job(self, job_ids: Collection[str] | None = None) -> dict[str, list[RemoteBatchRecord]]:
        """The remote batches of the given jobs (all jobs when None), by job id, in one query."""
        query = select(remote_batches).order_by(*_ORDER)
        if job_ids is not None:
            if not job_ids:
                return {}
            query = query.where(remote_batches.c.job_id.in_(list(job_ids)))
        found: dict[str, list[RemoteBatchRecord]] = {}
        with self._db.read() as conn:
            for row in conn.execute(query):
                record = remote_from_row(row._mapping)
                found.setdefault(record.job_id, []).append(record)
        return found

    def remote_ids_held(self, owner: str, hold: float, provider: str | None = None) -> set[str]:
        """The provider's ids of the current round's batches of the jobs a sweep took at `hold`
        (with `provider`: only that provider's jobs')."""
        query = _held_batches(select(remote_batches.c.remote_id), owner, hold, provider)
        with self._db.read() as conn:
            return {str(r[0]) for r in conn.execute(query)}

    def earliest_held(self, owner: str, hold: float, provider: str | None = None) -> float | None:
        """When the earliest of the batches `remote_ids_held` names began (unix seconds), as far
        back as a sweep's listing must reach: its creation as the provider reported it (the clock
        its list shows), else batchd's intent to create it, which came first. None for none."""
        start = func.coalesce(remote_batches.c.remote_created_at, remote_batches.c.intent_at)
        query = _held_batches(select(func.min(start)), owner, hold, provider)
        with self._db.read() as conn:
            earliest = conn.execute(query).scalar()
        return float(earliest) if earliest is not None else None

    def bound_among(self, remote_ids: Collection[str]) -> set[str]:
        """Which of `remote_ids` some job owns already (never adopted twice): a reconcile asks
        about what it listed, not about every batch ever bound."""
        wanted = sorted(set(remote_ids))
        found: set[str] = set()
        with self._db.read() as conn:
            for start in range(0, len(wanted), IDS_PER_QUERY):
                chunk = wanted[start : start + IDS_PER_QUERY]
                query = select(remote_batches.c.remote_id).where(remote_batches.c.remote_id.in_(chunk))
                found.update(str(r[0]) for r in conn.execute(query))
        return found

    def unbound_intents(
        self, *, since: float, request_count: int | None, exclude: int, provider: str = "default"
    ) -> list[float]:
        """When each other create was intended that was sent (counted), is not bound yet, and
        belongs to a live job of the provider named `provider`: since `since`, of `request_count`
        requests. Such a create may
        have made the batch a reconcile by request count would otherwise take for its own (a
        dialect without metadata)."""
        query = (
            select(remote_batches.c.intent_at)
            .join(jobs, jobs.c.id == remote_batches.c.job_id)
            .where(
                remote_batches.c.remote_id.is_(None),
                remote_batches.c.status == BatchStatus.CREATING.value,
                remote_batches.c.create_attempts > 0,
                remote_batches.c.intent_at >= since,
                remote_batches.c.request_count == request_count,
                remote_batches.c.id != exclude,
                jobs.c.provider_name == provider,
                jobs.c.state.in_(LIVE_STATES),
            )
        )
        with self._db.read() as conn:
            return [float(r[0]) for r in conn.execute(query)]

    # ------------------------------------------------------------ planning

    def plan_round(
        self,
        job_id: str,
        *,
        expect: JobState,
        round_: int,
        shards: Sequence[ShardPlan],
        stuck_after_s: float | None = None,
    ) -> list[RemoteBatchRecord]:
        """Commit a round's shards (`pending`) and move the job to `uploading`, in one transaction.

        Applies only while the job is still in `expect` (else StaleState), so a repeated step
        never plans a round twice. The job's failure count and next check start afresh;
        `stuck_after_s` is the provider's setting its batches are held to (lifecycle.stuck_limit).
        """
        if expect != JobState.UPLOADING:
            check_move(expect, JobState.UPLOADING)
        now = self._db.now()
        job_values = {
            "state": JobState.UPLOADING, "round": round_, "attempts": 0, "next_check_at": None, "last_error": None,
            "updated_at": now, "stuck_after_s": stuck_after_s,
        }  # fmt: skip
        with self._db.write() as conn:
            guard(conn, job_id)
            changed = conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == expect.value).values(**db_values(job_values))
            ).rowcount
            if changed != 1:
                raise StaleState(f"job {job_id} is not in state {expect.value}")
            # Let in now, if no admission check did so before (nothing limited it): the spend
            # budgets count a job from the moment it goes to its provider.
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.admitted_at.is_(None)).values(admitted_at=now))
            planned = BatchStatus.PENDING.value
            fresh = {"round": round_, "input_file_id": "", "status": planned, "create_attempts": 0, "intent_at": now}
            rows_in = [
                {"job_id": job_id, "shard": index, "updated_at": now, **fresh, **asdict(shard)}
                for index, shard in enumerate(shards)
            ]
            if rows_in:
                conn.execute(remote_batches.insert(), rows_in)
            refresh_due(conn, [job_id], now)
            rows = conn.execute(
                select(remote_batches)
                .where(remote_batches.c.job_id == job_id, remote_batches.c.round == round_)
                .order_by(remote_batches.c.shard)
            ).all()
        return [remote_from_row(r._mapping) for r in rows]

    # ------------------------------------------------------------ before the provider holds it

    def skip(self, record: RemoteBatchRecord) -> RemoteBatchRecord:
        """Never created: the job was cancelled first."""
        return self._set(record.id, {"status": record.status}, {"status": BatchStatus.SKIPPED})

    def refuse(self, record: RemoteBatchRecord, reason: str) -> RemoteBatchRecord:
        """Never created: the provider refused its upload or its create for good."""
        return self._set(record.id, {"status": record.status}, {"status": BatchStatus.REFUSED, "error": reason})

    def requeue(
        self, record: RemoteBatchRecord, remote: RemoteBatch, *, expect: JobState, reason: str, retry_at: float
    ) -> None:
        """The provider failed `record`'s batch for a full queue, having run none of it (OpenAI's
        `token_limit_exceeded`; its create's answer, or a poll's): in one transaction, the batch is
        recorded (bound, if the create's answer said so) as it ended, a new
        intent to create the same shard (the same uploaded file) takes its place, and the job
        waits until `retry_at` (or a wake-up): in `queued` when none of its round is at the
        provider, else where it is."""
        now = self._db.now()
        with self._db.write() as conn:
            guard(conn, record.job_id)
            changed = conn.execute(
                update(remote_batches)
                .where(remote_batches.c.id == record.id, remote_batches.c.status == record.status.value)
                .values(**db_values({**remote_values(remote), "remote_id": remote.id, "updated_at": now}))
            ).rowcount
            if changed != 1:
                raise StaleState(f"remote batch {record.id} changed meanwhile")
            conn.execute(
                remote_batches.insert().values(
                    job_id=record.job_id,
                    round=record.round,
                    shard=record.shard,
                    input_file_id=record.input_file_id,
                    status=BatchStatus.CREATING.value,
                    create_attempts=0,
                    intent_at=now,
                    updated_at=now,
                    input_path=record.input_path,
                    request_count=record.request_count,
                    size_bytes=record.size_bytes,
                    sha256=record.sha256,
                )
            )
            others_live = conn.execute(
                select(remote_batches.c.id).where(
                    remote_batches.c.job_id == record.job_id,
                    remote_batches.c.round == record.round,
                    remote_batches.c.id != record.id,
                    remote_batches.c.status.in_([s.value for s in BatchStatus if s.live]),
                )
            ).first()
            values: dict[str, Any] = {"next_check_at": retry_at, "wait_reason": reason, "updated_at": now}
            if others_live is None:
                check_move(expect, JobState.QUEUED)
                values.update(state=JobState.QUEUED.value, admitted_at=None)
            job_changed = conn.execute(
                update(jobs).where(jobs.c.id == record.job_id, jobs.c.state == expect.value).values(**values)
            ).rowcount
            if job_changed != 1:
                raise StaleState(f"job {record.job_id} is not in state {expect.value}")
            refresh_due(conn, [record.job_id], now)

    def record_upload(
        self, record_id: int, *, file_id: str, intent_at: float, alone_for: str | None = None
    ) -> RemoteBatchRecord:
        """The input file is uploaded, and the intent to create the batch is committed with it,
        its first create attempt counted (as `count_create` would: the create call comes next).
        One commit, not two, for every batch submitted. `alone_for`: as `count_create`'s."""
        values = {
            "input_file_id": file_id,
            "status": BatchStatus.CREATING,
            "intent_at": intent_at,
            "create_attempts": 1,
        }
        check = None if alone_for is None else partial(_no_other_create, provider=alone_for)
        return self._set(record_id, {"status": BatchStatus.PENDING, "create_attempts": 0}, values, check=check)

    def count_create(self, record: RemoteBatchRecord, *, alone_for: str | None = None) -> RemoteBatchRecord:
        """A create is about to be sent: counted first, so that after a crash the next try lists
        before it creates; the compare-and-set stops a second, racing create before the network.

        `alone_for` (a provider whose batches name neither their input nor their job): counted
        only while no other create of that provider's jobs is counted and unanswered, else
        CreatesBusy. One create of unknown outcome at a time is what lets a lost one be found
        again by its request count alone (daemon/submit.py); a parked job's does not count."""
        expect = {"create_attempts": record.create_attempts, "remote_id": None}
        check = None if alone_for is None else partial(_no_other_create, provider=alone_for)
        return self._set(record.id, expect, {"create_attempts": record.create_attempts + 1}, check=check)

    def uncount_create(self, record: RemoteBatchRecord) -> RemoteBatchRecord:
        """The provider refused the create before acting: nothing to reconcile next time."""
        expect = {"create_attempts": record.create_attempts}
        return self._set(record.id, expect, {"create_attempts": record.create_attempts - 1})

    def bind(self, record_id: int, remote: RemoteBatch) -> RemoteBatchRecord:
        """The provider's batch (created or adopted) is this row's, and never another's. Its stuck
        clock starts now (batchd's clock: the provider's may differ; an adopted batch may be older,
        and is given the full limit from here)."""
        values = {
            "remote_id": remote.id,
            "remote_created_at": remote.created_at.timestamp() if remote.created_at else None,
            "answered": remote.answered,
            "progress_at": self._db.now(),
            **remote_values(remote),
        }
        return self._set(record_id, {"remote_id": None}, values)

    def mark_stuck(self, records: Sequence[RemoteBatchRecord]) -> list[RemoteBatchRecord]:
        """batchd found these live batches stuck and is about to cancel them: recorded first (the
        cancel may fail; the record says to send it again), in one transaction. A row that
        changed meanwhile (a poll saw it move) raises StaleState and nothing is recorded."""
        now = self._db.now()
        with self._db.write() as conn:
            for record in records:
                changed = conn.execute(
                    update(remote_batches)
                    .where(
                        remote_batches.c.id == record.id,
                        remote_batches.c.status == record.status.value,
                        remote_batches.c.updated_at == record.updated_at,
                        remote_batches.c.stuck_at.is_(None),
                    )
                    .values(stuck_at=now, updated_at=now)
                ).rowcount
                if changed != 1:
                    raise StaleState(f"remote batch {record.id} changed meanwhile: not marked stuck")
            ids = {r.job_id for r in records}
            for job_id in ids:
                guard(conn, job_id)
            refresh_due(conn, ids, now)
            rows = conn.execute(
                select(remote_batches).where(remote_batches.c.id.in_([r.id for r in records])).order_by(*_ORDER)
            ).all()
        return [remote_from_row(r._mapping) for r in rows]

    def _set(
        self,
        record_id: int,
        expect: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        check: Callable[[Connection, int], None] | None = None,
    ) -> RemoteBatchRecord:
        """Change one row while its `expect` columns still hold those values (else StaleState);
        `check` first, in the same transaction (it raises to refuse)."""
        query = update(remote_batches).where(remote_batches.c.id == record_id)
        for column, value in db_values(expect).items():
            col = remote_batches.c[column]
            query = query.where(col.is_(None) if value is None else col == value)
        now = self._db.now()
        with self._db.write() as conn:
            if check is not None:
                check(conn, record_id)
            if conn.execute(query.values(**db_values(values), updated_at=now)).rowcount != 1:
                raise StaleState(f"remote batch {record_id} changed meanwhile (expected {dict(expect)})")
            row = conn.execute(select(remote_batches).where(remote_batches.c.id == record_id)).one()
            guard(conn, row.job_id)
            refresh_due(conn, [row.job_id], now)
        return remote_from_row(row._mapping)

    # ------------------------------------------------------------ the provider's files

    def note_files(self, record_id: int, fates: Mapping[FileKind, FileFate]) -> RemoteBatchRecord:
        """Record what became of some of a batch's files at the provider (downloaded, deleted, a
        delete refused, expired), beside what is recorded already: a step repeated after a crash
        does not fetch or delete them again, and `batchd show` and job.json say so."""
        now = self._db.now()
        with self._db.write() as conn:
            row = conn.execute(select(remote_batches).where(remote_batches.c.id == record_id)).one()
            guard(conn, row.job_id)
            files = {**(row.provider_files or {}), **{kind.value: fate.value for kind, fate in fates.items()}}
            conn.execute(
                update(remote_batches)
                .where(remote_batches.c.id == record_id)
                .values(provider_files=files, updated_at=now)
            )
            refresh_due(conn, [row.job_id], now)
            row = conn.execute(select(remote_batches).where(remote_batches.c.id == record_id)).one()
        return remote_from_row(row._mapping)

    def input_shared(self, file_id: str, job_id: str, sha256: str | None = None) -> bool:
        """Whether another live job's batch that has not ended uses `file_id` as its input (or
        may: created with it, or about to be). Together gives the same file id to the same
        content uploaded twice, so one job's ended round must not delete another's input: nor
        one that a batch of the same content (`sha256`) not uploaded yet may be given by its
        upload (its answer may be on its way, not yet recorded)."""
        same = remote_batches.c.input_file_id == file_id
        if sha256:
            same = or_(
                same, and_(remote_batches.c.sha256 == sha256, remote_batches.c.status == BatchStatus.PENDING.value)
            )
        query = (
            select(remote_batches.c.id)
            .join(jobs, jobs.c.id == remote_batches.c.job_id)
            .where(
                same,
                remote_batches.c.job_id != job_id,
                remote_batches.c.status.in_([s.value for s in BatchStatus if s.waiting or s.live]),
                jobs.c.state.in_(LIVE_STATES),
            )
            .limit(1)
        )
        with self._db.read() as conn:
            return conn.execute(query).first() is not None

    # ------------------------------------------------------------ the provider's answers

    def record_polls(self, answers: Sequence[PollAnswer], *, chunk: int = 500) -> None:
        """Many poll answers, `chunk` per transaction: each remote batch's news and its job's next check.

        For a sweep's answers that change no status: one fsync per chunk instead of one per
        job, and the write lock is never held for long. A job taken over by another daemon
        meanwhile is left alone; so is a job that moved on since the answer was read (another
        state, or a provider's hint that came since: see PollAnswer), its batches included.
        """
        for answer in answers:
            if answer.check.state != answer.expect:
                check_move(answer.expect, answer.check.state)
        for start in range(0, len(answers), chunk):
            with self._db.write() as conn:
                self._record_chunk(conn, answers[start : start + chunk])

    def _record_chunk(self, conn: Connection, part: Sequence[PollAnswer]) -> None:
        now = self._db.now()
        allowed = fenced(conn, {a.job_id for a in part})
        mine = [a for a in part if a.job_id in allowed]  # the others: taken over by another daemon meanwhile
        if not mine:
            return
        # A few statements for the whole chunk (executemany), not two built and compiled per
        # answer: a sweep of 10,000 jobs spent most of its time building statements. The batches
        # that moved also start their stuck clock again (a statement of their own). All apply
        # only while the job is as the answer was read (its state, its hint): the batches first,
        # while the job row still says so. A stale answer (a provider's webhook came since) writes
        # nothing at all, so it can neither set a batch back nor push the hinted poll into the future.
        unchanged = select(jobs.c.id).where(jobs.c.id == bindparam("job"), _AS_READ).exists()
        for moved in (True, False):
            batch_rows = [
                {"key": a.record_id, "job": a.job_id, **_read_against(a), **_prefixed(_answer_values(a, now), now)}
                for a in mine
                if a.moved is moved
            ]
            if batch_rows:
                conn.execute(_update_many(remote_batches, batch_rows[0], unchanged), batch_rows)
        job_rows = [{"key": a.job_id, **_read_against(a), **_prefixed(_polled(a.check), now)} for a in mine]
        conn.execute(_update_many(jobs, job_rows[0], _AS_READ), job_rows)
        refresh_due(conn, {a.job_id for a in mine}, now)


#: The job row is still as a poll answer was read against: its state and its hint (the bind
#: parameters `expect` and `hint`, see _read_against).
_AS_READ = and_(jobs.c.state == bindparam("expect"), jobs.c.hinted_at.is_not_distinct_from(bindparam("hint")))


def _read_against(answer: PollAnswer) -> dict[str, Any]:
    """The bind parameters of _AS_READ for one answer."""
    return {"expect": answer.expect.value, "hint": answer.hint}


def _polled(check: NextCheck) -> dict[str, Any]:
    """The job columns a poll answer sets: its next check, and no hint left (this was the poll)."""
    return {**next_check_values(check), "hinted_at": None}


def _prefixed(values: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Column values (and updated_at) as the bind parameters of `_update_many`: `v_` + column."""
    return {f"v_{k}": v for k, v in db_values({**values, "updated_at": now}).items()}


def _update_many(table: Table, sample: Mapping[str, Any], *where: ColumnElement[bool]) -> Update:
    """UPDATE table SET column = :v_column, ... WHERE id = :key: one statement for all rows like `sample`."""
    columns: dict[str, Any] = {k.removeprefix("v_"): bindparam(k) for k in sample if k.startswith("v_")}
    return update(table).where(table.c.id == bindparam("key"), *where).values(columns)


def _answer_values(answer: PollAnswer, now: float) -> dict[str, Any]:
    """What a poll answer writes to its batch's row."""
    values = {**remote_values(answer.remote), "answered": answer.answered}
    if answer.moved:
        values["progress_at"] = now
    return values


def remote_values(remote: RemoteBatch) -> dict[str, Any]:
    """What batchd keeps of a remote batch each time it hears about it."""
    expires = remote.results_expire_at
    return {
        "status": BatchStatus.of(remote.status),
        "output_file_id": remote.output_file_id,
        "error_file_id": remote.error_file_id,
        "error": remote.error,
        "progress": remote.progress,
        "results_expire_at": expires.timestamp() if expires is not None else None,
    }


def _held_batches(query: Select[Any], owner: str, hold: float, provider: str | None) -> Select[Any]:
    """`query` over the current round's bound batches of the jobs a sweep took at `hold` (of the
    provider named `provider`, when given)."""
    held = query.join(jobs, jobs.c.id == remote_batches.c.job_id).where(
        jobs.c.owner == owner,
        jobs.c.due_at == hold,
        remote_batches.c.round == jobs.c.round,
        remote_batches.c.remote_id.is_not(None),
    )
    return held if provider is None else held.where(jobs.c.provider_name == provider)


class CreatesBusy(Exception):
    """Another create of the provider is counted and unanswered: this one waits its turn."""


#: The advisory lock (PostgreSQL) under which a create is counted alone (see count_create).
CREATES_LOCK = MIGRATION_LOCK + 1


def _no_other_create(conn: Connection, record_id: int, *, provider: str) -> None:
    """Raise CreatesBusy when another create of the live, unparked jobs of the provider named
    `provider` is counted and not bound (its outcome unknown until its answer or its reconcile)."""
    if conn.dialect.name == "postgresql":
        # Read committed: without the lock, two daemons could both find no other and both count.
        conn.execute(select(func.pg_advisory_xact_lock(literal(CREATES_LOCK, BigInteger))))
    query = (
        select(remote_batches.c.id, remote_batches.c.job_id)
        .join(jobs, jobs.c.id == remote_batches.c.job_id)
        .where(
            remote_batches.c.remote_id.is_(None),
            remote_batches.c.status == BatchStatus.CREATING.value,
            remote_batches.c.create_attempts > 0,
            remote_batches.c.id != record_id,
            jobs.c.provider_name == provider,
            jobs.c.state.in_(LIVE_STATES),
            jobs.c.parked_at.is_(None),
        )
        .limit(1)
    )
    other = conn.execute(query).first()
    if other is not None:
        raise CreatesBusy(f"the create of another batch (job {other.job_id}) awaits its answer or its reconcile")
