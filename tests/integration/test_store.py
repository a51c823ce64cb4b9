"""The Store over a real SQLite file and a real PostgreSQL database (each test runs on both)."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from batchd.models import BatchStatus, DeliveryState, JobState, NewEvent, RemoteBatch, RemoteStatus
from batchd.store import (
    LEASE,
    SCHEMA_VERSION,
    CreatesBusy,
    DeadLettered,
    Delivered,
    Ending,
    EndpointGone,
    Hold,
    IllegalTransition,
    Lease,
    NewJob,
    NextCheck,
    Parked,
    RetryLater,
    ShardPlan,
    Signal,
    StaleState,
    Store,
)
from tests.databases import SQLITE, database_url
from tests.store_helpers import add_in_flight, add_job, end_job, fail_attempt

pytestmark = pytest.mark.each_database


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(database_url(tmp_path / "batchd.db"), clock=lambda: 1000.0)
    s.migrate()
    yield s
    s.close()


def new_job(store: Store, job_id: str = "a" * 32, name: str = "x", **kw: Any) -> None:
    add_job(store, job_id, name, **kw)


def answered(state: JobState) -> NextCheck:
    return NextCheck(state, 5.0, 1005.0)


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
    store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[])
    with pytest.raises(StaleState):
        store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[])
    assert store.jobs.get("a" * 32).state is JobState.UPLOADING  # type: ignore[union-attr]
    with pytest.raises(StaleState):
        store.jobs.back_off("a" * 32, expect=JobState.RECEIVED, attempts=1, next_check_at=1001.0, error="late")
    store.jobs.record_answer("a" * 32, expect=JobState.UPLOADING, check=answered(JobState.VALIDATING))
    assert store.jobs.get("a" * 32).state is JobState.VALIDATING  # type: ignore[union-attr]


def test_a_move_the_life_cycle_never_makes_is_refused(store: Store) -> None:
    new_job(store)
    with pytest.raises(IllegalTransition):  # only planning a round leaves `received`
        store.jobs.record_answer("a" * 32, expect=JobState.RECEIVED, check=answered(JobState.IN_PROGRESS))
    with pytest.raises(IllegalTransition):  # an ending comes only through finish(), with its events
        store.jobs.record_answer("a" * 32, expect=JobState.RECEIVED, check=answered(JobState.COMPLETED))
    end_job(store, "a" * 32, JobState.CANCELLED, expect=JobState.RECEIVED)
    with pytest.raises(IllegalTransition):  # nothing leaves an ending
        store.batches.plan_round("a" * 32, expect=JobState.CANCELLED, round_=1, shards=[])
    with pytest.raises(IllegalTransition):
        end_job(store, "a" * 32, JobState.COMPLETED, expect=JobState.CANCELLED)
    with pytest.raises(StaleState):  # a cancel asked for too late
        store.jobs.request_cancel("a" * 32)
    assert store.jobs.get("a" * 32).state is JobState.CANCELLED  # type: ignore[union-attr]


def test_terminal_transition_commits_its_events_together(store: Store) -> None:
    new_job(store, webhook_url="https://h/x")
    event = NewEvent(
        id="evt_1",
        type="batch.completed",
        body=b'{"a":1}',
        targets=[("https://a/", "config"), ("https://h/x", "inbox")],
    )
    job = end_job(store, "a" * 32, JobState.COMPLETED, [event], expect=JobState.RECEIVED)
    assert job.finished_at == 1000.0
    due = store.deliveries.due(1000.0)
    assert [(d.url, d.secret_ref, d.body, d.event_type) for d in due] == [
        ("https://a/", "config", b'{"a":1}', "batch.completed"),
        ("https://h/x", "inbox", b'{"a":1}', "batch.completed"),
    ]


def test_a_failed_transition_inserts_no_event(store: Store) -> None:
    new_job(store)
    event = NewEvent(id="evt_1", type="batch.completed", body=b"{}", targets=[("https://a/", "config")])
    with pytest.raises(StaleState):
        end_job(store, "a" * 32, JobState.COMPLETED, [event], expect=JobState.DOWNLOADING)
    assert store.deliveries.pending_count() == 0


def test_find_by_id_prefix_and_name(store: Store) -> None:
    new_job(store, "abc" + "0" * 29, name="alpha")
    new_job(store, "abd" + "0" * 29, name="beta")
    assert [j.name for j in store.jobs.find("abc")] == ["alpha"]
    assert [j.name for j in store.jobs.find("beta")] == ["beta"]
    assert len(store.jobs.find("ab")) == 2
    assert store.jobs.find("zzz") == []
    assert store.jobs.find("a%") == []  # LIKE wildcards are escaped


SHARD = ShardPlan(input_path="/x/round-0.jsonl", request_count=2, size_bytes=10, sha256="0" * 64)


def remote(batch_id: str, status: RemoteStatus) -> RemoteBatch:
    return RemoteBatch(id=batch_id, status=status, input_file_id="file-1", endpoint="/v1/chat/completions")


def test_a_round_is_planned_once_then_uploaded_and_bound(store: Store) -> None:
    new_job(store)
    (record,) = store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    assert (record.remote_id, record.status, record.input_path, record.round) == (
        None,
        BatchStatus.PENDING,
        "/x/round-0.jsonl",
        0,
    )
    with pytest.raises(StaleState):
        store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    assert len(store.batches.of_job("a" * 32)) == 1
    record = store.batches.record_upload(record.id, file_id="file-1", intent_at=1000.0)
    # The intent and the first create attempt in one commit: after a crash, the next try lists first.
    assert (record.status, record.create_attempts, record.intent_at) == (BatchStatus.CREATING, 1, 1000.0)
    with pytest.raises(StaleState):
        store.batches.record_upload(record.id, file_id="file-2", intent_at=1000.0)
    bound = store.batches.bind(record.id, remote("b1", RemoteStatus.VALIDATING))
    assert (bound.remote_id, bound.status, bound.input_file_id) == ("b1", BatchStatus.VALIDATING, "file-1")
    with pytest.raises(StaleState):  # bound once: another batch is never adopted into the same row
        store.batches.bind(record.id, remote("b2", RemoteStatus.VALIDATING))
    store.jobs.record_answer("a" * 32, expect=JobState.UPLOADING, check=answered(JobState.VALIDATING))
    assert store.jobs.get("a" * 32).state is JobState.VALIDATING  # type: ignore[union-attr]
    assert store.batches.bound_among(["b1", "b2"]) == {"b1"}
    assert [b.remote_id for b in store.batches.by_job(["a" * 32])["a" * 32]] == ["b1"]


def test_creates_counted_alone_wait_for_the_unanswered_one_of_their_provider(store: Store) -> None:
    shard = ShardPlan(input_path="/x/in.jsonl", request_count=2, size_bytes=10, sha256="0" * 64)
    rows = {}
    for name, provider in (("a", "claude"), ("b", "claude"), ("c", "default")):
        job_id = name * 32
        add_job(store, job_id, name, provider="anthropic", provider_name=provider)
        (rows[name],) = store.batches.plan_round(job_id, expect=JobState.RECEIVED, round_=0, shards=[shard])
    # a's create is counted and unanswered: b's waits its turn; another provider's does not.
    first = store.batches.record_upload(rows["a"].id, file_id="inline:x", intent_at=1000.0, alone_for="claude")
    with pytest.raises(CreatesBusy):
        store.batches.record_upload(rows["b"].id, file_id="inline:y", intent_at=1000.0, alone_for="claude")
    assert store.batches.of_job("b" * 32)[0].create_attempts == 0  # nothing counted
    store.batches.record_upload(rows["c"].id, file_id="file-c", intent_at=1000.0, alone_for="default")
    # a's own next try is not held up by itself.
    again = store.batches.count_create(first, alone_for="claude")
    assert again.create_attempts == 2
    assert store.batches.unbound_intents(since=0.0, request_count=2, exclude=rows["b"].id, provider="claude") == [
        1000.0
    ]
    # Once a is bound (or parked for an operator), b's create may be counted.
    store.batches.bind(first.id, remote("msgbatch_a", RemoteStatus.IN_PROGRESS))
    store.batches.record_upload(rows["b"].id, file_id="inline:y", intent_at=1001.0, alone_for="claude")


def test_delivery_scheduling_and_disabled_endpoints(store: Store) -> None:
    new_job(store)
    event = NewEvent(id="evt_1", type="batch.failed", body=b"{}", targets=[("https://a/", "config")])
    end_job(store, "a" * 32, JobState.FAILED, [event], expect=JobState.RECEIVED)
    (d,) = store.deliveries.due(1000.0)
    fail_attempt(store, d, next_attempt_at=1005.0)
    assert store.deliveries.due(1004.0) == []
    assert store.deliveries.next_due_at() == 1005.0
    store.deliveries.disable_endpoint("https://a/", "410")
    assert store.deliveries.pending_count() == 0
    assert store.deliveries.disabled_endpoints() == {"https://a/": "410"}
    assert store.deliveries.select(event_id="evt_1")[0].state == "disabled"


def test_due_deliveries_can_be_capped_per_url_and_only_those_taken_are_claimed(store: Store) -> None:
    # Two endpoints, their events interleaved in time: a1 b1 a2 b2 a3 b3.
    for i in range(3):
        for url in ("https://a/", "https://b/"):
            job_id = f"{url[8]}{i}".ljust(32, "0")
            event = NewEvent(id=f"evt_{job_id}", type="batch.failed", body=b"{}", targets=[(url, "config")])
            new_job(store, job_id, f"n{job_id}")
            end_job(store, job_id, JobState.FAILED, [event], expect=JobState.RECEIVED)
    urls = [d.url for d in store.deliveries.due(1000.0)]
    assert urls == ["https://a/", "https://b/"] * 3
    # At most 2 per URL, unless its room says otherwise (a: 1): a1 b1 b2, in due order.
    capped = store.deliveries.due(1000.0, per_url=2, room={"https://a/": 1}, owner="me", lease_s=30.0)
    assert [d.url for d in capped] == ["https://a/", "https://b/", "https://b/"]
    assert [d.body for d in capped] == [b"{}"] * 3
    claimed = {d.id for d in store.deliveries.select() if d.owner == "me"}
    assert claimed == {d.id for d in capped}
    # The cap counts within the read's limit.
    assert [d.url for d in store.deliveries.due(1000.0, limit=2, per_url=1)] == ["https://a/", "https://b/"]


def test_next_due_at_after_a_time_looks_only_at_what_falls_due_later(store: Store) -> None:
    for i in range(2):
        job_id = f"j{i}".ljust(32, "0")
        new_job(store, job_id, f"n{i}")
        event = NewEvent(id=f"evt_{i}", type="batch.failed", body=b"{}", targets=[("https://a/", "config")])
        end_job(store, job_id, JobState.FAILED, [event], expect=JobState.RECEIVED)
    _first, second = store.deliveries.select()
    fail_attempt(store, second, next_attempt_at=1005.0)
    assert store.deliveries.next_due_at() == 1000.0
    assert store.deliveries.next_due_at(after=1000.0) == 1005.0
    assert store.deliveries.next_due_at(after=1005.0) is None
    assert store.deliveries.next_due_at([second.id], after=1000.0) is None


def test_delivery_outcomes_write_what_they_name_in_one_commit(store: Store) -> None:
    new_job(store)
    urls = [f"https://h/{n}" for n in range(6)]
    event = NewEvent(id="evt_o", type="batch.failed", body=b"{}", targets=[(u, "config") for u in urls])
    end_job(store, "a" * 32, JobState.FAILED, [event], expect=JobState.RECEIVED)
    delivered, retried, dead, gone, parked, replayed = store.deliveries.select(event_id="evt_o")
    fail_attempt(store, gone, next_attempt_at=1000.0, error="HTTP 502")
    (gone,) = [d for d in store.deliveries.select(event_id="evt_o") if d.id == gone.id]
    store.deliveries.record_outcomes(
        [
            Delivered(delivered.id, 1, 204, 1001.0),
            RetryLater(retried.id, 1, None, "timed out", 1300.0, seen_next_at=retried.next_attempt_at),
            DeadLettered(dead.id, 1, 500, "HTTP 500", seen_next_at=dead.next_attempt_at),
            EndpointGone(gone.id, 2),
            Parked(parked.id, "410 Gone from the receiver"),
            # A replay made it due at another time meanwhile: only the attempt's own record is written.
            DeadLettered(replayed.id, 1, 500, "HTTP 500", seen_next_at=replayed.next_attempt_at - 1),
        ]
    )
    rows = {d.id: d for d in store.deliveries.select(event_id="evt_o")}
    got = [
        (r.state, r.attempts, r.last_status, r.last_error, r.next_attempt_at, r.delivered_at)
        for r in (rows[d.id] for d in (delivered, retried, dead, gone, parked, replayed))
    ]
    assert got == [
        (DeliveryState.DELIVERED, 1, 204, None, 1000.0, 1001.0),
        (DeliveryState.PENDING, 1, None, "timed out", 1300.0, None),
        (DeliveryState.DEAD, 1, 500, "HTTP 500", 1000.0, None),
        # The 410 leaves the error to disable_endpoint, which parks the delivery with its reason.
        (DeliveryState.PENDING, 2, 410, "HTTP 502", 1000.0, None),
        (DeliveryState.DISABLED, 0, None, "410 Gone from the receiver", 1000.0, None),
        (DeliveryState.PENDING, 1, 500, "HTTP 500", 1000.0, None),
    ]


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
    assert store.jobs.reserve_outbox("a" * 32, candidates_a, nothing_on_disk) == tmp_path / "report"
    # The other job with the same name gets the next name, though nothing exists on disk yet.
    assert store.jobs.reserve_outbox("b" * 32, candidates_b, nothing_on_disk) == tmp_path / "report.bbbbbbbb"
    # Asked again (a restart), a job keeps its reservation.
    assert store.jobs.reserve_outbox("a" * 32, candidates_a, lambda _p: True) == tmp_path / "report"
    new_job(store, "c" * 32, name="mine")
    user_folder = tmp_path / "mine"
    candidates_c = [user_folder, tmp_path / "mine.cccccccc"]
    assert store.jobs.reserve_outbox("c" * 32, candidates_c, lambda p: p == user_folder) == tmp_path / "mine.cccccccc"


def test_values_come_back_as_they_went_in(store: Store) -> None:
    # What each dialect could store differently: JSON, bytes, floats, booleans, big integers, long strings.
    metadata = {"team": "search", "nested": {"n": [1, 2.5, None, True]}, "text": "naïve ✓"}
    new_job(store, metadata=metadata, size_bytes=5 * 2**30, completion_window="1" * 40 + "h", state=JobState.UPLOADING)
    store.jobs.request_cancel("a" * 32)
    check = NextCheck(JobState.VALIDATING, 5.0, 1_764_000_000.123456)
    job = store.jobs.record_answer("a" * 32, expect=JobState.UPLOADING, check=check)
    assert (job.metadata, job.size_bytes, job.completion_window) == (metadata, 5 * 2**30, "1" * 40 + "h")
    assert job.cancel_requested is True and job.next_check_at == 1_764_000_000.123456
    assert job.request_counts is None and job.usage is None
    new_job(store, "b" * 32)
    assert store.jobs.get("b" * 32).metadata == {}  # type: ignore[union-attr]
    body = bytes(range(256))
    event = NewEvent(id="evt_b", type="batch.failed", body=body, targets=[("u", "config")])
    counts = {"total": 3, "completed": 2, "failed": 1}
    job = end_job(store, "a" * 32, JobState.FAILED, [event], expect=JobState.VALIDATING, request_counts=counts)
    assert job.request_counts == counts and job.usage == {}
    assert store.deliveries.get_event("evt_b").body == body  # type: ignore[union-attr]
    assert store.deliveries.select(event_id="evt_b")[0].body == body


def test_an_id_prefix_finds_the_same_jobs_whatever_its_case(store: Store) -> None:
    # SQLite's LIKE ignores ASCII case and PostgreSQL's does not: ids are lower-case hex.
    new_job(store, "abc" + "0" * 29, name="alpha")
    assert [j.name for j in store.jobs.find("ABC")] == ["alpha"]
    assert store.jobs.find("ab_") == [] and store.jobs.find("ab/") == []


def test_record_ids_come_from_the_database(store: Store) -> None:
    new_job(store, "a" * 32)
    new_job(store, "b" * 32)
    (first,) = store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    (second,) = store.batches.plan_round("b" * 32, expect=JobState.RECEIVED, round_=0, shards=[SHARD])
    assert second.id > first.id
    assert [b.id for b in store.batches.of_job("b" * 32)] == [second.id]
    with pytest.raises(StaleState):
        store.batches.count_create(replace(first, create_attempts=5))
    assert store.batches.count_create(first).create_attempts == 1


def test_outside_text_with_a_nul_character_is_recorded(store: Store, database_kind: str) -> None:
    # PostgreSQL refuses NUL in text (SQLite keeps it): there it becomes U+FFFD.
    nul = "\x00" if database_kind == SQLITE else "\ufffd"
    new_job(store, model="a\x00b", webhook_url="https://h/\x00")
    job = store.jobs.back_off("a" * 32, expect=JobState.RECEIVED, attempts=1, next_check_at=1001.0, error="boom\x00")
    assert [job.model, job.webhook_url, job.last_error] == [f"a{nul}b", f"https://h/{nul}", f"boom{nul}"]
    event = NewEvent(id="evt_n", type="batch.failed", body=b"{}", targets=[("https://h/\x00", "inbox")])
    ending = Ending(JobState.FAILED, 1000.0, "r\x00", {"total": 0, "completed": 0, "failed": 0}, {})
    job = store.jobs.finish("a" * 32, expect=JobState.RECEIVED, ending=ending, events=[event])
    assert job.reason == f"r{nul}"
    (delivery,) = store.deliveries.due(1000.0)
    fail_attempt(store, delivery, next_attempt_at=delivery.next_attempt_at, status=None, error="refused\x00")
    assert store.deliveries.select(event_id="evt_n")[0].last_error == f"refused{nul}"
    store.deliveries.disable_endpoint("https://h/\x00", "gone\x00")
    assert store.deliveries.disabled_endpoints() == {f"https://h/{nul}": f"gone{nul}"}
    assert store.deliveries.select(event_id="evt_n")[0].state == "disabled"


def test_leases_fence_a_daemon_that_lost_its_job(tmp_path: Path) -> None:
    now = [1000.0]
    store = Store(database_url(tmp_path / "lease.db"), clock=lambda: now[0])
    store.migrate()

    def owner() -> str | None:
        return store.jobs.get("a" * 32).owner  # type: ignore[union-attr]

    try:
        for daemon in ("A", "B"):
            store.cluster.register(daemon, host="h", pid=1, home=f"h:/{daemon}")
        new_job(store, "a" * 32)
        assert store.cluster.claim("A", 30.0, limit=10) == {"a" * 32: 1}
        assert store.cluster.claim("B", 30.0, limit=10) == {}  # held: nobody else takes it
        now[0] += 20
        store.cluster.renew("A")
        store.cluster.renew("B")
        now[0] += 29
        assert store.cluster.claim("B", 30.0, limit=10) == {}  # renewed: still A's
        store.cluster.renew("B")
        now[0] += 2  # A stalls past its lease: B takes the job over, at the next claim
        assert store.cluster.claim("B", 30.0, limit=10) == {"a" * 32: 2}
        token = LEASE.set(Lease("A", {"a" * 32: 1}))
        try:
            with pytest.raises(StaleState, match="lease was lost"):
                store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[])
        finally:
            LEASE.reset(token)
        token = LEASE.set(Lease("B", {"a" * 32: 2}))
        try:
            store.batches.plan_round("a" * 32, expect=JobState.RECEIVED, round_=0, shards=[])
            assert store.jobs.get("a" * 32).state is JobState.UPLOADING  # type: ignore[union-attr]
        finally:
            LEASE.reset(token)
        store.cluster.renew("A")  # A comes back: the job stays B's
        assert owner() == "B" and store.cluster.claim("A", 30.0, limit=10) == {}
        store.cluster.release("B")
        assert owner() is None
        assert store.cluster.claim("A", 30.0, limit=10) == {"a" * 32: 3}
    finally:
        store.close()


def test_a_restarted_daemon_takes_over_its_dead_predecessors_jobs_at_once(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path / "home.db"), clock=lambda: 1000.0)
    store.migrate()
    try:
        assert store.cluster.register("old", host="h", pid=1, home="h:/state") == []
        new_job(store, "a" * 32)
        assert store.cluster.claim("old", 30.0, limit=10) == {"a" * 32: 1}
        earlier = store.cluster.register("new", host="h", pid=2, home="h:/state")
        assert earlier == ["old"]
        # The lease is not over yet, but registering marked the old daemon stopped: taken at once.
        assert store.cluster.claim("new", 30.0, limit=10) == {"a" * 32: 2}
        states = {d["id"]: (d["stopped_at"] is not None, d["jobs"]) for d in store.cluster.daemons()}
        assert states == {"old": (True, 0), "new": (False, 1)}
    finally:
        store.close()


def test_commands_wake_the_daemons_through_the_signals_they_count(store: Store) -> None:
    def counts() -> tuple[int, int]:
        seen = store.signals.read()
        return seen[Signal.JOBS], seen[Signal.DELIVERIES]

    assert counts() == (0, 0)
    add_job(store, "a" * 32, "held", hold=Hold("d", 1, 2000.0))  # a daemon's own take: nobody to wake
    assert counts() == (0, 0)
    add_job(store, "b" * 32, "retried")  # a job nobody holds (`batchd retry`): claim it
    assert counts() == (1, 0)
    store.jobs.request_cancel("a" * 32)
    assert counts() == (2, 0)
    event = NewEvent(id="evt_1", type="batch.failed", body=b"{}", targets=[("https://a/", "config")])
    end_job(store, "b" * 32, JobState.FAILED, [event], expect=JobState.RECEIVED)
    assert counts() == (2, 0)  # the daemon's own event: its deliverer is poked in process
    store.deliveries.replay_event("evt_1", [("https://a/", "config")])
    assert counts() == (2, 1)
    store.deliveries.disable_endpoint("https://a/", "410")
    store.deliveries.enable_endpoint("https://a/")
    assert counts() == (2, 2)


def test_a_finished_job_is_nobodys_and_a_rejected_one_ends_when_it_begins(tmp_path: Path) -> None:
    ticks = itertools.count(1000.0, 0.5)  # every reading of the clock a little later
    store = Store(database_url(tmp_path / "owner.db"), clock=lambda: next(ticks))
    store.migrate()
    try:
        store.cluster.register("A", host="h", pid=1, home="h:/A")
        new_job(store, "a" * 32)
        assert store.cluster.claim("A", 30.0, limit=10) == {"a" * 32: 1}
        token = LEASE.set(Lease("A", {"a" * 32: 1}))
        try:
            done = end_job(store, "a" * 32, JobState.CANCELLED, expect=JobState.RECEIVED)
        finally:
            LEASE.reset(token)
        # `jobs`, `show` and the status page show a finished job held by nobody, not by its last daemon.
        assert done.owner is None and store.jobs.get("a" * 32).owner is None  # type: ignore[union-attr]
        rejected = add_job(store, "b" * 32, state=JobState.REJECTED)
        assert rejected.finished_at is not None and rejected.created_at == rejected.finished_at
    finally:
        store.close()


def test_an_input_another_live_job_uses_or_may_be_given_is_kept(store: Store) -> None:
    # Together gives the same content the same file id: job A's ended round must not delete an
    # input that job B's batch uses, nor one B's upload of the same content may be answered with.
    same, other = "5" * 64, "6" * 64
    add_in_flight(store, "a" * 32, "a", remote_id="ra", next_check_at=store.now() + 60)
    store.jobs.insert(NewJob(id="b" * 32, name="b", source="b.jsonl", provider="together"))
    shard = ShardPlan(input_path="/x/b.jsonl", request_count=1, size_bytes=10, sha256=same)
    (pending,) = store.batches.plan_round("b" * 32, expect=JobState.RECEIVED, round_=0, shards=[shard])
    assert store.batches.input_shared("file-1", "a" * 32, same)  # B has not uploaded yet
    assert not store.batches.input_shared("file-1", "a" * 32, other)
    store.batches.record_upload(pending.id, file_id="file-1", intent_at=store.now())
    assert store.batches.input_shared("file-1", "a" * 32, other)  # B's create will use it
    store.batches.refuse(store.batches.of_job("b" * 32)[0], "refused by a test")
    assert not store.batches.input_shared("file-1", "a" * 32, same)  # nothing of B reads it now
