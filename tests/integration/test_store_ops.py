"""Store methods the operations work added: a sweep's quiet writes in few transactions, and the
remote batches of many jobs in one query. Real SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from batchd.models import JobState, RemoteBatch, RemoteStatus
from batchd.store import NextCheck, PollAnswer, ShardPlan, Store
from tests.databases import database_url
from tests.store_helpers import add_job


def remote(batch_id: str, progress: float | None = None) -> RemoteBatch:
    return RemoteBatch(batch_id, RemoteStatus.VALIDATING, "file-1", "/v1/chat/completions", progress=progress)


pytestmark = pytest.mark.each_database


def bound_jobs(store: Store, count: int) -> list[tuple[int, str]]:
    found = []
    for n in range(count):
        job = add_job(store, f"{n:032d}", f"j{n}", provider="together")
        (record,) = store.batches.plan_round(job.id, expect=JobState.RECEIVED, round_=0, shards=[ShardPlan("x")])
        store.batches.record_upload(record.id, file_id="file-1", intent_at=store.now())
        store.batches.bind(record.id, remote(f"batch-{n}"))
        check = NextCheck(JobState.VALIDATING, 5.0, store.now())
        store.jobs.record_answer(job.id, expect=JobState.UPLOADING, check=check)
        found.append((record.id, job.id))
    return found


def test_update_remotes_writes_every_row_a_chunk_per_transaction(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path / "batchd.db"))
    try:
        store.migrate()
        rows = bound_jobs(store, 7)
        begins: list[Any] = []
        event.listen(store.engine, "begin", lambda conn: begins.append(conn))
        check = NextCheck(JobState.VALIDATING, 7.5, 123.0)
        answers = [
            PollAnswer(record_id, job_id, remote(f"batch-{n}", progress=5.0), JobState.VALIDATING, check)
            for n, (record_id, job_id) in enumerate(rows)
        ]
        store.batches.record_polls(answers, chunk=3)
        assert len(begins) == 3
        for _record_id, job_id in rows:
            job = store.jobs.get(job_id)
            assert job is not None and (job.poll_interval_s, job.next_check_at) == (7.5, 123.0)
            assert [b.progress for b in store.batches.of_job(job_id)] == [5.0]
    finally:
        store.close()


def test_remote_batches_by_job_reads_many_jobs_at_once(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path / "batchd.db"))
    try:
        store.migrate()
        rows = bound_jobs(store, 3)
        everything = store.batches.by_job()
        assert sorted(everything) == sorted(job_id for _, job_id in rows)
        some = store.batches.by_job([rows[0][1]])
        assert list(some) == [rows[0][1]] and some[rows[0][1]][0].remote_id == "batch-0"
        assert store.batches.by_job([]) == {}
    finally:
        store.close()
