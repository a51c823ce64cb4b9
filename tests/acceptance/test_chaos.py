"""Chaos: errors injected at random into store calls (before and after their commits), provider
calls and file writes while a daemon works through 50 files. The daemon never exits, every job
ends exactly once with its webhook, every request is accounted for, and the SQLite file is whole.

A fixed seed keeps the CI run reproducible in what is injected; a longer run with other seeds
is `python -m tests.benchmarks.bench_chaos`.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from batchd.chaos import ENV
from batchd.store import Store
from tests.acceptance.conftest import DaemonProcess, Harness, chat, harness, read_jsonl
from tests.databases import is_sqlite

pytestmark = pytest.mark.each_database

JOBS = 50
REQUESTS = 2
SEED = 7
RATE = 0.03


async def run_chaos(tmp_path: Path, *, jobs: int = JOBS, seed: int = SEED, rate: float = RATE) -> dict[str, Any]:
    """Drop `jobs` files under chaos; check everything; return the figures (faults by kind, exits)."""
    async with harness(tmp_path) as h:
        daemon = h.start(env={ENV: f"seed={seed},rate={rate}"})
        await daemon.until_logged("daemon.ready")
        names = [f"chaos{i:03d}" for i in range(jobs)]
        for name in names:
            h.ws.drop(f"{name}.jsonl", [chat(f"{name}-{r}") for r in range(REQUESTS)])
        await h.receiver.wait_for(
            lambda hooks: daemon.proc.poll() is not None or len({x.event["data"]["id"] for x in hooks}) >= jobs,
            timeout=60 + 4 * jobs,
        )
        assert daemon.proc.poll() is None, f"the daemon exited: {daemon.log_path.read_text()[-3000:]}"
        figures = check_exactly_once(h, daemon, names)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=15) == 0
        check_integrity(h)
        return figures


def check_exactly_once(h: Harness, daemon: DaemonProcess, names: list[str]) -> dict[str, Any]:
    store = Store(h.ws.database_url)
    try:
        jobs = store.jobs.select()
    finally:
        store.close()
    assert Counter(job.source for job in jobs) == Counter(f"{n}.jsonl" for n in names), "one job per file"
    assert all(job.state.value == "completed" for job in jobs), [(j.name, j.state, j.reason) for j in jobs]
    assert sorted(p.name for p in h.ws.outbox.iterdir()) == sorted(names)
    lost = duplicated = 0
    for name in names:
        folder = h.ws.outbox / name
        doc = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        answered = [line["custom_id"] for line in read_jsonl(folder / "output.jsonl")]
        if (folder / "errors.jsonl").exists():
            answered += [line["custom_id"] for line in read_jsonl(folder / "errors.jsonl")]
        wanted = [f"{name}-{r}" for r in range(REQUESTS)]
        lost += len(set(wanted) - set(answered))
        duplicated += len(answered) - len(set(answered))
        assert doc["status"] == "completed" and doc["request_counts"]["completed"] == REQUESTS
    assert (lost, duplicated) == (0, 0)
    ids_per_job: dict[str, set[str]] = {}
    for hook in h.receiver.hooks:
        ids_per_job.setdefault(hook.event["data"]["id"], set()).add(hook.headers["webhook-id"])
    assert set(ids_per_job) == {job.id for job in jobs}
    assert all(len(ids) == 1 for ids in ids_per_job.values()), "one terminal event per job"
    injected = Counter(entry["kind"] for entry in daemon.logs_named("chaos.injected"))
    assert set(injected) == {"store", "provider", "file"}, f"every kind was injected: {injected}"
    return {"jobs": len(jobs), "injected": dict(injected), "lost": lost, "duplicated": duplicated, "exits": 0}


def check_integrity(h: Harness) -> None:
    if not is_sqlite(h.ws.database_url):
        return
    database = make_url(h.ws.database_url).database
    assert database is not None
    conn = sqlite3.connect(database)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


async def test_fifty_jobs_under_chaos_each_end_once_with_their_webhook(tmp_path: Path) -> None:
    figures = await run_chaos(tmp_path)
    assert figures["jobs"] == JOBS
