"""The scheduler loop's heartbeat and /healthz over a real database: STATUS= on change,
a stuck loop and a database that takes no write both answer 503."""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from batchd import metrics
from batchd.faults import Faults
from batchd.health import STATUS_MIN_GAP_S, STUCK_AFTER_TICKS, Health, LoopMonitor, create_metrics_app
from batchd.models import Job, JobState
from batchd.store import NextCheck, Store, schema_version
from tests.databases import database_url, is_sqlite
from tests.hand_clock import Clock
from tests.store_helpers import add_job, end_job

pytestmark = pytest.mark.each_database


def new_job(store: Store, name: str, state: JobState) -> Job:
    return add_job(store, name.ljust(32, "0"), name, state=state)


@asynccontextmanager
async def opened(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(database_url(tmp_path / "batchd.db"))
    store.migrate()
    try:
        yield store
    finally:
        store.close()


async def test_status_is_sent_on_the_first_tick_on_change_and_when_old(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        sent: list[str] = []
        clock = Clock()
        monitor = LoopMonitor(store, clock=clock, notify=sent.append, status_every_s=30)
        a = new_job(store, "a", JobState.IN_PROGRESS)
        new_job(store, "r", JobState.REJECTED)

        await monitor.tick()
        assert sent == ["STATUS=1 active (1 in_progress); 1 done (1 rejected); 0 webhooks pending"]
        clock.now += 5
        await monitor.tick()
        assert len(sent) == 1  # nothing changed

        check = NextCheck(JobState.DOWNLOADING, 5.0, store.now())
        a = store.jobs.record_answer(a.id, expect=JobState.IN_PROGRESS, check=check)
        await monitor.tick(changed=True)
        assert sent[-1].startswith("STATUS=1 active (1 downloading)")
        end_job(store, a.id, JobState.COMPLETED, expect=JobState.DOWNLOADING)
        await monitor.tick(changed=True)
        assert len(sent) == 2  # a change within STATUS_MIN_GAP_S of the last report waits...
        clock.now += STATUS_MIN_GAP_S
        await monitor.tick()
        assert sent[-1] == "STATUS=0 active; 2 done (1 completed, 1 rejected); 0 webhooks pending"  # ...not forever

        clock.now += 31
        await monitor.tick()
        assert len(sent) == 4 and monitor.status == sent[-1].removeprefix("STATUS=")


async def test_status_says_what_fails_and_healthz_fails_while_it_does(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        sent: list[str] = []
        faults = Faults()
        monitor = LoopMonitor(store, clock=Clock(), notify=sent.append, faults=faults)
        await monitor.tick()
        full = OSError(errno.ENOSPC, "No space left on device", "/state/outbox/x/output.jsonl")
        faults.report("steps", full)
        await monitor.tick()  # nothing else changed: the fault alone is news
        assert sent[-1].endswith(
            "; failing: steps (disk: No space left on device (ENOSPC): /state/outbox/x/output.jsonl)"
        )
        ok, report = await Health(monitor, store).check()
        assert not ok and report["faults"] == {
            "steps": "disk: No space left on device (ENOSPC): /state/outbox/x/output.jsonl"
        }
        # While the loop cannot tick at all (the database down), the faults are said on their own.
        faults.report("scheduler", RuntimeError("the database went away"))
        monitor.announce_faults()
        assert sent[-1].startswith("STATUS=failing: scheduler (unexpected: RuntimeError: the database went away)")
        faults.clear("steps")
        faults.clear("scheduler")
        await monitor.tick()
        assert "failing" not in sent[-1]
        ok, report = await Health(monitor, store).check()
        assert ok and report["faults"] == {}


async def test_the_jobs_gauge_follows_the_status(tmp_path: Path) -> None:
    m = metrics.enable()
    try:
        async with opened(tmp_path) as store:
            monitor = LoopMonitor(store, notify=lambda _m: None)
            new_job(store, "done", JobState.COMPLETED)
            await monitor.tick()
            assert m.registry.get_sample_value("batchd_jobs", {"state": "completed"}) == 1
            assert m.registry.get_sample_value("batchd_scheduler_tick_duration_seconds_count") == 0
            monitor.begin()
            await monitor.tick()
            assert m.registry.get_sample_value("batchd_scheduler_tick_duration_seconds_count") == 1
    finally:
        metrics.disable()


@contextmanager
def write_lock_held(store: Store) -> Iterator[None]:
    """A writer in another connection that does not finish: SQLite's write lock, or on
    PostgreSQL the lock of the row every write probe updates."""
    if is_sqlite(store.url):
        holder = sqlite3.connect(make_url(store.url).database or "", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    engine = create_engine(store.url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(select(schema_version).with_for_update())
            yield
            conn.rollback()
    finally:
        engine.dispose()


async def get(app: Any, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batchd") as client:
        return await client.get(path)


async def test_healthz_fails_when_the_loop_stops_ticking(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        clock = Clock()
        monitor = LoopMonitor(store, clock=clock, notify=lambda _m: None, period_s=1.0)
        app = create_metrics_app(Health(monitor, store), metrics.Metrics().registry)
        await monitor.tick()
        healthy = await get(app, "/healthz")
        assert healthy.status_code == 200 and healthy.json()["status"] == "ok"

        clock.now += STUCK_AFTER_TICKS * 1.0 + 1
        stuck = await get(app, "/healthz")
        assert stuck.status_code == 503
        assert stuck.json()["scheduler"] == f"no tick for {STUCK_AFTER_TICKS + 1:.1f} s"
        assert stuck.json()["database"] == "ok"

        await monitor.tick()
        assert (await get(app, "/healthz")).status_code == 200


async def test_healthz_fails_while_the_database_takes_no_write(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        monitor = LoopMonitor(store, notify=lambda _m: None)
        await monitor.tick()
        health = Health(monitor, store, db_timeout_s=0.3)
        app = create_metrics_app(health, metrics.Metrics().registry)
        # Another process holds the write lock (a stuck writer).
        with write_lock_held(store):
            locked = await get(app, "/healthz")
            assert locked.status_code == 503
            assert locked.json()["database"] == "a write did not finish within 0.3 s"
            # The first probe is still waiting: a second check does not pile another thread on.
            again = await get(app, "/healthz")
            assert again.status_code == 503 and again.json()["database"].startswith("a write has not finished after")
        with anyio.fail_after(10):
            while (await get(app, "/healthz")).status_code != 200:  # noqa: ASYNC110 - the probe thread ends by itself
                await anyio.sleep(0.05)


async def test_healthz_reports_a_write_error(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:

        def refuse() -> None:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        monitor = LoopMonitor(store, notify=lambda _m: None)
        await monitor.tick()
        store.probe_write = refuse  # type: ignore[method-assign]
        broken = await get(create_metrics_app(Health(monitor, store), metrics.Metrics().registry), "/healthz")
        assert broken.status_code == 503
        assert broken.json()["database"] == "OperationalError: attempt to write a readonly database"


def test_probe_write_changes_nothing(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path / "batchd.db"))
    try:
        store.migrate()
        before = store.schema_version()
        started = time.monotonic()
        store.probe_write()
        assert store.schema_version() == before and time.monotonic() - started < 5
    finally:
        store.close()


async def test_a_slow_read_stretches_the_idle_period_and_the_stuck_threshold(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        clock = Clock()
        monitor = LoopMonitor(store, clock=clock, notify=lambda _m: None, period_s=1.0)
        monitor.begin()
        clock.now += 0.02
        await monitor.tick()
        assert monitor.idle_s() == 1.0  # a quick read: the plain period
        monitor.begin()
        clock.now += 0.8  # 10,000 jobs take this long to read
        await monitor.tick()
        assert monitor.idle_s() == pytest.approx(8.0)
        clock.now += STUCK_AFTER_TICKS * 1.0 + 1
        assert monitor.stuck_for() is None  # not stuck: waiting its stretched period
        clock.now += STUCK_AFTER_TICKS * 8.0
        assert monitor.stuck_for() is not None
