"""The Store over a real SQLite file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchd.models import JobState, NewEvent
from batchd.store import SCHEMA_VERSION, StaleState, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'batchd.db'}", clock=lambda: 1000.0)
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


def test_sqlite_pragmas(store: Store) -> None:
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


def test_integrity_after_use(store: Store, tmp_path: Path) -> None:
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
        names = [row[1] for row in conn.exec_driver_sql("PRAGMA index_list(jobs)")]
    assert "ux_jobs_outbox_path" in names
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
