"""Admission (#18): what is in flight at each provider, the queue of jobs waiting for room, and
the writes that let a job in or make it wait (the decision itself: batchd/admission.py).

Every admission is one write transaction: the figures are read and the answer written with no
other admission in between (SQLite's BEGIN IMMEDIATE; on PostgreSQL an advisory lock that every
daemon's admissions take), so two jobs never both take the last room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import BigInteger, ColumnElement, Connection, and_, false, func, literal, or_, select, update

from batchd import admission
from batchd.admission import InFlight, Limit
from batchd.models import BatchStatus, Job, JobState
from batchd.store.database import Database, StaleState, guard
from batchd.store.due import refresh_due
from batchd.store.rows import job_from_row
from batchd.store.schema import jobs, not_in_pack, remote_batches

#: The advisory lock every admission takes on PostgreSQL ("admit" in ASCII).
ADMISSION_LOCK = 0x61646D6974
#: Job states whose tokens and batches count as in flight at the provider (`downloading`: its
#: batches have ended; a follow-up round counts again as it is submitted) ...
SUBMITTED_STATES = [
    s.value
    for s in (
        JobState.UPLOADING,
        JobState.SUBMITTING,
        JobState.VALIDATING,
        JobState.IN_PROGRESS,
        JobState.FINALIZING,
        JobState.CANCELLING,
    )
]
#: ... and those that count only once let in (admitted_at), until their round is planned.
WAITING_STATES = [JobState.RECEIVED.value, JobState.QUEUED.value]
#: Remote batch statuses that hold room at the provider (or will at once: planned, being created).
_HOLDING_BATCHES = [s.value for s in BatchStatus if s.waiting or s.live]


@dataclass(frozen=True)
class Verdict:
    """The outcome of an admission: the job as written, and why it waits (None: let in)."""

    job: Job
    reason: str | None

    @property
    def admitted(self) -> bool:
        return self.reason is None


class AdmissionStore:
    """The queue of jobs waiting for admission, and the figures admission decides on."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def admit(
        self,
        job_id: str,
        *,
        expect: JobState,
        limit: Limit,
        shards: Callable[[Job], int],
        cost: float | None,
    ) -> Verdict:
        """Let the job in (admitted_at set, its estimated cost recorded) or queue it with the
        reason (its next check cleared: a wake-up asks again, `wake_heads`)."""
        now = self._db.now()
        with self._db.write() as conn:
            guard(conn, job_id)
            self._lock(conn)
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
            if row is None or row.state != expect.value:
                raise StaleState(f"job {job_id} is not in state {expect.value}")
            job = job_from_row(row._mapping)
            figures = _in_flight(conn, job, limit, shards)
            reason = admission.decide(job, shards(job), cost, limit, figures)
            # The estimate is kept either way: a queued job too costly for a budget is known as such.
            values: dict[str, object] = {"estimated_cost_usd": cost}
            if reason is None:
                values.update(admitted_at=now, wait_reason=None, next_check_at=now)
            else:
                values.update(state=JobState.QUEUED.value, wait_reason=reason, next_check_at=None)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values, updated_at=now))
            refresh_due(conn, [job_id], now)
            written = job_from_row(conn.execute(select(jobs).where(jobs.c.id == job_id)).one()._mapping)
        return Verdict(written, reason)

    def wake_heads(self) -> int:
        """Make the first queued job of each provider due now (room may have freed up): it asks
        for admission again, and if let in, wakes the next. Returns how many were woken."""
        now = self._db.now()
        with self._db.write() as conn:
            names = [
                str(r[0])
                for r in conn.execute(
                    select(jobs.c.provider_name).where(jobs.c.state == JobState.QUEUED.value, not_in_pack).distinct()
                )
            ]
            woken = []
            for name in names:
                head = conn.execute(
                    select(jobs.c.id, jobs.c.next_check_at)
                    .where(jobs.c.provider_name == name, jobs.c.state == JobState.QUEUED.value, not_in_pack)
                    .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
                    .limit(1)
                ).first()
                if head is not None and (head.next_check_at is None or head.next_check_at > now):
                    woken.append(str(head.id))
            if woken:
                conn.execute(update(jobs).where(jobs.c.id.in_(woken)).values(next_check_at=now))
                refresh_due(conn, woken, now)
        return len(woken)

    def tokens_in_flight(self, job: Job) -> int:
        """The tokens of `job`'s model in flight at its provider beside it (what its queue held)."""
        with self._db.read() as conn:
            return _provider_figures(conn, job, InFlight(), lambda _: 1).tokens

    def queued_count(self) -> int:
        with self._db.read() as conn:
            found = conn.execute(select(func.count()).where(jobs.c.state == JobState.QUEUED.value)).scalar()
        return int(found or 0)

    def spent_since(self, moment: float) -> float:
        """The estimated cost of the jobs let in since `moment` (their usage's, once ended)."""
        with self._db.read() as conn:
            return _spent(conn, moment)

    def record_cost(self, job_id: str, cost_usd: float) -> None:
        """An ended job's cost as its usage says (what spend budgets count from then on)."""
        with self._db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(cost_usd=cost_usd))

    def _lock(self, conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(literal(ADMISSION_LOCK, BigInteger))))


def _in_flight(conn: Connection, job: Job, limit: Limit, shards: Callable[[Job], int]) -> InFlight:
    """The figures `admission.decide` needs, read only for the limits that apply."""
    ahead = conn.execute(
        select(jobs.c.id)
        .where(
            jobs.c.provider_name == job.provider_name,
            jobs.c.state == JobState.QUEUED.value,
            not_in_pack,
            jobs.c.id != job.id,
            or_(
                jobs.c.priority > job.priority,
                and_(
                    jobs.c.priority == job.priority,
                    or_(
                        jobs.c.created_at < job.created_at,
                        and_(jobs.c.created_at == job.created_at, jobs.c.id < job.id),
                    ),
                ),
            ),
            # A job that a spend budget can never let in holds up nobody behind it.
            or_(jobs.c.estimated_cost_usd.is_(None), ~_over_budget(limit)),
        )
        .limit(1)
    ).first()
    figures = InFlight(ahead=ahead is not None)
    if limit.limits_provider:
        figures = _provider_figures(conn, job, figures, shards)
    if limit.limits_spend:
        figures = InFlight(
            ahead=figures.ahead,
            batches=figures.batches,
            tokens=figures.tokens,
            spent_today=_spent(conn, limit.day_start, but=job.id),
            spent_this_month=_spent(conn, limit.month_start, but=job.id),
        )
    return figures


def _before(job: Job) -> ColumnElement[bool]:
    """Jobs ahead of `job` in its queue: of a higher priority, or of its own and earlier."""
    earlier = or_(jobs.c.created_at < job.created_at, and_(jobs.c.created_at == job.created_at, jobs.c.id < job.id))
    return or_(jobs.c.priority > job.priority, and_(jobs.c.priority == job.priority, earlier))


def _over_budget(limit: Limit) -> ColumnElement[bool]:
    """A job whose estimate alone is above a spend budget (SQL)."""
    caps = [c for c in (limit.usd_per_day, limit.usd_per_month) if c]
    if not caps:
        return false()
    return jobs.c.estimated_cost_usd > min(caps)


def _provider_figures(conn: Connection, job: Job, figures: InFlight, shards: Callable[[Job], int]) -> InFlight:
    # Past admission (uploading on), a job holds room whether or not a check let it in (its
    # provider had no limit when it went); before, only once let in.
    holding = and_(
        jobs.c.provider_name == job.provider_name,
        jobs.c.id != job.id,
        # The files of a pack show its state; the pack holds the room.
        not_in_pack,
        or_(
            jobs.c.state.in_(SUBMITTED_STATES),
            and_(jobs.c.state.in_(WAITING_STATES), jobs.c.admitted_at.is_not(None)),
        ),
    )
    batches = conn.execute(
        select(func.count())
        .select_from(remote_batches.join(jobs, remote_batches.c.job_id == jobs.c.id))
        .where(holding, remote_batches.c.round == jobs.c.round, remote_batches.c.status.in_(_HOLDING_BATCHES))
    ).scalar()
    # Let in but not planned yet: the shards they will have (a moment's state, so few of them).
    unplanned = conn.execute(
        select(jobs).where(
            holding,
            jobs.c.state.in_(WAITING_STATES),
            ~select(remote_batches.c.id).where(remote_batches.c.job_id == jobs.c.id).exists(),
        )
    ).all()
    model = func.coalesce(jobs.c.model, "")
    tokens = conn.execute(
        select(
            func.coalesce(
                func.sum(
                    func.coalesce(jobs.c.estimated_input_tokens, 0) + func.coalesce(jobs.c.estimated_output_tokens, 0)
                ),
                0,
            )
        ).where(holding, model == (job.model or ""))
    ).scalar()
    return InFlight(
        ahead=figures.ahead,
        batches=int(batches or 0) + sum(shards(job_from_row(r._mapping)) for r in unplanned),
        tokens=int(tokens or 0),
    )


def _spent(conn: Connection, moment: float, *, but: str | None = None) -> float:
    query = select(func.coalesce(func.sum(func.coalesce(jobs.c.cost_usd, jobs.c.estimated_cost_usd, 0.0)), 0.0)).where(
        jobs.c.admitted_at >= moment
    )
    if but is not None:
        query = query.where(jobs.c.id != but)
    return float(conn.execute(query).scalar() or 0.0)
