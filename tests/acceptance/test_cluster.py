"""Several daemons over one PostgreSQL database and one shared inbox and outbox: no job handled
twice, the work spread, a dead daemon's jobs taken over by the others."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from batchd.store import Store
from tests.acceptance.conftest import DaemonProcess, Harness, Workspace, chat, eventually, harness
from tests.databases import POSTGRESQL

pytestmark = pytest.mark.each_database(POSTGRESQL)

LEASE_S = 2.0


def cluster(h: Harness, count: int) -> list[Workspace]:
    """`count` daemon homes (own state_dir) sharing the harness's inbox, outbox and database."""
    homes = []
    base = h.ws.config.read_text()
    for i in range(count):
        root = h.ws.root / f"daemon{i}"
        root.mkdir()
        config = root / "batchd.toml"
        shared = f'inbox_dir = "{h.ws.inbox}"\noutbox_dir = "{h.ws.outbox}"\n'
        config.write_text(shared + base + f"\n[cluster]\nlease_s = {LEASE_S}\n", encoding="utf-8")
        homes.append(Workspace(root, config, h.ws.env, h.ws.database_url))
    return homes


def start(h: Harness, homes: list[Workspace]) -> list[DaemonProcess]:
    daemons = [DaemonProcess(home) for home in homes]
    h.daemons.extend(daemons)
    return daemons


def jobs_by_owner(h: Harness) -> Counter[str | None]:
    store = Store(h.ws.database_url)
    try:
        return Counter(job.owner for job in store.jobs.select())
    finally:
        store.close()


def finished_by(daemons: list[DaemonProcess]) -> dict[str, int]:
    """job id → index of the daemon that logged its finish."""
    found = {}
    for i, d in enumerate(daemons):
        for entry in d.logs_named("job.finished"):
            found[entry["job_id"]] = i
    return found


def check_once_each(h: Harness, names: list[str], hooks: list[dict[str, Any]]) -> None:
    """Every file one completed job, one outbox folder, one webhook id; every input created once."""
    for name in names:
        meta = json.loads((h.ws.outbox / name / "job.json").read_text(encoding="utf-8"))
        assert meta["status"] == "completed" and meta["request_counts"]["failed"] == 0
    assert sorted(p.name for p in h.ws.outbox.iterdir()) == sorted(names)
    ids_per_job: dict[str, set[str]] = {}
    for hook, event in zip(h.receiver.hooks, hooks, strict=True):
        ids_per_job.setdefault(event["data"]["id"], set()).add(hook.headers["webhook-id"])
    assert len(ids_per_job) == len(names) and all(len(ids) == 1 for ids in ids_per_job.values())


async def test_three_daemons_share_a_hundred_files_each_job_once(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        daemons = start(h, cluster(h, 3))
        for d in daemons:
            await d.until_logged("daemon.ready")
        names = [f"c{i:03d}" for i in range(100)]
        for name in names:
            h.ws.drop(f"{name}.jsonl", [chat(f"{name}-a"), chat(f"{name}-b")])
        await h.receiver.wait_for(lambda hooks: len({x.event["data"]["id"] for x in hooks}) >= 100, timeout=180)

        check_once_each(h, names, h.receiver.verified())
        creates = await h.emulator.creates()
        assert len(creates) == 100 and len({c["input_file_id"] for c in creates}) == 100
        spread = Counter(finished_by(daemons).values())
        assert sorted(spread) == [0, 1, 2], f"work spread over every daemon: {spread}"
        assert sum(spread.values()) == 100
        for d in daemons:
            d.signal(signal.SIGTERM)
        assert [await d.wait(timeout=15) for d in daemons] == [0, 0, 0]


async def test_a_killed_daemons_jobs_are_taken_over_without_a_second_create(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.emulator.control("POST", "pause")
        homes = cluster(h, 3)
        daemons = start(h, homes)
        for d in daemons:
            await d.until_logged("daemon.ready")
        names = [f"k{i:02d}" for i in range(30)]
        for name in names:
            h.ws.drop(f"{name}.jsonl", [chat(f"{name}-a")])
        await eventually(lambda: len([e for d in daemons for e in d.logs_named("job.batch_created")]) >= 30, 60)
        owners = jobs_by_owner(h)
        victim = max(range(3), key=lambda i: sum(1 for d in daemons[i].logs_named("job.batch_created")))
        victim_jobs = {e["job_id"] for e in daemons[victim].logs_named("job.batch_created")}
        assert victim_jobs and sum(owners.values()) == 30

        daemons[victim].proc.kill()
        killed_at = time.time()
        assert await daemons[victim].wait() == -9
        await h.emulator.control("POST", "resume")
        await h.receiver.wait_for(lambda hooks: len({x.event["data"]["id"] for x in hooks}) >= 30, timeout=120)

        check_once_each(h, names, h.receiver.verified())
        assert len(await h.emulator.creates()) == 30, "no second create for a taken-over job"
        others = [d for i, d in enumerate(daemons) if i != victim]
        taken = finished_by(others)
        assert victim_jobs <= set(taken), "the dead daemon's jobs were finished by the others"
        # Taken over after the dead daemon's leases ran out (never before), and promptly after.
        claims = [_time(e) for d in others for e in d.logs_named("daemon.claimed")]
        takeover = min(t for t in claims if t >= killed_at) - killed_at
        assert 0 < takeover < 3 * (LEASE_S + LEASE_S / 3), f"takeover after {takeover:.2f} s"
        for d in others:
            d.signal(signal.SIGTERM)
        assert [await d.wait(timeout=15) for d in others] == [0, 0]


def took_one_or_none_left(h: Harness, joining: DaemonProcess, names: list[str]) -> bool:
    """The joining daemon took a file, or the others took every one of `names` (a take renames the
    file out of the inbox): nothing is left for it to take, so there is no point waiting longer."""
    return joining.has_logged("inbox.claimed") or not any((h.ws.inbox / f"{n}.jsonl").exists() for n in names)


def _time(entry: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(entry["timestamp"])).timestamp()


async def test_a_daemon_that_joins_dies_and_restarts_as_files_arrive_disturbs_no_job(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        homes = cluster(h, 4)
        steady = start(h, homes[:3])
        for d in steady:
            await d.until_logged("daemon.ready")
        names = [f"j{i:03d}" for i in range(60)]
        churn: list[DaemonProcess] = []
        for round_, first in enumerate(range(0, len(names), 10)):
            # The fourth daemon joins, works a little while files arrive, and is killed.
            joining = DaemonProcess(homes[3])
            h.daemons.append(joining)
            churn.append(joining)
            if round_ % 2 == 0:
                await eventually(joining.dead_or_ready, 30)
            batch = names[first : first + 10]
            for name in batch:
                h.ws.drop(f"{name}.jsonl", [chat(f"{name}-a"), chat(f"{name}-b")])
            if round_ % 2 == 0:
                # Killed once it has taken a file (mid-take, mid-submit), or when the others took them all.
                with contextlib.suppress(TimeoutError):
                    await eventually(partial(took_one_or_none_left, h, joining, batch), 10)
            joining.proc.kill()  # odd rounds: while it is still starting up
            assert await joining.wait() == -9
        await h.receiver.wait_for(lambda hooks: len({x.event["data"]["id"] for x in hooks}) >= 60, timeout=240)

        assert [d.proc.poll() for d in steady] == [None, None, None], "no daemon that was not killed exited"
        check_once_each(h, names, h.receiver.verified())
        creates = await h.emulator.creates()
        assert len(creates) == 60 and len({c["input_file_id"] for c in creates}) == 60, "each input created once"
        for d in steady:
            d.signal(signal.SIGTERM)
        assert [await d.wait(timeout=15) for d in steady] == [0, 0, 0]
        assert len(churn) == 6
