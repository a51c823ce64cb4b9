"""Each job's `due_at`: when the scheduler next has something to do for it.

The scheduler asks the store "what is due now" (`JobStore.due`) instead of reading every live
job on every tick, so the answer must never be stale: every transaction that changes a job or
its remote batches calls `refresh_due` for those jobs before it commits, and the value comes
from the same `lifecycle.next_action` the scheduler runs (None for a job with nothing left to
do: ended, or parked until an operator resumes it). One rule, one home: a new write that forgot
this would leave its job waiting until its old due time, so every write path goes through here.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from sqlalchemy import Connection, bindparam, or_, select, update

from batchd import lifecycle
from batchd.lifecycle import Step
from batchd.models import Job, RemoteBatchRecord
from batchd.store.rows import job_from_row, remote_from_row
from batchd.store.schema import LIVE_STATES, jobs, remote_batches, waiting_in_pack

#: Ids per IN (…) list: well below SQLite's and PostgreSQL's limits on bound parameters.
IDS_PER_QUERY = 500


def refresh_due(conn: Connection, job_ids: Collection[str], now: float) -> None:
    """Set `due_at` of `job_ids` from their rows and remote batches as this transaction sees them."""
    wanted = sorted(set(job_ids))
    for start in range(0, len(wanted), IDS_PER_QUERY):
        chunk = wanted[start : start + IDS_PER_QUERY]
        batches: dict[str, list[RemoteBatchRecord]] = {}
        for row in conn.execute(select(remote_batches).where(remote_batches.c.job_id.in_(chunk))):
            record = remote_from_row(row._mapping)
            batches.setdefault(record.job_id, []).append(record)
        changes = []
        for row in conn.execute(select(jobs).where(jobs.c.id.in_(chunk))):
            job = job_from_row(row._mapping)
            action = lifecycle.next_action(job, batches.get(job.id, []), now)
            due = None if action.step is Step.NONE else action.at
            if due != job.due_at:
                changes.append({"job_id": job.id, "due": due})
            if job.is_pack and not job.state.terminal:
                _mirror(conn, job, now)
        if changes:
            conn.execute(update(jobs).where(jobs.c.id == bindparam("job_id")).values(due_at=bindparam("due")), changes)


def due_when_new(job: Job, now: float) -> float | None:
    """`due_at` of a job about to be inserted (it has no remote batches yet), as refresh_due
    would set it: the same rule, without reading the row back."""
    action = lifecycle.next_action(job, [], now)
    return None if action.step is Step.NONE else action.at


def _mirror(conn: Connection, pack: Job, now: float) -> None:
    """The files waiting in `pack` show its state (why it waits, while queued; why it is parked,
    while it waits for an operator): `jobs`, `show` and the status page read them as any job.
    Here because every write to a job passes here before it commits; those files are never due
    themselves (lifecycle.next_action)."""
    waiting = update(jobs).where(
        waiting_in_pack(pack.id),
        or_(
            jobs.c.state != pack.state.value,
            jobs.c.wait_reason.is_distinct_from(pack.wait_reason),
            jobs.c.parked_at.is_distinct_from(pack.parked_at),
        ),
    )
    mirrored = {"state": pack.state.value, "wait_reason": pack.wait_reason, "parked_at": pack.parked_at}
    conn.execute(waiting.values(**mirrored, parked_reason=pack.parked_reason, updated_at=now))


def refresh_all(conn: Connection) -> None:
    """Every live job's `due_at` (a database from before the column), page by page."""
    ids = [str(r[0]) for r in conn.execute(select(jobs.c.id).where(jobs.c.state.in_(LIVE_STATES)))]
    refresh_due(conn, ids, time.time())
