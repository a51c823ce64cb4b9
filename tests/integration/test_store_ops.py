"""Store methods the operations work added: a sweep's quiet writes in few transactions, and the
remote batches of many jobs in one query. Real SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from batchd.models import JobState
from batchd.store import Store
from tests.databases import database_url

pytestmark = pytest.mark.each_database


def bound_jobs(store: Store, count: int) -> list[tuple[int, str]]:
    found = []
    for n in range(count):
        job = store.insert_job(
            id=f"{n:032d}", name=f"j{n}", source=f"j{n}.jsonl", state=JobState.SUBMITTING, provider="together"
        )
        (record,) = store.plan_round(
            job.id, expect=JobState.SUBMITTING, round_=0, shards=[{"input_path": "x"}], state=JobState.VALIDATING
        )
        store.update_remote(record.id, input_file_id="file-1", remote_id=f"batch-{n}", status="validating")
        found.append((record.id, job.id))
    return found


def test_update_remotes_writes_every_row_a_chunk_per_transaction(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path / "batchd.db"))
    try:
        store.migrate()
        rows = bound_jobs(store, 7)
        begins: list[Any] = []
        event.listen(store.engine, "begin", lambda conn: begins.append(conn))
        changes = [
            (record_id, job_id, {"status": "validating", "progress": 5.0},
             {"state": JobState.VALIDATING, "poll_interval_s": 7.5, "next_check_at": 123.0})
            for record_id, job_id in rows
        ]  # fmt: skip
        store.update_remotes(changes, chunk=3)
        assert len(begins) == 3
        for _record_id, job_id in rows:
            job = store.get_job(job_id)
            assert job is not None and (job.poll_interval_s, job.next_check_at) == (7.5, 123.0)
            assert [b.progress for b in store.remote_batches(job_id)] == [5.0]
    finally:
        store.close()


def test_remote_batches_by_job_reads_many_jobs_at_once(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path / "batchd.db"))
    try:
        store.migrate()
        rows = bound_jobs(store, 3)
        everything = store.remote_batches_by_job()
        assert sorted(everything) == sorted(job_id for _, job_id in rows)
        some = store.remote_batches_by_job([rows[0][1]])
        assert list(some) == [rows[0][1]] and some[rows[0][1]][0].remote_id == "batch-0"
        assert store.remote_batches_by_job([]) == {}
    finally:
        store.close()
