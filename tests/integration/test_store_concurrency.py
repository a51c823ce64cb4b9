"""The Store's compare-and-set writes under real concurrency: two threads, two transactions.

SQLite's BEGIN IMMEDIATE makes writers queue, so a transaction's reads cannot go stale before
it writes (and these tests, which hold two transactions open at once, would wait forever):
they run on PostgreSQL only. There READ COMMITTED lets two transactions read the same rows
and then both write: each test below makes both read first (a barrier), then checks that
only one wins.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import event

from batchd.models import JobState, NewEvent
from batchd.store import SCHEMA_VERSION, ShardPlan, StaleState, Store
from tests.databases import POSTGRESQL, database_url
from tests.store_helpers import add_job, deliver, end_job

pytestmark = pytest.mark.each_database(POSTGRESQL)

T = TypeVar("T")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(database_url(tmp_path / "batchd.db"))
    s.migrate()
    yield s
    s.close()


def new_job(store: Store, job_id: str, name: str = "report", state: JobState = JobState.RECEIVED) -> None:
    add_job(store, job_id, name, state=state)


def both(*calls: Callable[[], T]) -> list[T | BaseException]:
    """Run the calls in threads at once; each one's result or exception, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.exception() or f.result() for f in futures]


@contextmanager
def meeting_after(store: Store, fragment: str | None, parties: int = 2) -> Iterator[None]:
    """Each of `parties` threads, after its first statement containing `fragment` (None: once its
    transaction has begun), waits for the others."""
    barrier = threading.Barrier(parties, timeout=10)
    seen = threading.local()

    def meet() -> None:
        if not getattr(seen, "met", False):
            seen.met = True
            barrier.wait()

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if fragment is not None and fragment in statement:
            meet()

    def begun(_conn: Any) -> None:
        if fragment is None:
            meet()

    event.listen(store.engine, "after_cursor_execute", after)
    event.listen(store.engine, "begin", begun)
    try:
        yield
    finally:
        event.remove(store.engine, "after_cursor_execute", after)
        event.remove(store.engine, "begin", begun)


def test_two_jobs_never_reserve_the_same_outbox_folder(store: Store, tmp_path: Path) -> None:
    new_job(store, "a" * 32)
    new_job(store, "b" * 32)
    barrier = threading.Barrier(2, timeout=10)

    def nothing_on_disk(path: Path) -> bool:
        # Called after `held` was read: once both transactions have seen the name free, both take it.
        if path.name == "report":
            barrier.wait()
        return False

    results = both(
        lambda: store.jobs.reserve_outbox("a" * 32, [tmp_path / "report", tmp_path / "report.a"], nothing_on_disk),
        lambda: store.jobs.reserve_outbox("b" * 32, [tmp_path / "report", tmp_path / "report.b"], nothing_on_disk),
    )
    assert not any(isinstance(r, BaseException) for r in results), results
    assert sorted(map(str, results)) in (
        [str(tmp_path / "report"), str(tmp_path / "report.b")],
        [str(tmp_path / "report"), str(tmp_path / "report.a")],
    )
    held = {j.id: j.outbox_path for j in store.jobs.select()}
    assert held == {"a" * 32: str(results[0]), "b" * 32: str(results[1])}


def test_a_job_reserved_twice_at_once_keeps_one_folder(store: Store, tmp_path: Path) -> None:
    new_job(store, "a" * 32)
    with meeting_after(store, "outbox_path IN"):
        results = both(
            lambda: store.jobs.reserve_outbox("a" * 32, [tmp_path / "one"], lambda _p: False),
            lambda: store.jobs.reserve_outbox("a" * 32, [tmp_path / "two"], lambda _p: False),
        )
    assert results[0] == results[1], results
    assert store.jobs.get("a" * 32).outbox_path == str(results[0])  # type: ignore[union-attr]


def test_one_transition_wins_a_race(store: Store) -> None:
    new_job(store, "a" * 32)
    with meeting_after(store, None):
        results = both(
            lambda: end_job(store, "a" * 32, JobState.CANCELLED, expect=JobState.RECEIVED),
            lambda: end_job(store, "a" * 32, JobState.FAILED, expect=JobState.RECEIVED),
        )
    assert sorted(type(r).__name__ for r in results) == ["Job", "StaleState"], results


SHARD = ShardPlan(input_path="/x/round-0.jsonl", request_count=1, size_bytes=10, sha256="0" * 64)


def test_one_create_attempt_wins_a_race(store: Store) -> None:
    new_job(store, "a" * 32)
    (record,) = store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    with meeting_after(store, None):
        results = both(
            lambda: store.batches.count_create(record),
            lambda: store.batches.count_create(record),
        )
    assert sorted(type(r).__name__ for r in results) == ["RemoteBatchRecord", "StaleState"], results
    assert isinstance(next(r for r in results if isinstance(r, BaseException)), StaleState)


def test_one_plan_wins_a_race(store: Store) -> None:
    new_job(store, "a" * 32)

    def plan() -> Any:
        return store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD])

    with meeting_after(store, None):
        results = both(plan, plan)
    assert sorted(type(r).__name__ for r in results) == ["StaleState", "list"], results
    assert len(store.batches.of_job("a" * 32)) == 1


def test_one_upload_result_wins_a_race(store: Store) -> None:
    new_job(store, "a" * 32)
    (record,) = store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    with meeting_after(store, None):
        results = both(
            lambda: store.batches.record_upload(record.id, file_id="f1", intent_at=1000.0),
            lambda: store.batches.record_upload(record.id, file_id="f2", intent_at=1000.0),
        )
    assert sorted(type(r).__name__ for r in results) == ["RemoteBatchRecord", "StaleState"], results


def test_two_410s_at_once_disable_the_endpoint(store: Store) -> None:
    with meeting_after(store, "FROM endpoints"):
        results = both(
            lambda: store.deliveries.disable_endpoint("https://gone.example/", "410 Gone"),
            lambda: store.deliveries.disable_endpoint("https://gone.example/", "410 Gone"),
        )
    assert results == [None, None]
    assert store.deliveries.disabled_endpoints() == {"https://gone.example/": "410 Gone"}


def test_two_replays_at_once_add_one_delivery(store: Store) -> None:
    new_job(store, "a" * 32)
    event_ = NewEvent(id="evt_1", type="batch.completed", body=b"{}", targets=[("https://a/", "config")])
    end_job(store, "a" * 32, JobState.COMPLETED, [event_], expect=JobState.RECEIVED)
    (delivery,) = store.deliveries.select(event_id="evt_1")
    deliver(store, delivery)
    # The first replay stops after reading the event's deliveries; the second starts meanwhile.
    release = threading.Event()
    stopped = threading.Event()

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "max(deliveries.id)" in statement and threading.current_thread().name.startswith("first"):
            stopped.set()
            release.wait(10)

    def replay() -> dict[str, str]:
        return store.deliveries.replay_event("evt_1", [("https://a/", "config")])

    event.listen(store.engine, "after_cursor_execute", after)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="first") as first_pool, ThreadPoolExecutor(1) as second_pool:
            first = first_pool.submit(replay)
            assert stopped.wait(10)
            second = second_pool.submit(replay)
            # Unlocked, the second would read the same finished row and queue a second copy now.
            assert wait([second], timeout=0.3).not_done
            release.set()
            outcomes = [first.result(10), second.result(10)]
    finally:
        release.set()
        event.remove(store.engine, "after_cursor_execute", after)
    assert outcomes == [{"https://a/": "queued"}, {"https://a/": "due_now"}]
    assert [d.state for d in store.deliveries.select(event_id="evt_1")] == ["delivered", "pending"]


def test_daemons_starting_together_migrate_once(tmp_path: Path) -> None:
    url = database_url(tmp_path / "fresh.db")
    stores = [Store(url) for _ in range(4)]
    try:
        results = both(*(s.migrate for s in stores))
        # One found a new database (0); the others waited for it and found nothing to do.
        assert sorted(r if isinstance(r, int) else -1 for r in results) == [0] + [SCHEMA_VERSION] * 3, results
        assert stores[0].schema_version() == SCHEMA_VERSION
    finally:
        for s in stores:
            s.close()
