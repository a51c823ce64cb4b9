"""Read-only views for the status page: the newest jobs matching a filter, a page at a time.

Nothing here writes. Every read is bounded by a LIMIT (the store may hold 100,000 jobs),
and walks the `created_at` indexes (schema.py) newest first.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from batchd.models import Job
from batchd.store.database import Database
from batchd.store.rows import job_from_row
from batchd.store.schema import jobs


@dataclass(frozen=True)
class JobsPage:
    """The newest jobs that match, and whether more match beyond them."""

    jobs: list[Job]
    #: more jobs match than were read
    more: bool


def newest_jobs(db: Database, *, state: str | None = None, name: str | None = None, limit: int = 200) -> JobsPage:
    """Up to `limit` jobs (not packs), newest first: in `state` (a JobState value) when given, whose name
    holds `name` (case-insensitive; `%` and `_` are plain characters) when given."""
    query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
    # batchd's own packs are not shown: their files are (docs/design.md, "Packing small files").
    query = query.where(jobs.c.pack_members.is_(None))
    if state:
        query = query.where(jobs.c.state == state)
    if name:
        query = query.where(func.lower(jobs.c.name).contains(name.lower(), autoescape=True))
    with db.read() as conn:
        rows = conn.execute(query).all()
    found = [job_from_row(r._mapping) for r in rows[:limit]]
    return JobsPage(found, more=len(rows) > limit)
