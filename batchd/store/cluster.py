"""Cluster membership: the daemons sharing one database, and their leases on jobs (DESIGN §2).

Each daemon registers at start, renews its leases by heartbeat (one row: a job's lease lasts
while its owner's heartbeat does), takes over jobs nobody holds (SKIP LOCKED: daemons claiming
at once never wait on each other or take the same job), and frees its jobs when it stops
cleanly. A claim counts up the job's fence, so a daemon that lost a job cannot commit a step
it started before (see `database.fenced`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import func, insert, or_, select, update

from batchd.store.database import Database
from batchd.store.due import refresh_due
from batchd.store.schema import LIVE_STATES, daemons, deliveries, jobs, not_in_pack


def daemon_state(stopped_at: float | None, heartbeat_at: float, now: float, lease_s: float) -> str:
    """ "stopped", "gone" (no heartbeat for a whole lease: killed, or its host unreachable) or "running"."""
    if stopped_at is not None:
        return "stopped"
    if now - heartbeat_at > lease_s:
        return "gone"
    return "running"


class ClusterStore:
    """The `daemons` table, and the lease columns of jobs and deliveries."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def register(self, daemon_id: str, *, host: str, pid: int, home: str) -> list[str]:
        """Record a starting daemon; return the ids of earlier daemons with the same `home`.

        `home` is host and state directory: the state lock proves those earlier daemons
        dead, so their jobs may be taken over at once rather than when their leases end.
        """
        now = self._db.now()
        with self._db.write() as conn:
            earlier = [
                str(r[0])
                for r in conn.execute(select(daemons.c.id).where(daemons.c.home == home, daemons.c.id != daemon_id))
            ]
            conn.execute(
                insert(daemons).values(id=daemon_id, host=host, pid=pid, home=home, started_at=now, heartbeat_at=now)
            )
            if earlier:
                conn.execute(
                    update(daemons)
                    .where(daemons.c.id.in_(earlier), daemons.c.stopped_at.is_(None))
                    .values(stopped_at=now)
                )
                # Their deliveries too: a delivery cut short by the crash goes out again at once.
                conn.execute(
                    update(deliveries).where(deliveries.c.owner.in_(earlier)).values(owner=None, lease_until=None)
                )
        return earlier

    def renew(self, owner: str) -> None:
        """Heartbeat: this daemon is alive, and so are its leases on every job it holds.

        One row, whatever the number of jobs held: a job's lease lasts while its owner's
        heartbeat is younger than a lease (see `claim`), not until a per-job time renewed here.
        """
        with self._db.write() as conn:
            conn.execute(update(daemons).where(daemons.c.id == owner).values(heartbeat_at=self._db.now()))

    def claim(
        self,
        owner: str,
        lease_s: float,
        *,
        limit: int,
        dead_owners: Collection[str] = (),
        due_within_s: float | None = None,
    ) -> dict[str, int]:
        """Take up to `limit` active jobs nobody holds (no owner, or an owner that stopped or has
        been silent for a whole lease, or one of `dead_owners`); return them (id → fence).
        SKIP LOCKED: daemons claiming at once never wait on each other or take the same job.

        `due_within_s` (the longest poll interval): a taken job due later than that is one a
        sweep of the gone daemon held (JobStore.take_for_sweep) or one in a long backoff: its
        due time is worked out afresh, so a sweep that died is not waited out."""
        now = self._db.now()
        gone = select(daemons.c.id).where(
            or_(daemons.c.stopped_at.is_not(None), daemons.c.heartbeat_at < now - lease_s), daemons.c.id != owner
        )
        free = or_(jobs.c.owner.is_(None), jobs.c.owner.in_(gone))
        if dead_owners:
            free = or_(free, jobs.c.owner.in_(list(dead_owners)))
        with self._db.write() as conn:
            ids = [
                str(r[0])
                for r in conn.execute(
                    select(jobs.c.id)
                    # A file in a pack is never worked on by itself: whoever holds its pack
                    # settles it (JobStore.take_pack_files).
                    .where(jobs.c.state.in_(LIVE_STATES), not_in_pack, free)
                    .where(or_(jobs.c.owner.is_(None), jobs.c.owner != owner))
                    .order_by(jobs.c.created_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ]
            if not ids:
                return {}
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids))
                .values(owner=owner, lease_until=now + lease_s, fence=jobs.c.fence + 1)
            )
            if due_within_s is not None:
                late = select(jobs.c.id).where(jobs.c.id.in_(ids), jobs.c.due_at > now + due_within_s)
                refresh_due(conn, [str(r[0]) for r in conn.execute(late)], now)
            rows = conn.execute(select(jobs.c.id, jobs.c.fence).where(jobs.c.id.in_(ids)))
            return {str(i): int(f) for i, f in rows}

    def release(self, owner: str) -> None:
        """A daemon stopping cleanly: its jobs are free for any daemon at once."""
        now = self._db.now()
        with self._db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.owner == owner).values(owner=None, lease_until=None))
            conn.execute(update(deliveries).where(deliveries.c.owner == owner).values(owner=None, lease_until=None))
            conn.execute(update(daemons).where(daemons.c.id == owner).values(stopped_at=now))

    def states(self, daemon_ids: Collection[str], *, now: float, lease_s: float) -> dict[str, str]:
        """The state of each daemon among `daemon_ids` that the database knows, as `batchd status`
        says it: "stopped" (it said so), "gone" (no heartbeat for a whole lease) or "running"."""
        if not daemon_ids:
            return {}
        with self._db.read() as conn:
            rows = conn.execute(
                select(daemons.c.id, daemons.c.stopped_at, daemons.c.heartbeat_at).where(
                    daemons.c.id.in_(list(daemon_ids))
                )
            ).all()
        return {str(i): daemon_state(stopped_at, heartbeat_at, now, lease_s) for i, stopped_at, heartbeat_at in rows}

    def departed(self, *, now: float, lease_s: float) -> set[str]:
        """Every daemon that is stopped or gone: a new one among them may have left claims behind."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(daemons.c.id).where(
                    or_(daemons.c.stopped_at.is_not(None), daemons.c.heartbeat_at < now - lease_s)
                )
            ).all()
        return {str(r[0]) for r in rows}

    def daemons(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Every daemon that ever ran on this database (or the newest `limit`), newest first, with
        the jobs it holds."""
        held = (
            select(func.count())
            .select_from(jobs)
            .where(jobs.c.owner == daemons.c.id, jobs.c.state.in_(LIVE_STATES))
            .scalar_subquery()
        )
        with self._db.read() as conn:
            query = select(daemons, held.label("jobs")).order_by(daemons.c.started_at.desc()).limit(limit)
            rows = conn.execute(query).all()
        return [dict(r._mapping) for r in rows]
