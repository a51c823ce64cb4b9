"""The due index (store/due.py): every write keeps each job's `due_at` equal to what the life
cycle says, and the scheduler's reads (`due`, `next_due`, `count_in_flight`) answer from it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from batchd import lifecycle
from batchd.lifecycle import Step
from batchd.models import JobState, RemoteBatch, RemoteStatus
from batchd.store import NextCheck, PollAnswer, ShardPlan, StaleState, Store
from tests.databases import database_url
from tests.hand_clock import Clock
from tests.store_helpers import add_job, end_job

pytestmark = pytest.mark.each_database

SHARD = ShardPlan(input_path="/x/round-0.jsonl", request_count=2, size_bytes=10, sha256="0" * 64)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store(database_url(tmp_path / "batchd.db"), clock=clock)
    s.migrate()
    s.cluster.register("d", host="h", pid=1, home="h:/d")
    yield s
    s.close()


def expected_due(store: Store, job_id: str) -> float | None:
    """What the life cycle says of the job as stored now: its due time, None when nothing is left."""
    job = store.jobs.get(job_id)
    assert job is not None
    action = lifecycle.next_action(job, store.batches.of_job(job_id), store.now())
    return None if action.step is Step.NONE else action.at


def due_at(store: Store, job_id: str) -> float | None:
    job = store.jobs.get(job_id)
    assert job is not None
    return job.due_at


def remote(status: RemoteStatus) -> RemoteBatch:
    return RemoteBatch(id="b1", status=status, input_file_id="file-1", endpoint="/v1/chat/completions")


def test_every_write_of_a_job_s_life_keeps_its_due_time(store: Store, clock: Clock) -> None:
    job_id = "a" * 32
    seen: list[float | None] = []

    def check() -> None:
        assert due_at(store, job_id) == expected_due(store, job_id)
        seen.append(due_at(store, job_id))
        clock.now += 1

    add_job(store, job_id)
    check()  # received: plan now
    (row,) = store.batches.plan_round(job_id, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    check()
    store.jobs.back_off(job_id, expect=JobState.UPLOADING, attempts=1, next_check_at=1500.0, error="503")
    check()
    assert seen[-1] == 1500.0  # a step that failed is due at its retry, not before
    row = store.batches.record_upload(row.id, file_id="file-1", intent_at=clock.now)
    check()
    store.batches.bind(row.id, remote(RemoteStatus.VALIDATING))
    store.jobs.record_answer(job_id, expect=JobState.UPLOADING, check=NextCheck(JobState.VALIDATING, 30.0, 2000.0))
    check()
    assert seen[-1] == 2000.0  # in flight: due at its next poll
    answer = PollAnswer(row.id, job_id, remote(RemoteStatus.IN_PROGRESS), JobState.VALIDATING,
                        NextCheck(JobState.IN_PROGRESS, 60.0, 2600.0))  # fmt: skip
    store.batches.record_polls([answer])
    check()
    assert seen[-1] == 2600.0
    store.jobs.request_cancel(job_id)  # an operator's cancel is due at once, whatever the next poll
    check()
    assert seen[-1] is not None and seen[-1] < 2600.0
    store.jobs.record_unexpected(job_id, expect=JobState.IN_PROGRESS, attempts=1, failures=3,
                                 next_check_at=clock.now, error="bug", park=True)  # fmt: skip
    check()
    assert seen[-1] is None  # parked: never due until resumed
    store.jobs.resume(job_id)
    check()
    assert seen[-1] is not None
    end_job(store, job_id, JobState.CANCELLED, expect=JobState.IN_PROGRESS)
    check()
    assert seen[-1] is None


def test_a_live_batch_is_due_at_its_stuck_deadline_which_a_move_pushes_back(store: Store, clock: Clock) -> None:
    job_id = "c" * 32
    add_job(store, job_id, provider="together")
    (row,) = store.batches.plan_round(job_id, expect=JobState.RECEIVED, round_=0, shards=[SHARD], stuck_after_s=100.0)
    row = store.batches.record_upload(row.id, file_id="file-1", intent_at=clock.now)
    clock.now += 1
    row = store.batches.bind(row.id, remote(RemoteStatus.VALIDATING))
    assert row.progress_at == clock.now  # the stuck clock starts at the bind
    store.jobs.record_answer(job_id, expect=JobState.UPLOADING, check=NextCheck(JobState.VALIDATING, 60.0, 1500.0))
    assert due_at(store, job_id) == expected_due(store, job_id) == row.progress_at + 100  # before the next poll

    def poll(status: RemoteStatus, *, moved: bool) -> None:
        state = lifecycle.state_for_remote(status)
        check = NextCheck(state, 60.0, clock.now + 500)
        job = store.jobs.get(job_id)
        assert job is not None
        store.batches.record_polls([PollAnswer(row.id, job_id, remote(status), job.state, check, moved=moved)])
        assert due_at(store, job_id) == expected_due(store, job_id)

    clock.now += 50
    poll(RemoteStatus.VALIDATING, moved=False)  # no news keeps the deadline
    assert due_at(store, job_id) == row.progress_at + 100
    clock.now += 10
    poll(RemoteStatus.IN_PROGRESS, moved=True)  # it started: the clock starts again
    (row,) = store.batches.of_job(job_id)
    assert row.progress_at == clock.now and due_at(store, job_id) == clock.now + 100
    clock.now += 100
    poll(RemoteStatus.IN_PROGRESS, moved=False)  # polled at the deadline, unmoved: stuck
    job = store.jobs.get(job_id)
    (row,) = store.batches.of_job(job_id)
    assert job is not None and lifecycle.next_action(job, [row], clock.now).step is Step.CANCEL
    assert row.progress_at is not None and due_at(store, job_id) == row.progress_at + 100 <= clock.now
    (marked,) = store.batches.mark_stuck([row])
    assert marked.stuck_at == clock.now and marked.progress_at == row.progress_at
    # The cancel is sent again at each check until the provider says cancelling.
    assert due_at(store, job_id) == expected_due(store, job_id) == clock.now + 500
    with pytest.raises(StaleState):
        store.batches.mark_stuck([row])  # found stuck once: never twice
    clock.now += 1
    poll(RemoteStatus.CANCELLED, moved=False)
    job = store.jobs.get(job_id)
    assert job is not None and job.state is JobState.DOWNLOADING


def test_due_reads_only_what_is_due_in_order_skipping_busy_jobs(store: Store, clock: Clock) -> None:
    ids = [f"{i:032x}" for i in range(6)]
    for i, job_id in enumerate(ids):
        add_job(store, job_id, f"j{i}", state=JobState.IN_PROGRESS)
        store.jobs.back_off(job_id, expect=JobState.IN_PROGRESS, attempts=1, next_check_at=1100.0 + 10 * i, error="x")
    store.cluster.claim("d", 30.0, limit=len(ids) - 1)  # the last one belongs to nobody yet
    mine = ids[:-1]

    assert store.jobs.due("d", 1000.0, limit=10) == []
    assert store.jobs.next_due("d", 1000.0) == 1100.0
    assert [j.id for j in store.jobs.due("d", 1125.0, limit=10)] == mine[:3]
    assert [j.id for j in store.jobs.due("d", 1125.0, limit=2)] == mine[:2]
    # A busy job is left out and the page is still full when there are enough others.
    assert [j.id for j in store.jobs.due("d", 1125.0, limit=2, skip={mine[0]})] == mine[1:3]
    assert [j.id for j in store.jobs.due("d", 9999.0, limit=10)] == mine  # never another daemon's job
    assert store.jobs.next_due("d", 1140.0) is None  # the 6th job is nobody's: not this daemon's to wait for
    assert store.jobs.count_in_flight("d", cap=3) == 3
    assert store.jobs.count_in_flight("d", cap=100) == 5


def test_a_database_from_before_the_due_index_gets_every_live_job_s_due_time(store: Store, clock: Clock) -> None:
    add_job(store, "a" * 32, "a", state=JobState.IN_PROGRESS)
    add_job(store, "b" * 32, "b", state=JobState.COMPLETED)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET due_at = NULL")
        conn.exec_driver_sql("UPDATE schema_version SET version = 5")
    again = Store(store.url, clock=clock)
    try:
        again.migrate()
        assert due_at(again, "a" * 32) is not None and due_at(again, "a" * 32) == expected_due(again, "a" * 32)
        assert due_at(again, "b" * 32) is None
    finally:
        again.close()


def test_a_database_from_before_stuck_batches_starts_each_bound_batch_s_clock_at_its_last_write(
    store: Store, clock: Clock
) -> None:
    job_id = "d" * 32
    add_job(store, job_id, provider="together")
    (row,) = store.batches.plan_round(job_id, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    row = store.batches.record_upload(row.id, file_id="file-1", intent_at=clock.now)
    row = store.batches.bind(row.id, remote(RemoteStatus.VALIDATING))
    store.jobs.record_answer(job_id, expect=JobState.UPLOADING, check=NextCheck(JobState.VALIDATING, 60.0, 1e9))
    with store.engine.begin() as conn:  # as an older release left it: no clock, a due time without it
        conn.exec_driver_sql("UPDATE remote_batches SET progress_at = NULL, updated_at = 5000")
        conn.exec_driver_sql("UPDATE jobs SET due_at = 1e9")
        conn.exec_driver_sql("UPDATE schema_version SET version = 8")
    again = Store(store.url, clock=clock)
    try:
        again.migrate()
        (migrated,) = again.batches.of_job(job_id)
        assert migrated.progress_at == 5000.0 and migrated.stuck_at is None
        # Due at the stuck deadline of Together's default, counted from that write.
        assert due_at(again, job_id) == expected_due(again, job_id) == 5000.0 + 6 * 3600
    finally:
        again.close()


def test_a_sweep_takes_its_jobs_out_of_the_due_reads_until_it_writes_or_releases_them(
    store: Store, clock: Clock
) -> None:
    ids = [f"{i:032x}" for i in range(5)]
    for i, job_id in enumerate(ids):
        add_job(store, job_id, f"j{i}", state=JobState.IN_PROGRESS)
        store.jobs.back_off(job_id, expect=JobState.IN_PROGRESS, attempts=1, next_check_at=1000.0 + 10 * i, error="x")
    store.cluster.claim("d", 30.0, limit=10)
    store.jobs.request_cancel(ids[4])  # a cancel is the scheduler's step, never a sweep's poll
    clock.now = 1001.0

    hold = 1061.0
    # Due now or within the look-ahead (until 1025), but not the busy one: three taken.
    assert store.jobs.take_for_sweep("d", 1025.0, hold, skip={ids[1]}) == 2
    assert {j.id for j in store.jobs.held("d", hold, after="", limit=10)} == {ids[0], ids[2]}
    assert [j.id for j in store.jobs.due("d", 1025.0, limit=10)] == [ids[4], ids[1]]  # the taken ones are out
    assert store.jobs.held("d", hold, after=ids[0], limit=10)[0].id == ids[2]  # pages by id

    # One is answered (its due time comes from the life cycle again), the other released untouched.
    answer = NextCheck(JobState.IN_PROGRESS, 60.0, 1500.0)
    store.jobs.record_answer(ids[0], expect=JobState.IN_PROGRESS, check=answer)
    assert store.jobs.release_held("d", hold) == 1
    assert due_at(store, ids[0]) == 1500.0 and due_at(store, ids[2]) == 1020.0
    assert store.jobs.held("d", hold, after="", limit=10) == []


def test_a_sweep_knows_how_far_back_the_batches_it_took_go(store: Store, clock: Clock) -> None:
    # (job, the provider's created_at or None, batchd's intent)
    made = [("a" * 32, 700.0, 800.0), ("b" * 32, None, 750.0), ("c" * 32, None, 100.0)]
    for job_id, created, intent in made:
        add_job(store, job_id, job_id[0])
        (row,) = store.batches.plan_round(job_id, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
        row = store.batches.record_upload(row.id, file_id="file-1", intent_at=intent)
        at = datetime.fromtimestamp(created, UTC) if created is not None else None
        store.batches.bind(row.id, replace(remote(RemoteStatus.VALIDATING), id=f"b-{job_id[0]}", created_at=at))
        store.jobs.record_answer(job_id, expect=JobState.UPLOADING, check=NextCheck(JobState.VALIDATING, 5.0, 1001.0))
    store.cluster.claim("d", 30.0, limit=10)
    hold = 1061.0
    assert store.batches.earliest_held("d", hold) is None  # nothing taken yet
    # c is busy: left out, and so is its old intent.
    assert store.jobs.take_for_sweep("d", 1025.0, hold, skip={"c" * 32}) == 2
    assert store.batches.remote_ids_held("d", hold) == {"b-a", "b-b"}
    # a counts from the provider's creation (700, not its intent at 800); b, never dated, from its intent.
    assert store.batches.earliest_held("d", hold) == 700.0


def test_jobs_a_dead_daemon_s_sweep_held_are_due_again_for_the_daemon_that_takes_them(
    store: Store, clock: Clock
) -> None:
    add_job(store, "a" * 32, "a", state=JobState.IN_PROGRESS)
    store.jobs.back_off("a" * 32, expect=JobState.IN_PROGRESS, attempts=1, next_check_at=1010.0, error="x")
    store.cluster.claim("d", 30.0, limit=10)
    assert store.jobs.take_for_sweep("d", 1030.0, 1600.0) == 1  # d's sweep holds it, then d dies
    clock.now = 1100.0
    store.cluster.register("e", host="h", pid=2, home="h:/e")
    assert store.cluster.claim("e", 30.0, limit=10, due_within_s=60.0) == {"a" * 32: 2}
    assert due_at(store, "a" * 32) == 1010.0  # its own due time (overdue: polled at once), not d's hold
