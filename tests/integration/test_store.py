"""The Store over a real SQLite file and a real PostgreSQL database (each test runs on both)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from batchd.models import JobState, NewEvent
from batchd.store import LEASE, SCHEMA_VERSION, Lease, StaleState, Store
from tests.databases import SQLITE, database_url

pytestmark = pytest.mark.each_database


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(database_url(tmp_path / "batchd.db"), clock=lambda: 1000.0)
    s.migrate()
    yield s
    s.close()


def new_job(store: Store, job_id: str = "a" * 32, name: str = "x", **kw: Any) -> None:
    store.insert_job(id=job_id, name=name, source=f"{name}.jsonl", state=JobState.RECEIVED, provider="local", **kw)


def test_migrate_is_idempotent_and_versioned(tmp_path: Path, store: Store) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    again = Store(store.url)
    assert again.migrate() == SCHEMA_VERSION
    again.close()


def test_sqlite_pragmas(store: Store, database_kind: str) -> None:
    if database_kind != SQLITE:
        pytest.skip("SQLite's own settings")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_a_transition_expects_a_state(store: Store) -> None:
    new_job(store)
    store.update_job("a" * 32, expect=JobState.RECEIVED, state=JobState.UPLOADING)
    with pytest.raises(StaleState):
        store.update_job("a" * 32, expect=JobState.RECEIVED, state=JobState.UPLOADING)
    assert store.get_job("a" * 32).state is JobState.UPLOADING  # type: ignore[union-attr]


def test_terminal_transition_commits_its_events_together(store: Store) -> None:
    new_job(store, webhook_url="https://h/x")
    event = NewEvent(
        id="evt_1",
        type="batch.completed",
        body=b'{"a":1}',
        targets=[("https://a/", "config"), ("https://h/x", "inbox")],
    )
    job = store.update_job("a" * 32, state=JobState.COMPLETED, events_=[event])
    assert job.finished_at == 1000.0
    due = store.due_deliveries(1000.0)
    assert [(d.url, d.secret_ref, d.body, d.event_type) for d in due] == [
        ("https://a/", "config", b'{"a":1}', "batch.completed"),
        ("https://h/x", "inbox", b'{"a":1}', "batch.completed"),
    ]


def test_a_failed_transition_inserts_no_event(store: Store) -> None:
    new_job(store)
    event = NewEvent(id="evt_1", type="batch.completed", body=b"{}", targets=[("https://a/", "config")])
    with pytest.raises(StaleState):
        store.update_job("a" * 32, expect=JobState.DOWNLOADING, state=JobState.COMPLETED, events_=[event])
    assert store.pending_delivery_count() == 0


def test_find_by_id_prefix_and_name(store: Store) -> None:
    new_job(store, "abc" + "0" * 29, name="alpha")
    new_job(store, "abd" + "0" * 29, name="beta")
    assert [j.name for j in store.find_jobs("abc")] == ["alpha"]
    assert [j.name for j in store.find_jobs("beta")] == ["beta"]
    assert len(store.find_jobs("ab")) == 2
    assert store.find_jobs("zzz") == []
    assert store.find_jobs("a%") == []  # LIKE wildcards are escaped


SHARD = {"input_path": "/x/round-0.jsonl", "request_count": 2, "size_bytes": 10, "sha256": "0" * 64}


def test_a_round_is_planned_once_then_uploaded_and_bound(store: Store) -> None:
    new_job(store)
    (record,) = store.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD], state=JobState.UPLOADING)
    assert (record.remote_id, record.status, record.input_path, record.round) == (
        None,
        "pending",
        "/x/round-0.jsonl",
        0,
    )
    with pytest.raises(StaleState):
        store.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD], state=JobState.UPLOADING)
    assert len(store.remote_batches("a" * 32)) == 1
    record = store.update_remote(record.id, expect={"status": "pending"}, input_file_id="file-1", status="creating")
    with pytest.raises(StaleState):
        store.update_remote(record.id, expect={"status": "pending"}, input_file_id="file-2", status="creating")
    store.update_remote(record.id, remote_id="b1", status="validating", job_values={"state": JobState.VALIDATING})
    assert store.get_job("a" * 32).state is JobState.VALIDATING  # type: ignore[union-attr]
    assert store.bound_remote_ids() == {"b1"}
    assert [b.remote_id for b in store.active_remote_batches()["a" * 32]] == ["b1"]


def test_a_tick_keeps_the_objects_of_jobs_and_batches_that_did_not_change(store: Store) -> None:
    new_job(store, "a" * 32, "a")
    new_job(store, "b" * 32, "b")
    (row_a,) = store.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD], state=JobState.UPLOADING)
    (row_b,) = store.plan_round("b" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD], state=JobState.UPLOADING)
    jobs = {job.id: job for job in store.active_jobs()}
    batches = {row.id: row for rows in store.active_remote_batches().values() for row in rows}

    store.update_job("b" * 32, attempts=1)
    store.update_remote(row_b.id, input_file_id="file-b", status="creating")
    again = {job.id: job for job in store.active_jobs(known=jobs)}
    again_batches = store.active_remote_batches(known=batches)

    # One copy in memory of what did not change (a scheduler's poll round may still hold it)...
    assert again["a" * 32] is jobs["a" * 32]
    assert again_batches["a" * 32][0] is batches[row_a.id]
    # ...and what changed is read afresh.
    assert again["b" * 32] is not jobs["b" * 32] and again["b" * 32].attempts == 1
    assert again_batches["b" * 32][0].status == "creating"
    assert store.active_jobs()[0] is not jobs["a" * 32]  # without `known`, every object is new


def test_delivery_scheduling_and_disabled_endpoints(store: Store) -> None:
    new_job(store)
    event = NewEvent(id="evt_1", type="batch.failed", body=b"{}", targets=[("https://a/", "config")])
    store.update_job("a" * 32, state=JobState.FAILED, events_=[event])
    (d,) = store.due_deliveries(1000.0)
    store.update_delivery(d.id, attempts=1, next_attempt_at=1005.0)
    assert store.due_deliveries(1004.0) == []
    assert store.next_delivery_at() == 1005.0
    store.disable_endpoint("https://a/", "410")
    assert store.pending_delivery_count() == 0
    assert store.disabled_endpoints() == {"https://a/": "410"}
    assert store.deliveries(event_id="evt_1")[0].state == "disabled"


def test_integrity_after_use(store: Store, tmp_path: Path, database_kind: str) -> None:
    if database_kind != SQLITE:
        pytest.skip("PRAGMA integrity_check is SQLite's; the PostgreSQL server keeps its own files whole")
    new_job(store)
    conn = sqlite3.connect(tmp_path / "batchd.db")
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_a_database_from_the_first_release_is_migrated_forward(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ux_jobs_outbox_path")
        conn.exec_driver_sql("UPDATE schema_version SET version = 1")
    again = Store(store.url)
    assert again.migrate() == 1
    assert again.schema_version() == SCHEMA_VERSION
    with again.engine.connect() as conn:
        indexes = {index["name"]: index["unique"] for index in inspect(conn).get_indexes("jobs")}
    assert indexes["ux_jobs_outbox_path"]
    again.close()


def test_outbox_reservation_is_unique_sticky_and_skips_folders_in_use(store: Store, tmp_path: Path) -> None:
    new_job(store, "a" * 32, name="report")
    new_job(store, "b" * 32, name="report")
    candidates_a = [tmp_path / "report", tmp_path / "report.aaaaaaaa"]
    candidates_b = [tmp_path / "report", tmp_path / "report.bbbbbbbb"]
    nothing_on_disk = lambda _p: False  # noqa: E731
    assert store.reserve_outbox("a" * 32, candidates_a, nothing_on_disk) == tmp_path / "report"
    # The other job with the same name gets the next name, though nothing exists on disk yet.
    assert store.reserve_outbox("b" * 32, candidates_b, nothing_on_disk) == tmp_path / "report.bbbbbbbb"
    # Asked again (a restart), a job keeps its reservation.
    assert store.reserve_outbox("a" * 32, candidates_a, lambda _p: True) == tmp_path / "report"
    new_job(store, "c" * 32, name="mine")
    user_folder = tmp_path / "mine"
    assert store.reserve_outbox("c" * 32, [user_folder, tmp_path / "mine.cccccccc"], lambda p: p == user_folder) == (
        tmp_path / "mine.cccccccc"
    )


def test_values_come_back_as_they_went_in(store: Store) -> None:
    # What each dialect could store differently: JSON, bytes, floats, booleans, big integers, long strings.
    metadata = {"team": "search", "nested": {"n": [1, 2.5, None, True]}, "text": "naïve ✓"}
    new_job(
        store,
        metadata=metadata,
        size_bytes=5 * 2**30,
        completion_window="1" * 40 + "h",
        cancel_requested=True,
        next_check_at=1_764_000_000.123456,
        request_counts={"total": 3, "completed": 2, "failed": 1},
    )
    job = store.get_job("a" * 32)
    assert job is not None
    assert (job.metadata, job.size_bytes, job.completion_window) == (metadata, 5 * 2**30, "1" * 40 + "h")
    assert job.cancel_requested is True and job.next_check_at == 1_764_000_000.123456
    assert job.request_counts == {"total": 3, "completed": 2, "failed": 1} and job.usage is None
    new_job(store, "b" * 32)
    assert store.get_job("b" * 32).metadata == {}  # type: ignore[union-attr]
    body = bytes(range(256))
    event = NewEvent(id="evt_b", type="batch.failed", body=body, targets=[("u", "config")])
    store.update_job("a" * 32, events_=[event])
    assert store.get_event("evt_b").body == body  # type: ignore[union-attr]
    assert store.deliveries(event_id="evt_b")[0].body == body


def test_an_id_prefix_finds_the_same_jobs_whatever_its_case(store: Store) -> None:
    # SQLite's LIKE ignores ASCII case and PostgreSQL's does not: ids are lower-case hex.
    new_job(store, "abc" + "0" * 29, name="alpha")
    assert [j.name for j in store.find_jobs("ABC")] == ["alpha"]
    assert store.find_jobs("ab_") == [] and store.find_jobs("ab/") == []


def test_record_ids_come_from_the_database(store: Store) -> None:
    new_job(store, "a" * 32)
    new_job(store, "b" * 32)
    (first,) = store.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD], state=JobState.UPLOADING)
    (second,) = store.plan_round("b" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD], state=JobState.UPLOADING)
    assert second.id > first.id
    assert [b.id for b in store.remote_batches("b" * 32)] == [second.id]
    with pytest.raises(StaleState):
        store.update_remote(first.id, expect={"create_attempts": 5}, create_attempts=6)
    assert store.update_remote(first.id, expect={"create_attempts": 0}, create_attempts=1).create_attempts == 1


def test_outside_text_with_a_nul_character_is_recorded(store: Store, database_kind: str) -> None:
    # PostgreSQL refuses NUL in text (SQLite keeps it): there it becomes U+FFFD.
    nul = "\x00" if database_kind == SQLITE else "\ufffd"
    new_job(store, model="a\x00b", webhook_url="https://h/\x00")
    job = store.update_job("a" * 32, last_error="boom\x00", reason="r\x00")
    assert [job.model, job.webhook_url, job.last_error, job.reason] == [
        f"a{nul}b",
        f"https://h/{nul}",
        f"boom{nul}",
        f"r{nul}",
    ]
    event = NewEvent(id="evt_n", type="batch.failed", body=b"{}", targets=[("https://h/\x00", "inbox")])
    store.update_job("a" * 32, events_=[event])
    (delivery,) = store.due_deliveries(1000.0)
    store.record_outcomes([(delivery.id, {"attempts": 1, "last_error": "refused\x00"}, None)])
    assert store.deliveries(event_id="evt_n")[0].last_error == f"refused{nul}"
    store.disable_endpoint("https://h/\x00", "gone\x00")
    assert store.disabled_endpoints() == {f"https://h/{nul}": f"gone{nul}"}
    assert store.deliveries(event_id="evt_n")[0].state == "disabled"


def test_leases_fence_a_daemon_that_lost_its_job(tmp_path: Path) -> None:
    now = [1000.0]
    store = Store(database_url(tmp_path / "lease.db"), clock=lambda: now[0])
    store.migrate()
    try:
        new_job(store, "a" * 32)
        assert store.claim_jobs("A", 30.0, limit=10) == {"a" * 32: 1}
        assert store.claim_jobs("B", 30.0, limit=10) == {}  # held: nobody else takes it
        now[0] += 20
        assert store.renew_leases("A", 30.0) == {"a" * 32: 1}
        now[0] += 29
        assert store.claim_jobs("B", 30.0, limit=10) == {}  # renewed: still A's
        now[0] += 2  # A stalls past its lease: B takes the job over, at the next claim
        assert store.claim_jobs("B", 30.0, limit=10) == {"a" * 32: 2}
        token = LEASE.set(Lease("A", {"a" * 32: 1}))
        try:
            with pytest.raises(StaleState, match="lease was lost"):
                store.update_job("a" * 32, state=JobState.UPLOADING)
        finally:
            LEASE.reset(token)
        token = LEASE.set(Lease("B", {"a" * 32: 2}))
        try:
            assert store.update_job("a" * 32, state=JobState.UPLOADING).state is JobState.UPLOADING
        finally:
            LEASE.reset(token)
        assert store.renew_leases("A", 30.0) == {}
        store.release_jobs("B")
        assert store.get_job("a" * 32).owner is None  # type: ignore[union-attr]
        assert store.claim_jobs("A", 30.0, limit=10) == {"a" * 32: 3}
    finally:
        store.close()


def test_a_restarted_daemon_takes_over_its_dead_predecessors_jobs_at_once(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path / "home.db"), clock=lambda: 1000.0)
    store.migrate()
    try:
        assert store.register_daemon("old", host="h", pid=1, home="h:/state") == []
        new_job(store, "a" * 32)
        assert store.claim_jobs("old", 30.0, limit=10) == {"a" * 32: 1}
        earlier = store.register_daemon("new", host="h", pid=2, home="h:/state")
        assert earlier == ["old"]
        assert store.claim_jobs("new", 30.0, limit=10) == {}  # lease not over yet ...
        assert store.claim_jobs("new", 30.0, limit=10, dead_owners=earlier) == {"a" * 32: 2}  # ... but dead
        states = {d["id"]: (d["stopped_at"] is not None, d["jobs"]) for d in store.list_daemons()}
        assert states == {"old": (True, 0), "new": (False, 1)}
    finally:
        store.close()
